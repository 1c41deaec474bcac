"""In-memory fakes of wsrunner's ports and of what a TaskRunner runs steps with, for unit tests.

`MemoryStore` and `MemoryQueue` implement `wsrunner.ports.Store` and `wsrunner.ports.Queue` in
plain dicts, with the rules of the real adapters: every state write is a compare-and-set against
`models.TRANSITIONS` that raises (store) or refuses (queue) as PostgreSQL and Redis do; claims
stay in a daemon's in-flight map until acknowledged; leases and heartbeats expire. Time is
trio's clock, so under `trio.testing.MockClock(autojump_threshold=0)` a 60 s lease runs out at
once and deterministically. There are no threads and no I/O: each call is one checkpoint (its
round trip; `latency` seconds of trio time if set, to widen a race window) and then one atomic
change, as a single statement or Lua script is.

`FakeWorkspaces` and `FakeExecutor` stand in for the task directories and the step executor a
`TaskRunner` is built with. A command step is a small script played in trio time:
`ExecuteCommand(command="echo hi; sleep 5; exit 3")` prints, waits five seconds, and fails.

    store, queue = MemoryStore(), MemoryQueue()
    runner = TaskRunner(settings, queue, store, FakeWorkspaces(), FakeExecutor())
"""

from __future__ import annotations

import builtins
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import trio

from wsrunner.errors import (
    DuplicateTaskError,
    InvalidTransitionError,
    NotFoundError,
    QuotaExceededError,
)
from wsrunner.models import (
    JSON,
    PRIORITY_ORDER,
    ApiToken,
    Claim,
    Credentials,
    Event,
    ExecuteCommand,
    Step,
    TaskRecord,
    TaskSpec,
    TaskState,
    json_text,
    sources_of,
)
from wsrunner.payload import check_idempotent_replay, request_hash, to_configuration
from wsrunner.ports import Queue, Store
from wsrunner.workspace.directories import TaskEnvironment

WAKE_BLOCK_S: Final = 5.0  #: longest `wait_for_work()`, as the Redis queue's BLMOVE block


class _Clock:
    """Datetimes that advance with trio's clock: under a MockClock, record timestamps and lease
    expiry move together, starting from the wall-clock time of the first call."""

    def __init__(self) -> None:
        self._origin: datetime | None = None

    def now(self) -> datetime:
        if self._origin is None:
            self._origin = datetime.now(UTC) - timedelta(seconds=trio.current_time())
        return self._origin + timedelta(seconds=trio.current_time())


def _copy(value: JSON) -> JSON:
    """What a database would hand back: a fresh, plain copy of the JSON written."""
    copied: JSON = json.loads(json_text(value))
    return copied


async def _round_trip(latency: float) -> None:
    """The time a call takes to reach its server; a cancellation here means it never did."""
    if latency > 0:
        await trio.sleep(latency)
    else:
        await trio.lowlevel.checkpoint()


# --- the durable store ------------------------------------------------------------------------


@dataclass(slots=True)
class _Row:
    """A task_executions row: the record, plus the columns a TaskRecord does not show."""

    record: TaskRecord
    updated_at: datetime
    lease_expires_at: datetime | None = None
    request_hash: str | None = None
    workspace_path: str | None = None


