"""Errors as RFC 9457 problem details (`application/problem+json`), in one place for both apps.

Every `wsrunner.errors` exception maps to one status and a stable `type` slug; a validation
error also names its field. Anything unexpected is logged with its traceback and answered with
a bare 500 that reveals nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from quart import Quart, Response, current_app, json, request
from werkzeug.exceptions import HTTPException

from wsrunner.errors import (
    AuthenticationError,
    ConflictError,
    IdempotencyConflictError,
    InvalidTransitionError,
    IsolationUnavailableError,
    LimitReachedError,
    NotFoundError,
    PathEscapeError,
    PathNotFoundError,
    PolicyDeniedError,
    PriorityRefusedError,
    QuotaExceededError,
    TooLargeError,
    UnavailableError,
    ValidationError,
    WorkspaceBusyError,
    WorkspaceError,
    WsrunnerError,
)

logger = logging.getLogger(__name__)

MEDIA_TYPE: Final = "application/problem+json"
TYPE_BASE: Final = "https://wsrunner.dev/problems/"
RETRY_AFTER_S: Final = 5
_ERROR_MEMBER: Final = "WSRUNNER_PROBLEM_ERROR_MEMBER"

#: Most specific first: the first class an exception is an instance of decides.
_STATUS: Final[tuple[tuple[type[WsrunnerError], int, str, str], ...]] = (
    (ValidationError, 422, "validation-error", "The request is not valid"),
    (PriorityRefusedError, 403, "priority-refused", "Priority not allowed for this token"),
    (LimitReachedError, 429, "limit-reached", "A limit of this token is reached"),
    (WorkspaceBusyError, 423, "workspace-busy", "The workspace is busy"),
    (AuthenticationError, 401, "unauthenticated", "Authentication required"),
    (PathNotFoundError, 404, "path-not-found", "No such file or directory"),
    (NotFoundError, 404, "not-found", "Not found"),
    (InvalidTransitionError, 409, "invalid-transition", "The task cannot make that change"),
    (IdempotencyConflictError, 409, "idempotency-conflict", "Idempotency key reused"),
    (ConflictError, 409, "conflict", "Conflict"),
    (PathEscapeError, 403, "path-refused", "Path refused"),
    (PolicyDeniedError, 403, "policy-denied", "Denied by the command policy"),
    (
        IsolationUnavailableError,
        503,
        "isolation-unavailable",
        "The sandbox the policy requires is unavailable",
    ),
    (QuotaExceededError, 507, "quota-exceeded", "Storage quota exceeded"),
    (TooLargeError, 413, "too-large", "Too large"),
    (WorkspaceError, 422, "workspace-error", "The workspace operation was refused"),
    (UnavailableError, 503, "unavailable", "Temporarily unavailable"),
)


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    body: dict[str, Any] = {"type": TYPE_BASE + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body["instance"] = request.path
    if current_app.config.get(_ERROR_MEMBER):
        body["error"] = detail or title
    body.update(extra)
    return Response(json.dumps(body), status=status, headers=headers, content_type=MEDIA_TYPE)


def from_error(exc: WsrunnerError) -> Response:
    status, slug, title = next(
        ((st, sl, ti) for cls, st, sl, ti in _STATUS if isinstance(exc, cls)),
        (500, "internal-error", "Internal error"),
    )
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if isinstance(exc, ValidationError):
        extra["errors"] = [{"field": exc.field, "message": exc.message}]
    if isinstance(exc, InvalidTransitionError):
        extra["task_id"] = exc.task_id
        extra["task_status"] = exc.current
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = 'Bearer realm="wsrunner"'
    if isinstance(exc, PolicyDeniedError):
        extra.update(
            rule=exc.details["rule"],
            rule_source=exc.details["source"],
            policy=exc.details["policy"],
        )
    if isinstance(exc, IsolationUnavailableError):
        extra.update(
            required=exc.details["required"],
            available=exc.details["available"],
            missing=exc.details["missing"],
        )
    if isinstance(exc, PriorityRefusedError):
        extra.update(
            errors=[{"field": "priority", "message": exc.message}],
            max_priority=exc.highest,
        )
    if isinstance(exc, LimitReachedError):
        extra.update(limit=exc.limit, value=exc.value)
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, WorkspaceBusyError):
        extra["holder"] = None if exc.holder == "api" else exc.holder
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if isinstance(exc, UnavailableError):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return problem(status, slug, title, str(exc), headers, **extra)


def install(app: Quart, *, error_member: bool = False) -> None:
    """Register the handlers on `app`.

    `error_member` repeats the message under `error`, where the reference system's clients of
    the internal API look for it.
    """
    app.config[_ERROR_MEMBER] = error_member

    @app.errorhandler(WsrunnerError)
    async def on_wsrunner_error(exc: WsrunnerError) -> Response:
        return from_error(exc)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        slug = (exc.name or "error").lower().replace(" ", "-")
        headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
        return problem(status, slug, exc.name or "Error", exc.description, headers)

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        logger.exception("unexpected error serving %s %s", request.method, request.path)
        return problem(500, "internal-error", "Internal error")
