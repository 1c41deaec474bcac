"""The interfaces the core depends on, one per role; each backend implements all of them.

A part of the core that needs one role takes that role (the poller a `WorkQueue`, the token
registry a `TokenStore`); `Queue` and `Store` gather the roles one adapter provides, for the
composition root and the parts that coordinate several (the lifecycle, the reaper, the facade).
Redis + PostgreSQL, the embedded queue + SQLite, and the in-memory fakes of `wsrunner.testing`
implement them.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

    from wsrunner.execution.process import Capture
    from wsrunner.execution.steps import StepContext
    from wsrunner.models import (
        JSON,
        ApiToken,
        Claim,
        Credentials,
        Event,
        Held,
        Step,
        TaskRecord,
        TaskSpec,
        TaskState,
        TokenLimits,
        TurnsConfig,
        Waiting,
    )
    from wsrunner.policy import EffectivePolicy
    from wsrunner.workspace.directories import TaskEnvironment
    from wsrunner.workspace.usage import Usage


class Backend(Protocol):
    """What every adapter answers: whether it is reachable, and a hook for its failures."""

    on_error: Callable[[], None] | None

    async def ping(self) -> None: ...


# --- the fast shared state (Redis; the embedded queue) ------------------------------------------


class WorkQueue(Protocol):
    """Priority queues of payloads, and the claims a daemon holds on them until it settles them."""

    async def enqueue(
        self, payload: JSON, *, event_data: JSON, max_running: int | None = None
    ) -> str: ...
    async def requeue_payload(self, payload: JSON) -> None: ...
    async def claim(self, worker_id: str) -> Claim | None: ...
    async def wait_for_work(self) -> bool: ...
    async def ack(self, worker_id: str, claim_id: str) -> None: ...
    async def requeue_claim(self, worker_id: str, claim_id: str, priority: str) -> bool: ...
    async def dead_letter(self, worker_id: str, claim_id: str, reason: str) -> None: ...
    async def inflight(self, worker_id: str) -> dict[str, str]: ...


class Turns(Protocol):
    """What decides which waiting task runs next (`wsrunner.turns`): limits, placement, what
    claims and calls hold, and the line."""

    async def configure(self, config: TurnsConfig) -> bool: ...
    async def reassert(self, held: Sequence[Held]) -> None: ...
    async def steps_over(self, claim_id: str) -> None: ...
    async def hold_workspace(self, workspace_id: str, hold_id: str, ttl_s: float) -> str | None: ...
    async def release_workspace(self, workspace_id: str, hold_id: str) -> None: ...
    async def waiting(
        self, task_id: str, workspace_id: str, token_id: str | None, priority: str
    ) -> Waiting | None: ...
    async def waiting_counts(self) -> dict[str, int]: ...


class StatusMirror(Protocol):
    """What readers see fast: each task's status (written with its event) and queue depths."""

    async def transition(
        self,
        task_id: str,
        workspace_id: str,
        target: TaskState,
        *,
        fields: dict[str, str] | None = None,
        event: JSON | None = None,
        result: JSON | None = None,
        ack: tuple[str, str] | None = None,
        then: tuple[str, JSON] | None = None,
    ) -> tuple[bool, str]: ...
    async def statuses(self, task_ids: Iterable[str]) -> dict[str, str | None]: ...
    async def depths(self) -> dict[str, int]: ...


class EventLog(Protocol):
    """Each task's ordered events, read from any point and waited on."""

    async def emit(self, task_id: str, kind: str, data: JSON) -> str: ...
    async def read_events(
        self, task_id: str, after: str = "0-0", *, block_ms: int | None = None, count: int = 500
    ) -> list[Event]: ...


class Membership(Protocol):
    """Which daemons are alive (heartbeats with a time to live), and what the dead ones ran."""

    async def heartbeat(self, worker_id: str, running: Iterable[str], ttl_s: float) -> None: ...
    async def retire(self, worker_id: str) -> None: ...
    async def dead_workers(self) -> list[str]: ...
    async def forget_worker(self, worker_id: str) -> None: ...
    async def is_alive(self, worker_id: str) -> bool: ...


class CancelBus(Protocol):
    """Cancel requests, broadcast to the daemon that runs the task."""

    async def publish_cancel(self, task_id: str) -> None: ...
    async def serve_cancel_listener(
        self, send: trio.MemorySendChannel[str], *, task_status: Any = ...
    ) -> None: ...


