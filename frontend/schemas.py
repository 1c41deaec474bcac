"""The shapes of the HTTP APIs, for the OpenAPI documents.

A task's shape is the core's (`wsrunner.taskshape`): the same models validate every submitted
body and queued payload, so the document shows exactly what is accepted. Other requests are
validated by the core by hand (`wsrunner.service`, `wsrunner.workspace.operations`), which names
the offending field; these models describe the same rules for clients and generated tooling.
Responses, headers and Server-Sent Events are described here. A test checks the documents, and
the schemathesis runs check real responses against them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from frontend.sse import EVENT_ID
from wsrunner.models import GitOperation, Priority, TaskState
from wsrunner.taskshape import (
    Branch,
    Description,
    Key,
    Step,
    TaskRequest,
    TaskTimeout,
    WorkspaceId,
)

#: The body of POST /api/tasks/submit: the core's model of a task.
SubmitRequest = TaskRequest
EventId = Annotated[str, Field(pattern=f"^{EVENT_ID.pattern}$", examples=["1732400000000-0"])]
#: Run beside a task or call that holds the workspace instead of waiting for it.
Concurrent = Annotated[
    bool,
    Field(
        description="run beside a task or call that holds the workspace (a tool or git operation "
        "that writes) instead of waiting for it, at most workspace_wait_s, then 423"
    ),
]


class CloneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repo_url: str = Field(description="https URL on an allowed host, without credentials")
    branch: Branch | None = None
    shallow: Annotated[bool, Strict()] = True
    priority: Priority = Priority.NORMAL
    timeout_seconds: TaskTimeout = 300
    idempotency_key: Key | None = None
    description: Description | None = None


class IdempotencyHeaders(BaseModel):
    idempotency_key: str | None = Field(
        None,
        alias="Idempotency-Key",
        description="a retry with the same key returns the first task",
    )


class EventsHeaders(BaseModel):
    last_event_id: EventId | None = Field(
        None, alias="Last-Event-ID", description="resume after this event (EventSource sends it)"
    )


class EventsQuery(BaseModel):
    last_event_id: EventId | None = Field(
        None, description="the same as the Last-Event-ID header, which wins when both are given"
    )


class Accepted(BaseModel):
    task_id: str
    status: TaskState
    events_url: str


class AcceptedHeaders(BaseModel):
    location: str = Field(alias="Location", description="the task: /api/tasks/{task_id}")
    idempotent_replayed: Literal["true"] | None = Field(
        None,
        alias="Idempotent-Replayed",
        description="present on a retry answered with the task its idempotency key made first",
    )


class TaskConfiguration(BaseModel):
    """What the record keeps of a task's request: its steps (URLs without credentials), limits
    and flags; never the credentials themselves."""

    steps: list[Step]
    timeout_seconds: int
    stop_on_error: bool
    has_credentials: bool
    token_id: str | None = Field(None, description="the API token that submitted it")


# --- step results: README's step table ---------------------------------------------------------


class _StepResult(BaseModel):
    error: str | None = Field(None, description="present when the step failed")
    duration_ms: int


class CommandStepResult(_StepResult):
    exit_code: int | None = Field(None, description="-1 when the command was stopped")
    stdout: str | None = Field(None, description="the first bytes, as the policy caps them")
    stderr: str | None = None
    truncated: bool | None = None
    stdout_bytes: int | None = Field(None, description="the whole output's size, when truncated")
    stderr_bytes: int | None = None
    signal: str | None = Field(None, description="the signal that killed it, such as SIGKILL")
    timed_out: bool | None = None
    limits_hit: list[str] | None = Field(
        None, description="memory, pids, cpu, file_size, quota or inode_quota"
    )
    warning: str | None = None
    policy_denied: dict[str, Any] | None = Field(None, description="the rule that denied it")
    isolation_unavailable: dict[str, Any] | None = None


class GitStepResult(CommandStepResult):
    repo_path: str | None = Field(None, description="repos/<name>")
    cached: bool | None = Field(None, description="the clone was there and was pulled")


class ReadFileStepResult(_StepResult):
    path: str | None = None
    content: str | None = None
    size_bytes: int | None = None
    truncated: bool | None = None
    binary: bool | None = None


class WriteFileStepResult(_StepResult):
    written: bool | None = None
    path: str | None = None
    size_bytes: int | None = None


class StepEntry(BaseModel):
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int | None = Field(description="a file's size in bytes; null for anything else")
    modified_at: float


class ListDirectoryStepResult(_StepResult):
    path: str | None = None
    entries: list[StepEntry] | None = None
    count: int | None = None
    truncated: bool | None = None


class CreateDirectoryStepResult(_StepResult):
    created: bool | None = None
    path: str | None = None


class _StepOutcome(BaseModel):
    step: int = Field(ge=1, description="1-based")


class ExecuteCommandOutcome(_StepOutcome):
    action: Literal["execute_command"]
    result: CommandStepResult


class GitCloneOutcome(_StepOutcome):
    action: Literal["git_clone"]
    result: GitStepResult


class GitPullOutcome(_StepOutcome):
    action: Literal["git_pull"]
    result: GitStepResult


class ReadFileOutcome(_StepOutcome):
    action: Literal["read_file"]
    result: ReadFileStepResult


class WriteFileOutcome(_StepOutcome):
    action: Literal["write_file"]
    result: WriteFileStepResult


class ListDirectoryOutcome(_StepOutcome):
    action: Literal["list_directory"]
    result: ListDirectoryStepResult


class CreateDirectoryOutcome(_StepOutcome):
    action: Literal["create_directory"]
    result: CreateDirectoryStepResult


StepOutcome = Annotated[
    ExecuteCommandOutcome
    | GitCloneOutcome
    | GitPullOutcome
    | ReadFileOutcome
    | WriteFileOutcome
    | ListDirectoryOutcome
    | CreateDirectoryOutcome,
    Field(discriminator="action"),
]


class TaskOutcome(BaseModel):
    steps: list[StepOutcome] = Field(description="the steps that ran, in order")
    workspace_id: str
    repos_cached: list[str] = Field(description="repos/ entries after the task")


class TaskResult(BaseModel):
    """A task's end: its state, each step's result, and why it failed."""

    status: TaskState
    result: TaskOutcome | None = Field(None, description="absent when the task never ran")
    execution_time_ms: int | None = None
    completed_at: str | None = None
    error: str | None = None


class Waiting(BaseModel):
    """Where a queued task stands, and why it is not running."""

    position: int = Field(
        description="its place among waiting tasks (1 = next), as if every workspace were free"
    )
    reason: str = Field(
        description="`home host <h> unavailable`, `workspace busy: task <id>`, `workspace busy: "
        "an API call that writes`, `token limit: <n> running` or `no free slot`"
    )


class Task(BaseModel):
    id: str
    workspace_id: str
    task_type: str
    status: TaskState
    priority: Priority
    configuration: TaskConfiguration | None = None
    result: TaskResult | None = None
    submitted_at: str
    started_at: str | None
    completed_at: str | None
    error_message: str | None
    execution_time_ms: int | None
    worker_id: str | None
    attempts: int
    idempotency_key: str | None
    correlation_id: str | None
    cancel_requested: bool
    runner_backend: Literal["queued"]
    events_url: str
    waiting: Waiting | None = Field(None, description="only while it is queued")


class TaskPage(BaseModel):
    tasks: list[Task]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class PageHeaders(BaseModel):
    link: str | None = Field(
        None, alias="Link", description='the next page, as <...>; rel="next", until the last'
    )


class ListQuery(BaseModel):
    workspace_id: WorkspaceId | None = None
    status: TaskState | None = None
    limit: int = Field(50, ge=1, le=500)
    cursor: str | None = None


# --- Server-Sent Events: each event's `data` ---------------------------------------------------


class StatusChanged(BaseModel):
    """The task's state changed; the last one of a stream is a final state."""

    status: TaskState
    worker_id: str | None = Field(None, description="running: the daemon that runs it")
    attempt: int | None = Field(None, description="running: 1, then 2 after a re-queue, ...")
    execution_time_ms: int | None = Field(None, description="a final state: how long it ran")
    error: str | None = None
    reason: str | None = Field(None, description="why it was re-queued or failed by a reaper")


