"""Tasks: submit, list (newest first, a page at a time), get, cancel; and the JSON of a task
and of an accepted submission, which the clone route answers with too."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from quart import Blueprint, Response, jsonify, request
from quart_schema import (
    document_headers,
    document_querystring,
    document_request,
    document_response,
    operation_id,
    tag_blueprint,
)

from frontend import schemas
from frontend.app import json_body, query_int
from frontend.context import current_scope, current_service
from wsrunner.errors import ValidationError
from wsrunner.models import TaskRecord
from wsrunner.service import Submitted

blueprint = Blueprint("tasks", __name__)
tag_blueprint(blueprint, ["tasks"])


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


def with_idempotency(body: Any) -> Any:
    """The request body with the `Idempotency-Key` header's key in it (they must agree)."""
    key = _idempotency_header()
    if key is not None and isinstance(body, dict):
        if body.get("idempotency_key", key) != key:
            raise ValidationError("idempotency_key", "differs from the Idempotency-Key header")
        body = {**body, "idempotency_key": key}
    return body


def accepted(submitted: Submitted) -> Response:
    """202 with the task's id and where to follow it; `Idempotent-Replayed` on a retry."""
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


@blueprint.post("/api/tasks/submit")
@operation_id("submitTask")
@document_request(schemas.SubmitRequest)
@document_headers(schemas.IdempotencyHeaders)
@document_response(schemas.Accepted, 202, schemas.AcceptedHeaders)
async def submit() -> Response:
    """Queue a task. The durable record is written before the task is queued."""
    body = with_idempotency(await json_body())
    return accepted(await current_service().submit(body, scope=current_scope()))


@blueprint.get("/api/tasks")
@operation_id("listTasks")
@document_querystring(schemas.ListQuery)
@document_response(schemas.TaskPage, 200, schemas.PageHeaders)
async def list_tasks() -> Response:
    """Tasks newest first, one page at a time."""
    cursor = request.args.get("cursor") or None
    limit = query_int("limit", 50)
    records = await current_service().list(
        workspace_id=request.args.get("workspace_id") or None,
        status=request.args.get("status") or None,
        limit=limit,
        before=None if cursor is None else _decode_cursor(cursor),
        scope=current_scope(),
    )
    next_cursor = _encode_cursor(records[-1]) if len(records) == limit else None
    response = jsonify(
        {"tasks": [task_json(r, full=False) for r in records], "next_cursor": next_cursor}
    )
    if next_cursor is not None:
        args = request.args.to_dict()
        args.update(cursor=next_cursor, limit=str(limit))
        response.headers["Link"] = f'<{request.path}?{urlencode(sorted(args.items()))}>; rel="next"'
    return response


@blueprint.get("/api/tasks/<task_id>")
@operation_id("getTask")
@document_response(schemas.Task)
async def get_task(task_id: str) -> Response:
    """The task's record, result included; a queued task says where it stands in line and
    why it is not running (`waiting`)."""
    service = current_service()
    record = await service.get(task_id, scope=current_scope())
    body = task_json(record)
    waiting = await service.waiting(record)
    if waiting is not None:
        body["waiting"] = {"position": waiting.position, "reason": waiting.reason}
    return jsonify(body)


@blueprint.post("/api/tasks/<task_id>/cancel")
@operation_id("cancelTask")
@document_response(schemas.Cancelled)
async def cancel(task_id: str) -> Response:
    """Cancel a queued or running task; a running command is killed with its group."""
    record = await current_service().cancel(task_id, scope=current_scope())
    return jsonify({"id": record.id, "status": "cancelled"})
