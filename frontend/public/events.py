"""A task's events as Server-Sent Events: its history first, then live, until its final status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

from quart import Blueprint, Response, request
from quart_schema import document_headers, document_querystring, operation_id, tag_blueprint

from frontend import schemas
from frontend.context import current_hub, current_scope, current_service
from frontend.openapi import document_events
from frontend.sse import EVENT_ID, KEEPALIVE, RETRY_MS, Hub, frame, stream_response
from wsrunner.errors import ValidationError
from wsrunner.models import TERMINAL_STATES
from wsrunner.service import Service

_TERMINAL: Final = frozenset(s.value for s in TERMINAL_STATES)

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
    first = await service.events(record.id, after)
    if not first and record.status.terminal:
        return Response(b"", status=204)  # over, nothing left to send: EventSource stops
    return await stream_response(_task_frames(service, current_hub(), record.id, after, first))


async def _task_frames(
    service: Service, hub: Hub, task_id: str, after: str, pending: list[Any]
) -> AsyncIterator[bytes]:
    with hub.stream():
        yield f"retry: {RETRY_MS}\n\n".encode()
        cursor = after
        while True:
            # What arrived together goes out as one chunk: one send for the HTTP stack, not
            # one per event, when a busy daemon falls behind a fast task.
            frames = []
            for event in pending:
                frames.append(frame(event.id, event.type, event.data))
                cursor = event.id
                if event.type == "status_changed" and event.data.get("status") in _TERMINAL:
                    yield b"".join(frames)
                    return
            if frames:
                yield b"".join(frames)
            with hub.waiting() as wait:
                pending = await service.events(
                    task_id, cursor, block_ms=int(hub.keepalive_s * 1000)
                )
            if wait.cancelled_caught:
                return  # the daemon is stopping; the client resumes elsewhere with its id
            if not pending:
                # Quiet for a keep-alive period. If the task ended and its events are gone
                # (Redis lost them), there is nothing left to wait for.
                if (await service.get(task_id)).status.terminal:
                    return
                yield KEEPALIVE
