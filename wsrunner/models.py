"""Frozen value types that cross module boundaries: states, steps, task specs, records, events."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias

JSON: TypeAlias = dict[str, Any]


class EncodedJSON(dict[str, Any]):
    """A JSON object that keeps its text, encoded once: a task's result is written by both
    stores, and a megabyte of output costs the event loop about 4 ms each time it is encoded.
    Treat it as frozen: its text does not follow later changes."""

    __slots__ = ("text",)

    def __init__(self, value: JSON) -> None:
        super().__init__(value)
        self.text = json.dumps(value)


def json_text(value: Any) -> str:
    """`json.dumps(value)`; for an EncodedJSON, the text it kept."""
    return value.text if isinstance(value, EncodedJSON) else json.dumps(value)


class TaskState(enum.StrEnum):
    """Where a task is in its lifecycle; the wire values are those of the reference system."""

    QUEUED = "queued"  #: waiting in a priority queue (or claimed, not yet started)
    RUNNING = "running"  #: a daemon is executing its steps
    COMPLETED = "completed"  #: every step succeeded
    FAILED = "failed"  #: a step failed, or the task could not run at all
    CANCELLED = "cancelled"  #: stopped on request, before or while running
    TIMED_OUT = "timed_out"  #: its `timeout_seconds` ran out while running

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES: Final = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED, TaskState.TIMED_OUT}
)

#: The only legal lifecycle moves. Every state write, in PostgreSQL and in Redis, is a
#: compare-and-set against this table, so two racing writers end in exactly one state.
#:
#:   queued ──► running ──► completed | failed | cancelled | timed_out
#:     │  ▲        │
#:     │  └────────┘  (re-queued: daemon shutdown, or its lease expired)
#:     └──► cancelled | failed  (cancelled while queued; unrunnable payload)
TRANSITIONS: Final[Mapping[TaskState, frozenset[TaskState]]] = {
    TaskState.QUEUED: frozenset({TaskState.RUNNING, TaskState.CANCELLED, TaskState.FAILED}),
    TaskState.RUNNING: frozenset(
        {
            TaskState.COMPLETED,
            TaskState.FAILED,
            TaskState.CANCELLED,
            TaskState.TIMED_OUT,
            TaskState.QUEUED,
        }
    ),
    TaskState.COMPLETED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
    TaskState.TIMED_OUT: frozenset(),
}


def sources_of(target: TaskState) -> frozenset[TaskState]:
    """The states from which `target` may be entered."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


class Priority(enum.StrEnum):
    """Queue priority; a higher one is always served first."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


#: Highest first: the order in which the queues are served.
PRIORITY_ORDER: Final = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)


# --- steps ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecuteCommand:
    """Run a shell command (`/bin/sh -c`) in the workspace."""

    command: str
    cwd: str = "."  #: workspace-relative working directory
    timeout: float = 120.0  #: seconds; never beyond what is left of the task's own timeout
    description: str | None = None
    action: str = field(default="execute_command", init=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class GitClone:
    """Clone a repository into `repos/<name>`; an existing clone of the same remote is pulled."""

    repo: str = field(repr=False)  #: may carry a token in the URL; never logged
    branch: str | None = None
    shallow: bool = True
    description: str | None = None
    action: str = field(default="git_clone", init=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class GitPull:
    """Pull an already cloned repository, optionally checking out `branch` first."""

    repo_name: str
    branch: str | None = None
    description: str | None = None
    action: str = field(default="git_pull", init=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadFile:
    """Read a text file of the workspace (capped)."""

    path: str
    description: str | None = None
    action: str = field(default="read_file", init=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteFile:
    """Write a text file, creating its parent directories."""

    path: str
    content: str = field(repr=False)
    description: str | None = None
    action: str = field(default="write_file", init=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListDirectory:
    """List the entries of a directory (capped)."""

    path: str = "."
    description: str | None = None
    action: str = field(default="list_directory", init=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateDirectory:
    """Create a directory and its parents."""

    path: str
    description: str | None = None
    action: str = field(default="create_directory", init=False)


Step: TypeAlias = (
    ExecuteCommand | GitClone | GitPull | ReadFile | WriteFile | ListDirectory | CreateDirectory
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """Secrets injected for one task only and removed when it ends. Never logged or stored."""

    ssh_private_key: str | None = field(default=None, repr=False)
    git_name: str | None = None
    git_email: str | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    """A validated task, as submitted: what to run, where, how urgently, for how long."""

    task_id: str
    workspace_id: str
    steps: tuple[Step, ...]
    priority: Priority = Priority.NORMAL
    timeout_seconds: int = 300
    stop_on_error: bool = False
    task_type: str = "background_job"
    idempotency_key: str | None = None
    correlation_id: str | None = None
    credentials: Credentials | None = None
    #: the public API token that submitted it (the tenant it counts against); None for a
    #: producer that pushes payloads itself (the workspace is its tenant)
    token_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRecord:
    """The durable record of a task, as PostgreSQL holds it."""

    id: str
    workspace_id: str
    status: TaskState
    priority: Priority
    task_type: str
    configuration: JSON  #: steps, timeout and flags; never credentials
    submitted_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    result: JSON | None = None
    error_message: str | None = None
    execution_time_ms: int | None = None
    worker_id: str | None = None
    attempts: int = 0
    idempotency_key: str | None = None
    correlation_id: str | None = None
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One entry of a task's event stream; `id` is the Redis stream id (resume point)."""

    id: str
    type: str  #: status_changed, progress_update, error or output
    task_id: str
    data: JSON
    timestamp: str  #: ISO 8601, UTC

    def envelope(self) -> JSON:
        """The reference system's pub/sub envelope, so its subscribers read ours unchanged."""
        return {
            "event_type": self.type,
            "task_id": self.task_id,
            "data": self.data,
            "timestamp": self.timestamp,
        }