class ProgressUpdate(BaseModel):
    """A step starts."""

    step: int = Field(ge=1)
    total_steps: int
    description: str


class TaskOutput(BaseModel):
    """Output of the running command, in batches."""

    step: int = Field(ge=1)
    stream: Literal["stdout", "stderr"]
    data: str


class TaskError(BaseModel):
    """A step failed (`step`), or the task could not go on."""

    step: int | None = Field(None, ge=1)
    error: str


class ExecOutput(BaseModel):
    """Output of the command, as it comes."""

    stream: Literal["stdout", "stderr"]
    text: str


class ExecError(BaseModel):
    """The command could not run."""

    error: str
    kind: str | None = Field(None, description="the error's class, such as PolicyDeniedError")


class Cancelled(BaseModel):
    id: str
    status: Literal["cancelled"]


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; served as application/problem+json."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None
    task_id: str | None = None
    task_status: str | None = None
    error: str | None = Field(None, description="the message again (internal API only)")
    rule: str | None = Field(None, description="policy-denied: the id of the deciding rule")
    rule_source: str | None = Field(None, description="policy-denied: file:line of that rule")
    policy: str | None = Field(None, description="policy-denied: the policy version (digest)")
    required: str | None = Field(None, description="isolation-unavailable: the policy's level")
    available: str | None = Field(None, description="isolation-unavailable: this host's level")
    missing: list[str] | None = Field(None, description="isolation-unavailable: what is missing")