class MemoryStore:
    """The `Store` port in memory, with the PostgreSQL store's rules (`sql/queries.sql`)."""

    def __init__(self, *, lease_s: float = 60.0, latency: float = 0.0) -> None:
        self.lease_s = lease_s  #: a running task's lease, renewed by `renew_leases`
        self.latency = latency  #: trio seconds each call takes before it acts
        self.on_error: Callable[[], None] | None = None  #: nothing here fails
        self._rows: dict[str, _Row] = {}
        self._tokens: dict[str, tuple[ApiToken, str]] = {}
        self._clock = _Clock()

    async def ping(self) -> None:
        await _round_trip(self.latency)

    # --- the transition rule: one place ------------------------------------------------------

    def _movable(self, task_id: str, target: TaskState, expect_worker: str | None) -> _Row:
        """The row, if the lifecycle (and `expect_worker`, when given) allows `target`.

        Raises:
            NotFoundError: no task has this id.
            InvalidTransitionError: its state, or its owner, does not allow the move.
        """
        row = self._rows.get(task_id)
        if row is None:
            raise NotFoundError(f"no task with id {task_id}")
        rec = row.record
        if rec.status not in sources_of(target) or (
            expect_worker is not None and rec.worker_id != expect_worker
        ):
            raise InvalidTransitionError(task_id, rec.status.value, target.value)
        return row

    def _move(self, row: _Row, target: TaskState, *, worker_id: str | None = None,
              result: JSON | None = None, error: str | None = None,
              execution_time_ms: int | None = None) -> None:  # fmt: skip
        """Write an allowed move as the `transition` statement does."""
        now, rec = self._clock.now(), row.record
        running = target is TaskState.RUNNING
        row.record = replace(
            rec,
            status=target,
            started_at=now if running else rec.started_at,
            completed_at=now if target.terminal else rec.completed_at,
            worker_id=worker_id or rec.worker_id,
            attempts=rec.attempts + running,
            result=rec.result if result is None else _copy(result),
            error_message=rec.error_message if error is None else error,
            execution_time_ms=rec.execution_time_ms if execution_time_ms is None
            else execution_time_ms,
            cancel_requested=rec.cancel_requested or target is TaskState.CANCELLED,
        )  # fmt: skip
        row.updated_at = now
        row.lease_expires_at = now + timedelta(seconds=self.lease_s) if running else None

    # --- writes -------------------------------------------------------------------------------

    def _by_key(self, workspace_id: str, key: str | None) -> _Row | None:
        if key is None:
            return None
        return next((r for r in self._rows.values() if r.record.workspace_id == workspace_id
                     and r.record.idempotency_key == key), None)  # fmt: skip

    def _insert(self, spec: TaskSpec, workspace_path: str | None) -> _Row:
        now = self._clock.now()
        configuration = to_configuration(spec)
        row = _Row(
            TaskRecord(id=spec.task_id, workspace_id=spec.workspace_id, status=TaskState.QUEUED,
                       priority=spec.priority, task_type=spec.task_type,
                       configuration=_copy(configuration), submitted_at=now,
                       idempotency_key=spec.idempotency_key, correlation_id=spec.correlation_id),
            updated_at=now, request_hash=request_hash(spec, configuration),
            workspace_path=workspace_path,
        )  # fmt: skip
        self._rows[spec.task_id] = row
        return row

    async def create(
        self, spec: TaskSpec, *, workspace_path: str | None = None
    ) -> tuple[TaskRecord, bool]:
        """Insert the `queued` record; an id or idempotency key already there returns that
        task and False (IdempotencyConflictError if the same key came with another request)."""
        await _round_trip(self.latency)
        first = self._by_key(spec.workspace_id, spec.idempotency_key) or self._rows.get(
            spec.task_id
        )
        if first is None:
            return self._insert(spec, workspace_path).record, True
        digest = request_hash(spec, to_configuration(spec))
        check_idempotent_replay(spec, digest, {"id": first.record.id,
                                               "idempotency_key": first.record.idempotency_key,
                                               "request_hash": first.request_hash})  # fmt: skip
        return first.record, False

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
    ) -> TaskRecord:
        await _round_trip(self.latency)
        row = self._movable(task_id, target, expect_worker)
        self._move(row, target, worker_id=worker_id, result=result, error=error,
                   execution_time_ms=execution_time_ms)  # fmt: skip
        return row.record

    async def start(self, spec: TaskSpec, *, worker_id: str, workspace_path: str) -> int:
        """`queued` to `running` (the record written first if its producer wrote none); the
        attempt number."""
        await _round_trip(self.latency)
        if spec.task_id not in self._rows:
            first = self._by_key(spec.workspace_id, spec.idempotency_key)
            if first is not None:
                raise DuplicateTaskError(spec.task_id, first.record.id, TaskState.RUNNING.value)
            self._insert(spec, workspace_path)
        row = self._movable(spec.task_id, TaskState.RUNNING, None)
        self._move(row, TaskState.RUNNING, worker_id=worker_id)
        return row.record.attempts

    async def finish(self, task_id: str, target: TaskState, *, worker_id: str, result: JSON,
                     error: str | None, execution_time_ms: int) -> None:  # fmt: skip
        """The end of a run, by the daemon holding the task (InvalidTransitionError if it no
        longer does: cancelled, or taken over)."""
        await _round_trip(self.latency)
        row = self._movable(task_id, target, worker_id)
        self._move(row, target, result=result, error=error, execution_time_ms=execution_time_ms)

    async def attach_result(self, task_id: str, result: JSON, execution_time_ms: int) -> None:
        await _round_trip(self.latency)
        row = self._rows.get(task_id)
        if row is not None and row.record.result is None:
            ms = row.record.execution_time_ms
            row.record = replace(row.record, result=_copy(result),
                                 execution_time_ms=execution_time_ms if ms is None else ms)  # fmt: skip
            row.updated_at = self._clock.now()

    async def renew_leases(self, worker_id: str, task_ids: Sequence[str]) -> None:
        await _round_trip(self.latency)
        lease = self._clock.now() + timedelta(seconds=self.lease_s)
        for tid in task_ids:
            rec = self._rows[tid].record if tid in self._rows else None
            if rec is not None and rec.worker_id == worker_id and rec.status is TaskState.RUNNING:
                self._rows[tid].lease_expires_at = lease

    # --- reads --------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord:
        await _round_trip(self.latency)
        row = self._rows.get(task_id)
        if row is None:
            raise NotFoundError(f"no task with id {task_id}")
        return row.record

    async def expired_running(self, limit: int = 500) -> builtins.list[TaskRecord]:
        await _round_trip(self.latency)
        now = self._clock.now()
        rows = [r for r in self._rows.values() if r.record.status is TaskState.RUNNING
                and r.lease_expires_at is not None and r.lease_expires_at < now]  # fmt: skip
        rows.sort(key=lambda r: r.lease_expires_at or now)
        return [r.record for r in rows[:limit]]

    async def stale_queued(self, age_s: float, limit: int = 1000) -> builtins.list[TaskRecord]:
        await _round_trip(self.latency)
        cutoff = self._clock.now() - timedelta(seconds=age_s)
        rows = [r.record for r in self._rows.values()
                if r.record.status is TaskState.QUEUED and r.updated_at < cutoff]  # fmt: skip
        return sorted(rows, key=lambda rec: rec.submitted_at)[:limit]

    async def list(
        self,
        *,
        workspace_id: str | None = None,
        workspaces: Sequence[str] | None = None,
        status: TaskState | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
    ) -> builtins.list[TaskRecord]:
        """Newest first, by (submitted_at, id); `before` is the last of the previous page."""
        await _round_trip(self.latency)
        found = [
            r.record for r in self._rows.values()
            if (workspace_id is None or r.record.workspace_id == workspace_id)
            and (workspaces is None or r.record.workspace_id in workspaces)
            and (status is None or r.record.status is status)
            and (before is None or (r.record.submitted_at, r.record.id) < before)
        ]  # fmt: skip
        found.sort(key=lambda rec: (rec.submitted_at, rec.id), reverse=True)
        return found[:limit]

    # --- API tokens ---------------------------------------------------------------------------

    async def create_token(
        self, token_id: str, name: str, secret_sha256: str, workspaces: Sequence[str] | None
    ) -> ApiToken:
        await _round_trip(self.latency)
        if token_id in self._tokens:
            raise ValueError(f"an API token with id {token_id!r} exists already")
        token = ApiToken(id=token_id, name=name, created_at=self._clock.now(),
                         workspaces=None if workspaces is None else tuple(workspaces))  # fmt: skip
        self._tokens[token_id] = (token, secret_sha256)
        return token

    async def token_digest(self, token_id: str) -> tuple[ApiToken, str] | None:
        """The token and its digest, or None; marks it used (at most once a minute)."""
        await _round_trip(self.latency)
        found = self._tokens.get(token_id)
        if found is None:
            return None
        token, digest = found
        now = self._clock.now()
        if token.revoked_at is None and (
            token.last_used_at is None or token.last_used_at < now - timedelta(minutes=1)
        ):
            self._tokens[token_id] = (replace(token, last_used_at=now), digest)
        return token, digest  # as read, before the touch (like the SELECT then UPDATE)

    async def list_tokens(self) -> builtins.list[ApiToken]:
        await _round_trip(self.latency)
        return sorted((t for t, _ in self._tokens.values()), key=lambda t: (t.created_at, t.id))

    async def revoke_token(self, token_id: str) -> ApiToken:
        await _round_trip(self.latency)
        if token_id not in self._tokens:
            raise NotFoundError(f"no API token with id {token_id!r}")
        token, digest = self._tokens[token_id]
        token = replace(token, revoked_at=token.revoked_at or self._clock.now())
        self._tokens[token_id] = (token, digest)
        return token