@dataclass(frozen=True, slots=True)
class Claim:
    """A payload taken from a queue and recorded against this daemon until acknowledged."""

    claim_id: str  #: "<priority>:<n>", the field in the daemon's in-flight hash
    payload: str  #: raw JSON, exactly as the producer pushed it
    #: how long its workspace had been found full while it waited (None: never)
    workspace_wait_s: float | None = None
    #: '' (its home is here, or shared), 'new' (first use: here now), 'moved:<host>' (taken
    #: over from a gone host, shared volume) or 'gone:<host>' (its home is gone: fail it)
    placement: str = ""
    #: the workspace the claim holds, as the queue read the payload (None: it holds nothing)
    workspace_id: str | None = None

    @property
    def priority(self) -> str:
        return self.claim_id.split(":", 1)[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class Waiting:
    """Where a queued task stands in line, and what holds it back."""

    position: int  #: its place (1 = next) among waiting tasks, as if every workspace were free
    workspace_holder: str | None  #: the task holding its workspace, while that is full
    running: int  #: its tenant's claims held now
    token_limit: int | None  #: its token's `max_running`, if it has one
    home_gone: str | None = None  #: its workspace's home host, when that host is gone

    @property
    def reason(self) -> str:
        if self.home_gone:
            return f"home host {self.home_gone} unavailable"
        if self.workspace_holder == "api":
            return "workspace busy: an API call that writes"
        if self.workspace_holder is not None:
            return f"workspace busy: task {self.workspace_holder or 'unknown'}"
        if self.token_limit is not None and self.running >= self.token_limit:
            return f"token limit: {self.running} running"
        return "no free slot"

    @property
    def kind(self) -> str:
        """The reason's label in metrics."""
        if self.home_gone:
            return "home_unavailable"
        return self.reason.split(":", 1)[0].replace(" ", "_")


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnsConfig:
    """What the claim rules (`wsrunner.turns`) take from the settings and the durable record;
    every daemon sets it at start and again at each reconcile pass."""

    workspace_limit: int = 1  #: tasks and calls that write, per workspace, at once
    workspace_limits: Mapping[str, int] = field(default_factory=dict)  #: ... per workspace
    host: str = ""  #: the host whose volume the daemon serves ("": it places nothing)
    volume_shared: bool = False
    home_unavailable: str = "fail"  #: or "wait"
    homes: Mapping[str, str] = field(default_factory=dict)  #: workspace -> home host, known
    token_limits: Mapping[str, int | None] = field(default_factory=dict)  #: max_running


@dataclass(frozen=True, slots=True)
class Held:
    """What a running task's claim holds: its workspace and its tenant."""

    claim_id: str
    workspace_id: str
    token_id: str | None
    task_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLimits:
    """What a public API token may ask of the queue."""

    max_priority: Priority = Priority.HIGH  #: `critical` only when granted
    max_running: int | None = None  #: of its tasks at once, on all daemons (None: no limit)
    max_queued: int | None = None  #: of its tasks waiting (None: no limit)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiToken:
    """A bearer token of the public API, as stored (the secret itself is never kept)."""

    id: str
    name: str
    workspaces: tuple[str, ...] | None  #: None: every workspace
    limits: TokenLimits = TokenLimits()
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    def allows(self, workspace_id: str) -> bool:
        return self.workspaces is None or workspace_id in self.workspaces


#: Operations of the internal git endpoint (the reference system's, plus reset).
GitOperation: TypeAlias = Literal[
    "status",
    "diff",
    "log",
    "add",
    "commit",
    "checkout",
    "branch",
    "fetch",
    "pull",
    "push",
    "clone",
    "reset",
    "stash",
    "show",
    "blame",
]