class ToolDefinition(BaseModel):
    name: str
    description: str
    category: str
    permission: Literal["read", "write"]
    parameters: dict[str, Any] = Field(description="JSON Schema of the arguments")


class ToolList(BaseModel):
    tools: list[ToolDefinition]


class ToolCall(BaseModel):
    workspace_id: WorkspaceId
    tool: str = Field(description="a name from GET /api/tools")
    arguments: dict[str, Any] = Field(default_factory=dict)
    concurrent: Concurrent = False


class ToolResult(BaseModel):
    tool: str
    result: dict[str, Any]


# --- internal API -------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["healthy", "degraded"]
    worker_id: str
    active_tasks: int
    concurrency: int
    volume_path: str
    checks: dict[str, str]


class Live(BaseModel):
    status: Literal["alive"]
    worker_id: str


class Ready(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(description='redis, postgres, volume: "ok" or why not')


class PathQuery(BaseModel):
    path: str = Field(".", max_length=4096)


class RequiredPathQuery(BaseModel):
    path: str = Field(max_length=4096)


class DirEntry(BaseModel):
    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    modified_at: float


class Listing(BaseModel):
    path: str
    entries: list[DirEntry]
    truncated: bool


class FileContent(BaseModel):
    path: str
    name: str
    content: str
    encoding: Literal["utf-8", "base64"]
    binary: bool
    size: int
    language: str
    mime_type: str


class WriteRequest(BaseModel):
    path: str = Field(min_length=1, max_length=4096)
    content: str
    concurrent: Concurrent = False


class WriteResult(BaseModel):
    written: bool
    path: str
    size_bytes: int


class ExecRequest(BaseModel):
    command: str = Field(min_length=1, max_length=65536)
    cwd: str = Field(".", max_length=4096)
    timeout: float = Field(120, ge=1, description="seconds; at most exec_timeout_max_s")
    concurrent: Concurrent = False


class CommandResult(BaseModel):
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: int
    truncated: bool
    error: str | None = None
    timed_out: bool | None = None
    signal: str | None = None
    warning: str | None = None


class ExecExit(CommandResult):
    """The command's result; the last event."""

    stream_dropped_bytes: int | None = Field(
        None, description="output the stream dropped for a slow reader (the result has it all)"
    )


class GrepQuery(BaseModel):
    pattern: str = Field(min_length=1, max_length=1000)
    path: str = Field(".", max_length=4096)
    include: str | None = Field(None, max_length=200)
    max_results: int = Field(50, ge=1, le=200)


class GrepMatch(BaseModel):
    file: str
    line: int
    content: str


class GrepResult(BaseModel):
    pattern: str
    path: str
    matches: list[GrepMatch]
    total: int
    truncated: bool
    engine: Literal["ripgrep", "python"]


class GitRequest(BaseModel):
    operation: GitOperation
    cwd: str = Field(".", max_length=4096)
    args: str | list[str] | None = Field(
        None, description="a string split like a shell would (no expansion), or a list"
    )
    branch: Branch | None = Field(None, description="clone only")
    concurrent: Concurrent = False
