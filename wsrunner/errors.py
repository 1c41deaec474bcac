"""The exception tree of wsrunner; every error the core raises on purpose is one of these.

    WsrunnerError                   root: anything wsrunner raises deliberately
    ├── ConfigError                 a setting is missing, unknown or of the wrong type
    ├── ValidationError             input (a payload, a request body) does not have the expected shape
    ├── AuthenticationError         a missing, malformed, unknown or revoked API token
    ├── NotFoundError               a task or workspace that does not exist (or is not visible)
    ├── ConflictError               the request contradicts the current state
    │   ├── InvalidTransitionError  a lifecycle move the transition table does not allow
    │   │   └── DuplicateTaskError  a task to start has another task's idempotency key
    │   └── IdempotencyConflictError  an idempotency key reused with a different body
    ├── WorkspaceError              a workspace operation was refused
    │   ├── PathEscapeError         a path would leave the workspace
    │   ├── PathNotFoundError       no such file or directory in the workspace
    │   ├── TooLargeError           a file or output is bigger than the cap allows
    │   ├── QuotaExceededError      the workspace is over its storage quota
    │   ├── PolicyDeniedError       the command policy denies the command (names the rule)
    │   └── IsolationUnavailableError  the host cannot give the sandbox the policy requires
    ├── UnavailableError            Redis or PostgreSQL could not be reached
    └── BackendError                a backend answered but refused an operation (a bug, or a
                                    constraint a concurrent write broke); names its error code

Messages say what was expected and what was found. Driver exceptions (redis-py, psycopg,
sqlite3) are translated by the adapters into `UnavailableError` or `BackendError`, never
leaked past them.
"""

from __future__ import annotations


class WsrunnerError(Exception):
    """Root of every error wsrunner raises on purpose."""


class ConfigError(WsrunnerError):
    """A setting is missing, unknown, or does not have the expected type or range."""


class ValidationError(WsrunnerError):
    """Input does not have the expected shape; `field` is the path of the offending value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class AuthenticationError(WsrunnerError):
    """The request carries no valid API token (missing, malformed, unknown or revoked)."""


class NotFoundError(WsrunnerError):
    """The task or workspace does not exist, or the caller may not see it."""


class PriorityRefusedError(WsrunnerError):
    """The caller's token may not submit at the priority asked for."""

    def __init__(self, asked: str, highest: str) -> None:
        self.message = (
            f"this token may submit at {highest} or lower, not {asked}; "
            "an operator grants more with `wsrunner tokens update --max-priority`"
        )
        super().__init__(f"priority: {self.message}")
        self.highest = highest


class LimitReachedError(WsrunnerError):
    """The caller's token has reached one of its limits; `retry_after_s` says when to retry."""

    def __init__(self, limit: str, value: int, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.limit, self.value, self.retry_after_s = limit, value, retry_after_s


class WorkspaceBusyError(WsrunnerError):
    """A call that writes waited its time for a workspace another task or call holds."""

    def __init__(self, workspace_id: str, holder: str, waited_s: float) -> None:
        what = "an API call that writes" if holder == "api" else f"task {holder}"
        super().__init__(
            f"workspace {workspace_id} is busy: {what} holds it (waited {waited_s:g} s); "
            'retry later, or send "concurrent": true to run beside it'
        )
        self.holder = holder


class ConflictError(WsrunnerError):
    """The request contradicts the current state of the task."""


class InvalidTransitionError(ConflictError):
    """The lifecycle does not allow moving from `current` to `target`."""

    def __init__(self, task_id: str, current: str, target: str) -> None:
        super().__init__(f"task {task_id} is {current}; it cannot become {target}")
        self.task_id = task_id
        self.current = current
        self.target = target


class DuplicateTaskError(InvalidTransitionError):
    """The task cannot start: task `original_id` has its workspace and idempotency key."""

    def __init__(self, task_id: str, original_id: str, target: str) -> None:
        super().__init__(
            task_id, f"a duplicate of task {original_id} (same idempotency key)", target
        )
        self.original_id = original_id


class IdempotencyConflictError(ConflictError):
    """An idempotency key was reused with a request body that differs from the first one."""


class WorkspaceError(WsrunnerError):
    """A workspace operation was refused."""


class PathEscapeError(WorkspaceError):
    """A path would resolve outside its workspace (`..`, absolute, or through a symlink)."""


class PathNotFoundError(WorkspaceError):
    """No such file or directory in the workspace (or a component of the path is not a directory)."""


class TooLargeError(WorkspaceError):
    """A file is bigger than the cap of the operation that was asked for."""


class QuotaExceededError(WorkspaceError):
    """The workspace uses more storage than its quota allows."""


class WorkspaceElsewhereError(WorkspaceError):
    """The workspace lives on a host that is gone, and this host's volume does not hold it."""

    def __init__(self, workspace_id: str, home: str, here: str) -> None:
        super().__init__(
            f"workspace {workspace_id} lives on host {home}, which is unavailable (its lease "
            f"ran out); this host ({here}) does not share its volume, so the task was not run "
            "here. Bring the host back and submit again, or set home_unavailable: wait to keep "
            "its tasks queued"
        )


class PolicyDeniedError(WorkspaceError):
    """The command policy denies a command; `details` is the structured error of the step."""

    def __init__(self, details: dict[str, object]) -> None:
        super().__init__(str(details["message"]))
        self.details = details


class IsolationUnavailableError(WorkspaceError):
    """This host cannot isolate commands as well as the policy requires; says what is missing."""

    def __init__(self, required: str, available: str, missing: tuple[str, ...]) -> None:
        what = "; ".join(missing) or "unknown"
        super().__init__(
            f"the policy requires {required} isolation but this host offers only "
            f"{available}: {what}"
        )
        self.details: dict[str, object] = {
            "error": "isolation_unavailable",
            "required": required,
            "available": available,
            "missing": list(missing),
            "message": str(self),
        }


class UnavailableError(WsrunnerError):
    """A backing service (Redis or PostgreSQL) could not be reached or failed."""


class BackendError(WsrunnerError):
    """A backend answered but refused an operation; `code` is its error code (a SQLSTATE)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
