"""The public REST + SSE API (PUBLIC_API_PORT): tasks, their events, and repository clones.

Every route but `/openapi.json` needs `Authorization: Bearer <token>`. A token sees only the
workspaces it is scoped to; a task elsewhere is answered 404, exactly like a task that does not
exist, so ids do not leak. Errors are problem+json (`frontend.problems`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlencode

from quart import Response, g, jsonify, request
from quart_schema import (
    QuartSchema,
    document_headers,
    document_querystring,
    document_request,
    document_response,
)

from frontend import probes, problems, schemas
from frontend.app import App, json_body, json_object, query_int
from frontend.openapi import install_openapi
from frontend.sse import EVENT_ID, KEEPALIVE, RETRY_MS, Hub, frame, stream_response
from wsrunner import __version__
from wsrunner.errors import AuthenticationError, ValidationError
from wsrunner.models import TERMINAL_STATES, ApiToken, TaskRecord
from wsrunner.service import Service, Submitted

OPEN_PATHS: Final = frozenset({"/openapi.json"}) | probes.PATHS
_TERMINAL: Final = frozenset(s.value for s in TERMINAL_STATES)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def task_json(record: TaskRecord, *, full: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": record.id,
        "workspace_id": record.workspace_id,
        "task_type": record.task_type,
        "status": record.status.value,
        "priority": record.priority.value,
        "submitted_at": _iso(record.submitted_at),
        "started_at": _iso(record.started_at),
        "completed_at": _iso(record.completed_at),
        "error_message": record.error_message,
        "execution_time_ms": record.execution_time_ms,
        "worker_id": record.worker_id,
        "attempts": record.attempts,
        "idempotency_key": record.idempotency_key,
        "correlation_id": record.correlation_id,
        "cancel_requested": record.cancel_requested,
        "runner_backend": "queued",
        "events_url": f"/api/tasks/{record.id}/events",
    }
    if full:
        body["configuration"] = record.configuration
        body["result"] = record.result
    return body


def _encode_cursor(record: TaskRecord) -> str:
    raw = json.dumps([record.submitted_at.isoformat(), record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, task_id = json.loads(raw)
        return datetime.fromisoformat(ts), str(task_id)
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise ValidationError(
            "cursor", "expected the next_cursor value of a previous page"
        ) from None


def _idempotency_header() -> str | None:
    """`Idempotency-Key`, a structured-field string (`"abc"`) or a bare token."""
    value = request.headers.get("Idempotency-Key")
    if value is None:
        return None
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value or len(value) > 255 or not value.isprintable():
        raise ValidationError("Idempotency-Key", "expected 1-255 printable characters")
    return value


def _accepted(submitted: Submitted) -> Response:
    record = submitted.record
    response = jsonify(
        {
            "task_id": record.id,
            "status": record.status.value,
            "events_url": f"/api/tasks/{record.id}/events",
        }
    )
    response.status_code = 202
    response.headers["Location"] = f"/api/tasks/{record.id}"
    if not submitted.created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _with_idempotency(body: Any) -> Any:
    key = _idempotency_header()
    if key is not None and isinstance(body, dict):
        if body.get("idempotency_key", key) != key:
            raise ValidationError("idempotency_key", "differs from the Idempotency-Key header")
        body = {**body, "idempotency_key": key}
    return body


def create_public_app(service: Service, hub: Hub) -> App:
    app = App("wsrunner.public", api="public", metrics=service.metrics)
    app.config["MAX_CONTENT_LENGTH"] = service.settings.max_request_bytes
    problems.install(app)
    QuartSchema(
        app,
        openapi_path=None,  # served by install_openapi, which adds problem+json and SSE
        swagger_ui_path=None,  # the UIs load scripts from CDNs
        redoc_ui_path=None,
        scalar_ui_path=None,
        info={"title": "wsrunner public API", "version": __version__},
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        security=[{"bearer": []}],
    )
    probes.install_probes(app, service)
    install_openapi(app, sse_paths={"/api/tasks/{task_id}/events"}, open_paths=OPEN_PATHS)

    @app.before_request
    async def authenticate() -> None:
        # No route (404) or not this method (405): the answer says nothing the open
        # /openapi.json does not, and a scraper of the old /metrics gets a plain 404.
        if request.path in OPEN_PATHS or request.routing_exception is not None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("send Authorization: Bearer <token>")
        g.scope = await service.tokens.authenticate(token.strip())

    def scope() -> ApiToken:
        token: ApiToken = g.scope
        return token

    @app.post("/api/tasks/submit")
    @document_request(schemas.SubmitRequest)
    @document_headers(schemas.IdempotencyHeaders)
    @document_response(schemas.Accepted, 202)
    async def submit() -> Response:
        """Queue a task. The durable record is written before the task is queued."""
        body = _with_idempotency(await json_body())
        return _accepted(await service.submit(body, scope=scope()))

    @app.post("/api/workspaces/<workspace_id>/github/clone")
    @document_request(schemas.CloneRequest)
    @document_headers(schemas.IdempotencyHeaders)
    @document_response(schemas.Accepted, 202)
    async def clone(workspace_id: str) -> Response:
        """Queue a clone into repos/ of the workspace; its git token is added when it runs."""
        body = _with_idempotency(await json_body())
        return _accepted(await service.submit_clone(workspace_id, body, scope=scope()))

    @app.get("/api/tools")
    @document_response(schemas.ToolList)
    async def tool_definitions() -> Response:
        """The workspace tools an agent can call, as JSON Schema tool definitions."""
        return jsonify({"tools": service.tool_definitions()})

    @app.post("/api/tools/call")
    @document_request(schemas.ToolCall)
    @document_response(schemas.ToolResult)
    async def call_tool() -> Response:
        """Run one tool in a workspace of the token's scope, under the same limits as the
        internal API."""
        body = await json_object()
        result = await service.call_tool(body.get("workspace_id"), body.get("tool"),
                                         body.get("arguments", {}), scope=scope())  # fmt: skip
        return jsonify({"tool": body["tool"], "result": result})

    @app.get("/api/tasks")
    @document_querystring(schemas.ListQuery)
    @document_response(schemas.TaskPage)
    async def list_tasks() -> Response:
        """Tasks newest first, one page at a time."""
        cursor = request.args.get("cursor") or None
        limit = query_int("limit", 50)
        records = await service.list(
            workspace_id=request.args.get("workspace_id") or None,
            status=request.args.get("status") or None,
            limit=limit,
            before=None if cursor is None else _decode_cursor(cursor),
            scope=scope(),
        )
        next_cursor = _encode_cursor(records[-1]) if len(records) == limit else None
        response = jsonify(
            {"tasks": [task_json(r, full=False) for r in records], "next_cursor": next_cursor}
        )
        if next_cursor is not None:
            args = request.args.to_dict()
            args.update(cursor=next_cursor, limit=str(limit))
            response.headers["Link"] = (
                f'<{request.path}?{urlencode(sorted(args.items()))}>; rel="next"'
            )
        return response

    @app.get("/api/tasks/<task_id>")
    @document_response(schemas.Task)
    async def get_task(task_id: str) -> Response:
        """The task's record, result included."""
        return jsonify(task_json(await service.get(task_id, scope=scope())))

    @app.post("/api/tasks/<task_id>/cancel")
    @document_response(schemas.Cancelled)
    async def cancel(task_id: str) -> Response:
        """Cancel a queued or running task; a running command is killed with its group."""
        record = await service.cancel(task_id, scope=scope())
        return jsonify({"id": record.id, "status": "cancelled"})

    @app.get("/api/tasks/<task_id>/events")
    async def events(task_id: str) -> Response:
        """The task's events as SSE: history first, then live, until its final status.

        Resume with `Last-Event-ID` (header, or `last_event_id` in the query).
        """
        record = await service.get(task_id, scope=scope())
        after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
        if not EVENT_ID.fullmatch(after):
            raise ValidationError("Last-Event-ID", f"expected an event id such as "
                                                   f"1732400000000-0, got {after[:40]!r}")  # fmt: skip
        first = await service.events(record.id, after)
        if not first and record.status.terminal:
            return Response(b"", status=204)  # over, nothing left to send: EventSource stops
        return await stream_response(_task_frames(service, hub, record.id, after, first))

    return app


async def _task_frames(service: Service, hub: Hub, task_id: str, after: str,
                       pending: list[Any]) -> AsyncIterator[bytes]:  # fmt: skip
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