# --- the fast shared state --------------------------------------------------------------------


def _event_seq(event_id: str) -> int:
    return int(event_id.split("-", 1)[0])


class MemoryQueue:
    """The `Queue` port in memory, with the Redis queue's rules.

    Each priority is a deque served from its left end: new payloads join on the right, and a
    re-queued one (a claim given back, a payload rebuilt by the reconciler) goes to the left, so
    it is served next. The status mirror keeps ended tasks, and a move to the state a task is
    already in applies, as the TRANSITION script does. Event ids are `<n>-0`, one count for all
    streams, so ids of one task increase like Redis stream ids. `dead` holds the dead letters.
    """

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency  #: trio seconds each call takes before it acts
        self.on_error: Callable[[], None] | None = None  #: nothing here fails
        self._queues: dict[str, deque[str]] = {p.value: deque() for p in PRIORITY_ORDER}
        self._inflight: dict[str, dict[str, str]] = {}
        self._claims = 0
        self._status: dict[str, dict[str, str]] = {}
        self._results: dict[str, JSON] = {}
        self._events: dict[str, list[Event]] = {}
        self._event_count = 0
        self._grown: dict[str, trio.Event] = {}  # set when that task's stream grows
        self._work = trio.Event()  # set (and replaced) when a payload is pushed
        self._workers: set[str] = set()  # registered by a heartbeat, until retired or forgotten
        self._heartbeats: dict[str, float] = {}  # worker: trio time its heartbeat expires
        self._cancel_listeners: list[trio.MemorySendChannel[str]] = []
        self._clock = _Clock()
        self.dead: list[JSON] = []  #: payloads that cannot run, with the reason

    async def ping(self) -> None:
        await _round_trip(self.latency)

    # --- submit and claims --------------------------------------------------------------------

    def _push(self, payload: JSON, *, next_up: bool) -> None:
        queue = self._queues[payload["priority"]]
        raw = json.dumps(payload)
        queue.appendleft(raw) if next_up else queue.append(raw)
        self._wake_pollers()

    def _wake_pollers(self) -> None:
        self._work.set()
        self._work = trio.Event()

    async def enqueue(self, payload: JSON, *, event_data: JSON) -> str:
        """Queue a new task with its status and `queued` event; the event's id."""
        await _round_trip(self.latency)
        tid = payload["task_id"]
        self._status[tid] = {"status": TaskState.QUEUED.value,
                             "workspace_id": payload["workspace_id"],
                             "submitted_at": self._clock.now().isoformat(),
                             "priority": payload["priority"],
                             "task_type": payload.get("task_type", "background_job")}  # fmt: skip
        event_id = self._append(tid, "status_changed", event_data)
        self._push(payload, next_up=False)
        return event_id

    async def requeue_payload(self, payload: JSON) -> None:
        await _round_trip(self.latency)
        self._status.setdefault(payload["task_id"], {}).update(
            status=TaskState.QUEUED.value, workspace_id=payload["workspace_id"],
            priority=payload["priority"])  # fmt: skip
        self._push(payload, next_up=True)

    async def claim(self, worker_id: str) -> Claim | None:
        """The next payload (strict priority, oldest first), leased to `worker_id`."""
        await _round_trip(self.latency)
        for priority in PRIORITY_ORDER:
            queue = self._queues[priority.value]
            if queue:
                self._claims += 1
                claim = Claim(f"{priority.value}:{self._claims}", queue.popleft())
                self._inflight.setdefault(worker_id, {})[claim.claim_id] = claim.payload
                return claim
        return None

    async def wait_for_work(self) -> bool:
        """True once some queue holds a payload; False after WAKE_BLOCK_S without one."""
        await _round_trip(self.latency)
        if not any(self._queues.values()):
            with trio.move_on_after(WAKE_BLOCK_S):
                await self._work.wait()
        return any(self._queues.values())

    async def ack(self, worker_id: str, claim_id: str) -> None:
        await _round_trip(self.latency)
        self._inflight.get(worker_id, {}).pop(claim_id, None)

    async def requeue_claim(self, worker_id: str, claim_id: str, priority: str) -> bool:
        """Move a claim back to the head of its queue; False if `worker_id` does not hold it."""
        await _round_trip(self.latency)
        raw = self._inflight.get(worker_id, {}).pop(claim_id, None)
        if raw is None:
            return False
        self._queues[priority].appendleft(raw)
        self._wake_pollers()
        return True

    async def dead_letter(self, worker_id: str, claim_id: str, reason: str) -> None:
        await _round_trip(self.latency)
        raw = self._inflight.get(worker_id, {}).pop(claim_id, None)
        if raw is not None:
            self.dead.append({"payload": raw, "reason": reason, "worker_id": worker_id,
                              "dead_lettered_at": self._clock.now().isoformat()})  # fmt: skip

    async def inflight(self, worker_id: str) -> dict[str, str]:
        await _round_trip(self.latency)
        return dict(self._inflight.get(worker_id, {}))

    # --- status mirror and events -------------------------------------------------------------

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
    ) -> tuple[bool, str]:
        """Compare-and-set the mirror; if applied, also emit `event`, keep `result` and ack.
        The event `then` (kind, data) follows either way. (applied, event id or current status).

        A task the mirror does not know accepts any move: the store has already decided it.
        """
        await _round_trip(self.latency)
        current = self._status.get(task_id, {}).get("status")
        allowed = {target.value, *(s.value for s in sources_of(target))}
        if current is not None and current not in allowed:
            applied, out = False, current
        else:
            self._status.setdefault(task_id, {}).update(fields or {}, status=target.value)
            out = "" if event is None else self._append(task_id, "status_changed", event)
            if result is not None:
                self._results[task_id] = _copy(result)
            if ack is not None:
                self._inflight.get(ack[0], {}).pop(ack[1], None)
            applied = True
        if then is not None:
            self._append(task_id, *then)
        return applied, out

    def _append(self, task_id: str, kind: str, data: JSON) -> str:
        self._event_count += 1
        event = Event(id=f"{self._event_count}-0", type=kind, task_id=task_id, data=_copy(data),
                      timestamp=self._clock.now().isoformat())  # fmt: skip
        self._events.setdefault(task_id, []).append(event)
        grown = self._grown.pop(task_id, None)
        if grown is not None:
            grown.set()
        return event.id

    async def emit(self, task_id: str, kind: str, data: JSON) -> str:
        await _round_trip(self.latency)
        return self._append(task_id, kind, data)

    async def read_events(
        self, task_id: str, after: str = "0-0", *, block_ms: int | None = None, count: int = 500
    ) -> list[Event]:
        """Events after `after`, oldest first; with `block_ms`, wait that long for one."""
        await _round_trip(self.latency)

        def newer() -> list[Event]:
            seq = _event_seq(after)
            return [e for e in self._events.get(task_id, []) if _event_seq(e.id) > seq][:count]

        found = newer()
        if not found and block_ms is not None:
            with trio.move_on_after(block_ms / 1000):
                await self._grown.setdefault(task_id, trio.Event()).wait()
            found = newer()
        return found

    async def depths(self) -> dict[str, int]:
        await _round_trip(self.latency)
        return {p: len(q) for p, q in self._queues.items()}

    async def statuses(self, task_ids: Iterable[str]) -> dict[str, str | None]:
        await _round_trip(self.latency)
        return {t: self._status.get(t, {}).get("status") for t in task_ids}

    # --- for tests: what the mirror holds, beyond what the port reads -------------------------

    def mirrored(self, task_id: str) -> dict[str, str]:
        """The task's status hash: its status and the fields written with it."""
        return dict(self._status.get(task_id, {}))

    def mirrored_result(self, task_id: str) -> JSON | None:
        """The result the mirror keeps for the reference system's readers."""
        found = self._results.get(task_id)
        return None if found is None else _copy(found)

    # --- daemons ------------------------------------------------------------------------------

    async def heartbeat(self, worker_id: str, running: Iterable[str], ttl_s: float) -> None:
        """Register `worker_id` and renew its heartbeat for `ttl_s`, in whole seconds as the
        Redis key's TTL (at least 1)."""
        await _round_trip(self.latency)
        self._workers.add(worker_id)
        self._heartbeats[worker_id] = trio.current_time() + max(1, math.ceil(ttl_s))

    def _alive(self, worker_id: str) -> bool:
        return self._heartbeats.get(worker_id, -math.inf) > trio.current_time()

    async def retire(self, worker_id: str) -> None:
        await _round_trip(self.latency)
        self._heartbeats.pop(worker_id, None)
        self._workers.discard(worker_id)

    async def dead_workers(self) -> list[str]:
        """Registered daemons whose heartbeat has expired."""
        await _round_trip(self.latency)
        return sorted(w for w in self._workers if not self._alive(w))

    async def is_alive(self, worker_id: str) -> bool:
        await _round_trip(self.latency)
        return self._alive(worker_id)

    async def forget_worker(self, worker_id: str) -> None:
        """Unregister a dead daemon once it holds no claims."""
        await _round_trip(self.latency)
        if not self._inflight.get(worker_id):
            self._workers.discard(worker_id)

    # --- cancellation -------------------------------------------------------------------------

    async def publish_cancel(self, task_id: str) -> None:
        """Tell every listener, as pub/sub does: a listener that cannot take it misses it."""
        await _round_trip(self.latency)
        for send in list(self._cancel_listeners):
            try:
                send.send_nowait(task_id)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # as with Redis pub/sub; the cancel watch's sweep is the backstop

    async def serve_cancel_listener(
        self, send: trio.MemorySendChannel[str], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._cancel_listeners.append(send)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._cancel_listeners.remove(send)


# --- task directories and steps -----------------------------------------------------------------


class FakeWorkspaces:
    """Task directories as a set of (workspace, task) pairs: what `TaskRunner` asks of
    `wsrunner.workspace.directories.Workspaces`. `full` workspaces fail the quota check."""

    def __init__(self, volume: str = "/workspaces") -> None:
        self.volume = volume
        self.open: set[tuple[str, str]] = set()  #: task directories that exist now
        self.opened = 0  #: task directories made so far
        self.full: set[str] = set()  #: workspaces at their quota

    def root(self, workspace_id: str) -> str:
        return f"{self.volume}/{workspace_id}"

    async def check_quota(self, workspace_id: str) -> None:
        await trio.lowlevel.checkpoint()
        if workspace_id in self.full:
            raise QuotaExceededError(f"workspace {workspace_id} is at its storage quota")

    async def open_task(self, workspace_id: str, task_id: str, credentials: Credentials | None,
                        *, clear_leftovers: bool = True) -> TaskEnvironment:  # fmt: skip
        """The task's directory; one already there is replaced, or with `clear_leftovers`
        false raises FileExistsError (it may be a running duplicate's)."""
        await trio.lowlevel.checkpoint()
        if (workspace_id, task_id) in self.open and not clear_leftovers:
            raise FileExistsError(f"tasks/{task_id} exists in workspace {workspace_id}")
        self.open.add((workspace_id, task_id))
        self.opened += 1
        root = self.root(workspace_id)
        return TaskEnvironment(root=root, task_dir=f"{root}/tasks/{task_id}",
                               env={"WORKSPACE_ID": workspace_id, "TASK_ID": task_id})  # fmt: skip

    async def close_task(self, workspace_id: str, task_id: str, *, count: bool) -> list[str]:
        """Remove the task's directory; the cached repositories (none here)."""
        await trio.lowlevel.checkpoint()
        self.open.discard((workspace_id, task_id))
        return []


@dataclass(slots=True)
class FakeCapture:
    """What the command running now has printed."""

    stdout: str = ""
    stderr: str = ""


@dataclass(slots=True)
class FakeStepContext:
    """Where a task's steps run (the part of `StepContext` the runner reads)."""

    env: TaskEnvironment
    workspace_id: str
    on_output: Callable[[str, bytes], bool] | None = None
    capture: FakeCapture | None = None  #: set while a command runs, kept if it is interrupted


class FakePolicy:
    """The one policy every workspace gets: the runner only logs its digest."""

    digest = "fake-policy"

    def for_workspace(self, workspace_id: str) -> FakePolicy:
        return self


@dataclass(slots=True)
class StepRun:
    """One step the FakeExecutor ran: when (trio time) and how it ended."""

    task_id: str
    command: str | None  #: None for a step that is not a command
    started_at: float
    ended_at: float | None = None
    outcome: str = "running"  #: "exit <n>", "timed out" or "interrupted" (cancelled)


class FakeExecutor:
    """Runs steps as `wsrunner.execution.steps.Executor` does, without processes.

    A command is `;`-separated words played in trio time: `sleep <s>`, `echo <text>` (a line of
    output), `exit <n>` (ends the command), `true`, `false`; its exit code is the last one's.
    The step's `timeout` (or what is left of the task's, if less) stops it as a timed-out,
    failed step; a cancellation (the task's timeout, a cancel request, a shutdown) propagates
    with what was printed kept in `ctx.capture`. Any other step succeeds at once.
    `runs` lists every step started; `peak` is the most that ran at once.
    """

    def __init__(self) -> None:
        self.policy = FakePolicy()
        self.runs: list[StepRun] = []
        self.active = 0  #: steps running now
        self.peak = 0

    def context(self, env: TaskEnvironment, workspace_id: str,
                on_output: Callable[[str, bytes], bool] | None = None,
                policy: FakePolicy | None = None) -> FakeStepContext:  # fmt: skip
        return FakeStepContext(env, workspace_id, on_output)

    async def run_step(self, step: Step, ctx: FakeStepContext, *, budget_s: float) -> JSON:
        command = step.command if isinstance(step, ExecuteCommand) else None
        run = StepRun(ctx.env.task_dir.rsplit("/", 1)[-1], command, trio.current_time())
        self.runs.append(run)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if not isinstance(step, ExecuteCommand):
                await trio.lowlevel.checkpoint()
                run.outcome = "exit 0"
                return {"duration_ms": 0}
            return await self._command(step, ctx, min(step.timeout, budget_s), run)
        finally:
            self.active -= 1
            if run.ended_at is None:
                run.ended_at, run.outcome = trio.current_time(), "interrupted"

    async def _command(self, step: ExecuteCommand, ctx: FakeStepContext, limit_s: float,
                       run: StepRun) -> JSON:  # fmt: skip
        ctx.capture = capture = FakeCapture()
        exit_code = 0
        with trio.move_on_after(limit_s) as limit:
            for part in filter(None, (p.strip() for p in step.command.split(";"))):
                word, _, arg = part.partition(" ")
                if word == "sleep":
                    await trio.sleep(float(arg))
                    exit_code = 0
                elif word == "echo":
                    self._print(ctx, capture, arg + "\n")
                    exit_code = 0
                elif word in ("true", "false"):
                    exit_code = int(word == "false")
                elif word == "exit":
                    exit_code = int(arg or 0)
                    break
                else:
                    raise ValueError(f"FakeExecutor plays sleep, echo, exit, true and false; "
                                     f"not {part!r}")  # fmt: skip
        ctx.capture = None
        run.ended_at = trio.current_time()
        duration_ms = int((run.ended_at - run.started_at) * 1000)
        if limit.cancelled_caught:
            run.outcome = "timed out"
            result = self.describe(capture, exit_code=None, duration_ms=duration_ms)
            result.update(timed_out=True,
                          error=f"timed out after {limit_s:g}s; its processes were killed")  # fmt: skip
            return result
        run.outcome = f"exit {exit_code}"
        return self.describe(capture, exit_code=exit_code, duration_ms=duration_ms)

    @staticmethod
    def _print(ctx: FakeStepContext, capture: FakeCapture, text: str) -> None:
        capture.stdout += text
        if ctx.on_output is not None:
            ctx.on_output("stdout", text.encode())

    @staticmethod
    def describe(capture: FakeCapture, *, exit_code: int | None, duration_ms: int) -> JSON:
        """A command's result, in the real executor's shape (also for an interrupted one)."""
        result: JSON = {"exit_code": -1 if exit_code is None else exit_code,
                        "stdout": capture.stdout, "stderr": capture.stderr,
                        "duration_ms": duration_ms, "truncated": False}  # fmt: skip
        if exit_code:
            result["error"] = f"exit code {exit_code}"
        return result


def _implements(store: MemoryStore, queue: MemoryQueue) -> tuple[Store, Queue]:
    """Never called: mypy checks here that the fakes implement the ports."""
    return store, queue
