"""The shapes of the HTTP APIs, for the OpenAPI documents only.

Requests are validated by the core (`wsrunner.payload`, `wsrunner.workspace.operations`), which names the
offending field; these models describe the same rules for clients and generated tooling. A test
checks the documents, and the schemathesis run checks real responses against them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

WorkspaceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
Branch = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")]
Priority = Literal["critical", "high", "normal", "low"]
Status = Literal["queued", "running", "completed", "failed", "cancelled", "timed_out"]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(None, max_length=1000)


class ExecuteCommandStep(_Step):
    action: Literal["execute_command"]
    command: str = Field(min_length=1, max_length=65536)
    cwd: str = Field(".", max_length=4096, description="workspace-relative directory")
    timeout: float = Field(120, ge=1, le=3600, description="seconds")


class GitCloneStep(_Step):
    action: Literal["git_clone"]
    repo: str = Field(min_length=1, description="repository URL, without credentials")
    branch: Branch | None = None
    shallow: bool = True


class GitPullStep(_Step):
    action: Literal["git_pull"]
    repo_name: str = Field(min_length=1, max_length=255, description="directory in repos/")
    branch: Branch | None = None


class ReadFileStep(_Step):
    action: Literal["read_file"]
    path: str = Field(min_length=1, max_length=4096)


class WriteFileStep(_Step):
    action: Literal["write_file"]
    path: str = Field(min_length=1, max_length=4096)
    content: str = ""


class ListDirectoryStep(_Step):
    action: Literal["list_directory"]
    path: str = Field(".", max_length=4096)


class CreateDirectoryStep(_Step):
    action: Literal["create_directory"]
    path: str = Field(min_length=1, max_length=4096)


Step = Annotated[
    ExecuteCommandStep
    | GitCloneStep
    | GitPullStep
    | ReadFileStep
    | WriteFileStep
    | ListDirectoryStep
    | CreateDirectoryStep,
    Field(discriminator="action"),
]


class SubmitRequest(BaseModel):
    workspace_id: WorkspaceId
    steps: list[Step] = Field(min_length=1, max_length=100)
    priority: Priority = "normal"
    timeout_seconds: int = Field(300, ge=10, le=3600)
    stop_on_error: bool = False
    idempotency_key: str | None = Field(None, max_length=255)
    correlation_id: str | None = Field(None, max_length=255)


class CloneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repo_url: str = Field(description="https URL on an allowed host, without credentials")
    branch: Branch | None = None
    shallow: bool = True
    priority: Priority = "normal"
    timeout_seconds: int = Field(300, ge=10, le=3600)
    idempotency_key: str | None = Field(None, max_length=255)
    description: str | None = Field(None, max_length=1000)


class IdempotencyHeaders(BaseModel):
    idempotency_key: str | None = Field(
        None,
        alias="Idempotency-Key",
        description="a retry with the same key returns the first task",
    )


class Accepted(BaseModel):
    task_id: str
    status: Status
    events_url: str


class Task(BaseModel):
    id: str
    workspace_id: str
    task_type: str
    status: Status
    priority: Priority
    configuration: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
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


class TaskPage(BaseModel):
    tasks: list[Task]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class ListQuery(BaseModel):
    workspace_id: WorkspaceId | None = None
    status: Status | None = None
    limit: int = Field(50, ge=1, le=500)
    cursor: str | None = None


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


class WriteResult(BaseModel):
    written: bool
    path: str
    size_bytes: int


class ExecRequest(BaseModel):
    command: str = Field(min_length=1, max_length=65536)
    cwd: str = Field(".", max_length=4096)
    timeout: float = Field(120, ge=1, description="seconds; at most exec_timeout_max_s")


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
    operation: Literal["status", "diff", "log", "add", "commit", "checkout", "branch", "fetch",
                       "pull", "push", "clone", "reset", "stash", "show", "blame"]  # fmt: skip
    cwd: str = Field(".", max_length=4096)
    args: str | list[str] | None = Field(
        None, description="a string split like a shell would (no expansion), or a list"
    )
    branch: Branch | None = Field(None, description="clone only")
