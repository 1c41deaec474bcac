"""A task's events as Server-Sent Events: its history first, then live, until its final status."""

from __future__ import annotations

from collections.abc import AsyncIterator

from quart import Blueprint, Response, request
from quart_schema import document_headers, document_querystring, operation_id, tag_blueprint

from frontend import schemas
from frontend.context import current_feeds, current_scope, current_service
from frontend.feeds import Feeds, encode, event_id, event_key
from frontend.openapi import document_events
from frontend.sse import EVENT_ID, KEEPALIVE, RETRY_MS, stream_response
from wsrunner.errors import UnavailableError, ValidationError
from wsrunner.models import Event
from wsrunner.service import Service

blueprint = Blueprint("events", __name__)
tag_blueprint(blueprint, ["events"])


@blueprint.get("/api/tasks/<task_id>/events")
@operation_id("streamTaskEvents")
@document_headers(schemas.EventsHeaders)
@document_querystring(schemas.EventsQuery)
@document_events(
    {
        "status_changed": schemas.StatusChanged,
        "progress_update": schemas.ProgressUpdate,
        "output": schemas.TaskOutput,
        "error": schemas.TaskError,
    },
    ids=True,
    ended="The task has ended and nothing is left to send",
)
async def events(task_id: str) -> Response:
    """The task's events as SSE: history first, then live, until its final status.

    Resume with `Last-Event-ID` (header, or `last_event_id` in the query).
    """
    service = current_service()
    record = await service.get(task_id, scope=current_scope())
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    if not EVENT_ID.fullmatch(after):
        raise ValidationError(
            "Last-Event-ID", f"expected an event id such as 1732400000000-0, got {after[:40]!r}"
        )
    history: list[Event] = []
    if record.status.terminal:
        history = await service.events(record.id, after)
        if not history:
            return Response(b"", status=204)  # over, nothing left to send: EventSource stops
    frames = _task_frames(service, current_feeds(), record.id, after, history)
    return await stream_response(frames)


async def _task_frames(
    service: Service, feeds: Feeds, task_id: str, after: str, history: list[Event]
) -> AsyncIterator[bytes]:
    """The stream: `history` (what the handler read already), then the task's feed."""
    hub = feeds.hub
    with hub.stream():
        yield f"retry: {RETRY_MS}\n\n".encode()
        # What arrived together goes out as one chunk: one send for the HTTP stack, not one per
        # event, when a busy daemon falls behind a fast task.
        frames, ended = encode(history)
        if frames:
            yield b"".join(frames)
        if ended:
            return
        cursor = event_key(history[-1].id if history else after)
        with feeds.follow(service, task_id, cursor) as feed:
            quiet = feed.quiet
            while True:
                shared = feed.frames_after(cursor)
                if shared is None:  # older than the feed's window: from the event log
                    events = await service.events(task_id, event_id(cursor))
                    frames, ended = encode(events)
                    if events:
                        cursor = event_key(events[len(frames) - 1].id)
                    elif feed.known:  # the events up to the window are gone (Redis lost them)
                        cursor = feed.floor
                        continue
                else:
                    (frames, cursor), ended = shared, feed.ended
                if frames:
                    yield b"".join(frames)
                    if ended:
                        return
                    continue
                if (failed := feed.failed) is not None:  # each its own: one raised in many
                    # tasks would gather all their tracebacks
                    raise UnavailableError(
                        f"the task's events cannot be read: {failed}"
                    ) from failed
                if feed.ended or hub.closing.is_set():
                    return  # over; or the daemon is stopping: the client resumes elsewhere
                if feed.quiet != quiet:  # a keep-alive period passed without an event
                    quiet = feed.quiet
                    yield KEEPALIVE
                    continue  # things may have changed while the client took it
                await feed.changed.wait()
