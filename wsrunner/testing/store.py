"""MemoryStore: the durable record in dicts, with the PostgreSQL store's compare-and-set rules."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from wsrunner.errors import (
    DuplicateTaskError,
    InvalidTransitionError,
    NotFoundError,
)
from wsrunner.models import (
    JSON,
    ApiToken,
    TaskRecord,
    TaskSpec,
    TaskState,
    TokenLimits,
    sources_of,
)
from wsrunner.payload import check_idempotent_replay, request_hash, to_configuration
from wsrunner.testing.common import _Clock, _copy, _round_trip

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
        self._homes: dict[str, str] = {}
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

    def _move(
        self,
        row: _Row,
        target: TaskState,
        *,
        worker_id: str | None = None,
        result: JSON | None = None,
        error: str | None = None,
        execution_time_ms: int | None = None,
    ) -> None:
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
            execution_time_ms=rec.execution_time_ms
            if execution_time_ms is None
            else execution_time_ms,
            cancel_requested=rec.cancel_requested or target is TaskState.CANCELLED,
        )
        row.updated_at = now
        row.lease_expires_at = now + timedelta(seconds=self.lease_s) if running else None

    # --- writes -------------------------------------------------------------------------------

    def _by_key(self, workspace_id: str, key: str | None) -> _Row | None:
        if key is None:
            return None
        return next(
            (
                r
                for r in self._rows.values()
                if r.record.workspace_id == workspace_id and r.record.idempotency_key == key
            ),
            None,
        )

    def _insert(self, spec: TaskSpec, workspace_path: str | None) -> _Row:
        now = self._clock.now()
        configuration = to_configuration(spec)
        row = _Row(
            TaskRecord(
                id=spec.task_id,
                workspace_id=spec.workspace_id,
                status=TaskState.QUEUED,
                priority=spec.priority,
                task_type=spec.task_type,
                configuration=_copy(configuration),
                submitted_at=now,
                idempotency_key=spec.idempotency_key,
                correlation_id=spec.correlation_id,
            ),
            updated_at=now,
            request_hash=request_hash(spec, configuration),
            workspace_path=workspace_path,
        )
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
        check_idempotent_replay(
            spec,
            digest,
            {
                "id": first.record.id,
                "idempotency_key": first.record.idempotency_key,
                "request_hash": first.request_hash,
            },
        )
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
        self._move(
            row,
            target,
            worker_id=worker_id,
            result=result,
            error=error,
            execution_time_ms=execution_time_ms,
        )
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

    async def finish(
        self,
        task_id: str,
        target: TaskState,
        *,
        worker_id: str,
        result: JSON,
        error: str | None,
        execution_time_ms: int,
    ) -> None:
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
            row.record = replace(
                row.record,
                result=_copy(result),
                execution_time_ms=execution_time_ms if ms is None else ms,
            )
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
        rows = [
            r
            for r in self._rows.values()
            if r.record.status is TaskState.RUNNING
            and r.lease_expires_at is not None
            and r.lease_expires_at < now
        ]
        rows.sort(key=lambda r: r.lease_expires_at or now)
        return [r.record for r in rows[:limit]]

    async def stale_queued(self, age_s: float, limit: int = 1000) -> builtins.list[TaskRecord]:
        await _round_trip(self.latency)
        cutoff = self._clock.now() - timedelta(seconds=age_s)
        rows = [
            r.record
            for r in self._rows.values()
            if r.record.status is TaskState.QUEUED and r.updated_at < cutoff
        ]
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
            r.record
            for r in self._rows.values()
            if (workspace_id is None or r.record.workspace_id == workspace_id)
            and (workspaces is None or r.record.workspace_id in workspaces)
            and (status is None or r.record.status is status)
            and (before is None or (r.record.submitted_at, r.record.id) < before)
        ]
        found.sort(key=lambda rec: (rec.submitted_at, rec.id), reverse=True)
        return found[:limit]

    # --- API tokens ---------------------------------------------------------------------------

    async def create_token(
        self,
        token_id: str,
        name: str,
        secret_sha256: str,
        workspaces: Sequence[str] | None,
        limits: TokenLimits,
    ) -> ApiToken:
        await _round_trip(self.latency)
        if token_id in self._tokens:
            raise ValueError(f"an API token with id {token_id!r} exists already")
        token = ApiToken(
            id=token_id,
            name=name,
            created_at=self._clock.now(),
            workspaces=None if workspaces is None else tuple(workspaces),
            limits=limits,
        )
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

    async def update_token(self, token_id: str, limits: TokenLimits) -> ApiToken:
        await _round_trip(self.latency)
        if token_id not in self._tokens:
            raise NotFoundError(f"no API token with id {token_id!r}")
        token, digest = self._tokens[token_id]
        self._tokens[token_id] = (replace(token, limits=limits), digest)
        return self._tokens[token_id][0]

    async def record_home(self, workspace_id: str, host: str) -> None:
        await _round_trip(self.latency)
        self._homes[workspace_id] = host

    async def homes(self) -> dict[str, str]:
        await _round_trip(self.latency)
        return dict(self._homes)

    async def count_queued(self, token_id: str) -> int:
        await _round_trip(self.latency)
        return sum(
            1
            for row in self._rows.values()
            if row.record.status is TaskState.QUEUED
            and row.record.configuration.get("token_id") == token_id
        )

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