class Queue(Backend, WorkQueue, Turns, StatusMirror, EventLog, Membership, CancelBus, Protocol):
    """Every role of the fast shared state, as one adapter provides them (the composition
    root's view; the parts of the core that need one role take that role)."""


# --- the durable record (PostgreSQL; the embedded SQLite store) ---------------------------------


class TaskRecords(Protocol):
    """The durable record of each task: the arbiter of every state change (compare-and-set)."""

    async def create(
        self, spec: TaskSpec, *, workspace_path: str | None = None
    ) -> tuple[TaskRecord, bool]: ...
    async def transition(
        self,
        task_id: str,
        target: TaskState,
        *,
        worker_id: str | None = None,
        expect_worker: str | None = None,
        result: JSON | None = None,
        error: str | None = None,
        execution_time_ms: int | None = None,
    ) -> TaskRecord: ...
    async def start(self, spec: TaskSpec, *, worker_id: str, workspace_path: str) -> int: ...
    async def finish(
        self,
        task_id: str,
        target: TaskState,
        *,
        worker_id: str,
        result: JSON,
        error: str | None,
        execution_time_ms: int,
    ) -> None: ...
    async def attach_result(self, task_id: str, result: JSON, execution_time_ms: int) -> None: ...
    async def get(self, task_id: str) -> TaskRecord: ...
    async def count_queued(self, token_id: str) -> int: ...
    async def list(
        self,
        *,
        workspace_id: str | None = None,
        workspaces: Sequence[str] | None = None,
        status: TaskState | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
    ) -> builtins.list[TaskRecord]: ...


class RecordLeases(Protocol):
    """The leases of running tasks in the record, the rows a repair pass looks at, and each
    workspace's home host."""

    async def renew_leases(self, worker_id: str, task_ids: Sequence[str]) -> None: ...
    async def expired_running(self, limit: int = 500) -> builtins.list[TaskRecord]: ...
    async def stale_queued(self, age_s: float, limit: int = 1000) -> builtins.list[TaskRecord]: ...
    async def record_home(self, workspace_id: str, host: str) -> None: ...
    async def homes(self) -> dict[str, str]: ...


class TokenStore(Protocol):
    """The public API's bearer tokens, by id, with the SHA-256 digest of their secret."""

    async def create_token(
        self,
        token_id: str,
        name: str,
        secret_sha256: str,
        workspaces: Sequence[str] | None,
        limits: TokenLimits,
    ) -> ApiToken: ...
    async def update_token(self, token_id: str, limits: TokenLimits) -> ApiToken: ...
    async def token_digest(self, token_id: str) -> tuple[ApiToken, str] | None: ...
    async def list_tokens(self) -> builtins.list[ApiToken]: ...
    async def revoke_token(self, token_id: str) -> ApiToken: ...


class Store(Backend, TaskRecords, RecordLeases, TokenStore, Protocol):
    """Every role of the durable record, as one adapter provides them (the composition root's
    view)."""


# --- the runner's own collaborators (the workspace and the step executor) ------------------------


class TaskDirectories(Protocol):
    """A task's directory in its workspace: made at its start, removed at its end."""

    def root(self, workspace_id: str) -> str: ...
    async def check_quota(self, workspace_id: str) -> Usage: ...
    async def open_task(
        self,
        workspace_id: str,
        task_id: str,
        credentials: Credentials | None,
        *,
        clear_leftovers: bool = True,
    ) -> TaskEnvironment: ...
    async def close_task(self, workspace_id: str, task_id: str, *, count: bool) -> list[str]: ...


class PolicySource(Protocol):
    """The command policy in force for a workspace (a task keeps the one it started with)."""

    def for_workspace(self, workspace: str) -> EffectivePolicy: ...


class StepRunner(Protocol):
    """Runs the steps of a task in its directory and describes what a command did."""

    @property
    def policy(self) -> PolicySource: ...
    def context(
        self,
        env: TaskEnvironment,
        workspace_id: str,
        on_output: Any = None,
        policy: EffectivePolicy | None = None,
    ) -> StepContext: ...
    async def run_step(self, step: Step, ctx: StepContext, *, budget_s: float) -> JSON: ...
    def describe(self, capture: Capture, *, exit_code: int | None, duration_ms: int) -> JSON: ...
