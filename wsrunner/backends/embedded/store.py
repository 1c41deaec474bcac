"""The embedded durable store: tasks, results, events and API tokens in one SQLite file.

The single-host default (no Redis, no PostgreSQL). It implements the same `Store` protocol as
the PostgreSQL adapter, with the same compare-and-set transitions against
`models.TRANSITIONS`, and also keeps each task's events, so the in-process queue
(`wsrunner.backends.embedded.queue`) can replay them after a restart. sqlite3 blocks: every call runs in one
worker thread at a time (a CapacityLimiter of 1), in WAL mode, never on the trio thread.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypeVar

import trio

from wsrunner.errors import (
    DuplicateTaskError,
    InvalidTransitionError,
    NotFoundError,
    UnavailableError,
)
from wsrunner.models import (
    JSON,
    ApiToken,
    Priority,
    TaskRecord,
    TaskSpec,
    TaskState,
    TokenLimits,
    json_text,
    sources_of,
)
from wsrunner.payload import check_idempotent_replay, request_hash, to_configuration

T = TypeVar("T")
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS task_executions (
    id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL, task_type TEXT NOT NULL,
    configuration TEXT NOT NULL, priority TEXT NOT NULL, status TEXT NOT NULL,
    timeout_seconds INTEGER NOT NULL, submitted_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    started_at TEXT, completed_at TEXT, result TEXT, error_message TEXT,
    execution_time_ms INTEGER, worker_id TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    lease_expires_at TEXT, idempotency_key TEXT, request_hash TEXT, correlation_id TEXT,
    workspace_path TEXT, cancel_requested_at TEXT
);
CREATE INDEX IF NOT EXISTS task_list_idx ON task_executions (submitted_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS task_live_idx ON task_executions (status, lease_expires_at);
CREATE UNIQUE INDEX IF NOT EXISTS task_idem_idx ON task_executions (workspace_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS task_events (
    task_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL,
    ts TEXT NOT NULL, PRIMARY KEY (task_id, seq)
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_sha256 TEXT NOT NULL, workspaces TEXT,
    created_at TEXT NOT NULL, last_used_at TEXT, revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS workspace_homes (
    workspace_id TEXT PRIMARY KEY, host TEXT NOT NULL, updated_at TEXT NOT NULL
);
"""
#: Columns added since the first release, to stores made before them.
ADDED: Final = (
    ("api_tokens", "max_priority", "TEXT NOT NULL DEFAULT 'high'"),
    ("api_tokens", "max_running", "INTEGER"),
    ("api_tokens", "max_queued", "INTEGER"),
)


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _record(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        id=row["id"],
        workspace_id=row["workspace_id"],
        status=TaskState(row["status"]),
        priority=Priority(row["priority"]),
        task_type=row["task_type"],
        configuration=json.loads(row["configuration"]),
        submitted_at=_ts(row["submitted_at"]),  # type: ignore[arg-type]
        started_at=_ts(row["started_at"]),
        completed_at=_ts(row["completed_at"]),
        result=None if row["result"] is None else json.loads(row["result"]),
        error_message=row["error_message"],
        execution_time_ms=row["execution_time_ms"],
        worker_id=row["worker_id"],
        attempts=row["attempts"],
        idempotency_key=row["idempotency_key"],
        correlation_id=row["correlation_id"],
        cancel_requested=row["cancel_requested_at"] is not None,
    )


def _token(row: sqlite3.Row) -> ApiToken:
    ws = row["workspaces"]
    return ApiToken(
        id=row["id"],
        name=row["name"],
        workspaces=None if ws is None else tuple(json.loads(ws)),
        limits=TokenLimits(
            max_priority=Priority(row["max_priority"]),
            max_running=row["max_running"],
            max_queued=row["max_queued"],
        ),
        created_at=_ts(row["created_at"]),  # type: ignore[arg-type]
        last_used_at=_ts(row["last_used_at"]),
        revoked_at=_ts(row["revoked_at"]),
    )


def _limits(limits: TokenLimits) -> tuple[str, int | None, int | None]:
    return limits.max_priority.value, limits.max_running, limits.max_queued


class SqliteStore:
    """The embedded store. Create with `open_sqlite_store()`."""

    def __init__(self, conn: sqlite3.Connection, lease_s: float) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self.lease_s = lease_s
        self.on_error: Callable[[], None] | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` in a worker thread, in one transaction (committed, or rolled back)."""

        def work() -> T:
            with self._lock, self._conn:
                return fn(self._conn)

        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter)
        except sqlite3.OperationalError as exc:
            if self.on_error is not None:
                self.on_error()
            raise UnavailableError(f"the embedded store failed: {exc}") from exc

    async def ping(self) -> None:
        await self.run(lambda c: c.execute("SELECT 1").fetchone())

    async def create(
        self, spec: TaskSpec, *, workspace_path: str | None = None
    ) -> tuple[TaskRecord, bool]:
        configuration = to_configuration(spec)
        digest = request_hash(spec, configuration)
        now = _now().isoformat()

        def tx(c: sqlite3.Connection) -> tuple[sqlite3.Row, bool]:
            cur = c.execute(
                "INSERT INTO task_executions (id, workspace_id, task_type, configuration, priority,"
                " status, timeout_seconds, submitted_at, updated_at, idempotency_key, request_hash,"
                " correlation_id, workspace_path) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (
                    spec.task_id,
                    spec.workspace_id,
                    spec.task_type,
                    json.dumps(configuration),
                    spec.priority.value,
                    spec.timeout_seconds,
                    now,
                    now,
                    spec.idempotency_key,
                    digest,
                    spec.correlation_id,
                    workspace_path,
                ),
            )
            if cur.rowcount == 1:
                return c.execute(
                    "SELECT * FROM task_executions WHERE id = ?", (spec.task_id,)
                ).fetchone(), True
            row = None
            if spec.idempotency_key is not None:
                row = c.execute(
                    "SELECT * FROM task_executions WHERE workspace_id = ? AND idempotency_key = ?",
                    (spec.workspace_id, spec.idempotency_key),
                ).fetchone()
            if row is None:
                row = c.execute(
                    "SELECT * FROM task_executions WHERE id = ?", (spec.task_id,)
                ).fetchone()
            return row, False

        row, created = await self.run(tx)
        if not created:
            check_idempotent_replay(spec, digest, dict(row))
        return _record(row), created

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
        """Compare-and-set the status to `target`, as the PostgreSQL store does."""
        now = _now()
        sources = [s.value for s in sources_of(target)]
        running = target is TaskState.RUNNING
        lease = (now + timedelta(seconds=self.lease_s)).isoformat() if running else None

        def tx(c: sqlite3.Connection) -> tuple[sqlite3.Row | None, str | None]:
            marks = ",".join("?" * len(sources))
            cur = c.execute(
                f"UPDATE task_executions SET status = ?, updated_at = ?,"
                f" started_at = CASE WHEN ? THEN ? ELSE started_at END,"
                f" completed_at = CASE WHEN ? THEN ? ELSE completed_at END,"
                f" worker_id = COALESCE(?, worker_id), attempts = attempts + ?,"
                f" lease_expires_at = ?, result = COALESCE(?, result),"
                f" error_message = COALESCE(?, error_message),"
                f" execution_time_ms = COALESCE(?, execution_time_ms),"
                f" cancel_requested_at = CASE WHEN ? THEN ? ELSE cancel_requested_at END"
                f" WHERE id = ? AND status IN ({marks}) AND (? IS NULL OR worker_id = ?)",
                (
                    target.value,
                    now.isoformat(),
                    running,
                    now.isoformat(),
                    target.terminal,
                    now.isoformat(),
                    worker_id,
                    int(running),
                    lease,
                    None if result is None else json_text(result),
                    error,
                    execution_time_ms,
                    target is TaskState.CANCELLED,
                    now.isoformat(),
                    task_id,
                    *sources,
                    expect_worker,
                    expect_worker,
                ),
            )
            row = c.execute("SELECT * FROM task_executions WHERE id = ?", (task_id,)).fetchone()
            if cur.rowcount == 1:
                return row, None
            return None, None if row is None else row["status"]

        row, current = await self.run(tx)
        if row is not None:
            return _record(row)
        if current is None:
            raise NotFoundError(f"no task with id {task_id}")
        raise InvalidTransitionError(task_id, current, target.value)

    async def start(self, spec: TaskSpec, *, worker_id: str, workspace_path: str) -> int:
        """Move a claimed task to `running`, writing its record first if there is none; the
        attempt number."""
        try:
            record = await self.transition(spec.task_id, TaskState.RUNNING, worker_id=worker_id)
            return record.attempts
        except NotFoundError:
            pass
        first, created = await self.create(spec, workspace_path=workspace_path)
        if not created and first.id != spec.task_id:
            raise DuplicateTaskError(spec.task_id, first.id, TaskState.RUNNING.value)
        record = await self.transition(spec.task_id, TaskState.RUNNING, worker_id=worker_id)
        return record.attempts

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
        """The end of a run by the daemon holding the task (see `Store.finish`)."""
        await self.transition(
            task_id,
            target,
            expect_worker=worker_id,
            result=result,
            error=error,
            execution_time_ms=execution_time_ms,
        )

    async def attach_result(self, task_id: str, result: JSON, execution_time_ms: int) -> None:
        await self.run(
            lambda c: c.execute(
                "UPDATE task_executions SET result = ?, updated_at = ?,"
                " execution_time_ms = COALESCE(execution_time_ms, ?) WHERE id = ? AND result IS NULL",
                (json_text(result), _now().isoformat(), execution_time_ms, task_id),
            )
        )

    async def renew_leases(self, worker_id: str, task_ids: Sequence[str]) -> None:
        if not task_ids:
            return
        lease = (_now() + timedelta(seconds=self.lease_s)).isoformat()
        marks = ",".join("?" * len(task_ids))
        await self.run(
            lambda c: c.execute(
                f"UPDATE task_executions SET lease_expires_at = ? WHERE worker_id = ? AND "
                f"status = 'running' AND id IN ({marks})",
                (lease, worker_id, *task_ids),
            )
        )

    async def get(self, task_id: str) -> TaskRecord:
        row = await self.run(
            lambda c: c.execute("SELECT * FROM task_executions WHERE id = ?", (task_id,)).fetchone()
        )
        if row is None:
            raise NotFoundError(f"no task with id {task_id}")
        return _record(row)

    async def expired_running(self, limit: int = 500) -> list[TaskRecord]:
        now = _now().isoformat()
        rows = await self.run(
            lambda c: c.execute(
                "SELECT * FROM task_executions WHERE status = 'running' AND lease_expires_at < ?"
                " ORDER BY lease_expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [_record(r) for r in rows]

    async def stale_queued(self, age_s: float, limit: int = 1000) -> list[TaskRecord]:
        cutoff = (_now() - timedelta(seconds=age_s)).isoformat()
        rows = await self.run(
            lambda c: c.execute(
                "SELECT * FROM task_executions WHERE status = 'queued' AND updated_at < ?"
                " ORDER BY submitted_at LIMIT ?",
                (cutoff, limit),
            ).fetchall()
        )
        return [_record(r) for r in rows]

    async def list(
        self,
        *,
        workspace_id: str | None = None,
        workspaces: Sequence[str] | None = None,
        status: TaskState | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
    ) -> list[TaskRecord]:
        where, args = ["1 = 1"], []
        if workspace_id is not None:
            where.append("workspace_id = ?")
            args.append(workspace_id)
        if workspaces is not None:
            where.append(f"workspace_id IN ({','.join('?' * len(workspaces)) or 'NULL'})")
            args += list(workspaces)
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        if before is not None:
            where.append("(submitted_at < ? OR (submitted_at = ? AND id < ?))")
            args += [before[0].isoformat(), before[0].isoformat(), before[1]]
        query = (
            f"SELECT * FROM task_executions WHERE {' AND '.join(where)}"
            " ORDER BY submitted_at DESC, id DESC LIMIT ?"
        )
        rows = await self.run(lambda c: c.execute(query, (*args, limit)).fetchall())
        return [_record(r) for r in rows]

    async def expire_leases(self) -> int:
        """End the leases of running tasks: at start-up, their daemon (this file's previous
        owner) is gone, so the reconciler re-queues them at once instead of after a lease."""
        now = _now().isoformat()
        return await self.run(
            lambda c: (
                c.execute(
                    "UPDATE task_executions SET lease_expires_at = ? WHERE status = 'running'",
                    (now,),
                ).rowcount
            )
        )

    # --- events (for the in-process queue) ----------------------------------------------------

    async def add_event(self, task_id: str, kind: str, data: JSON, ts: str) -> int:
        """Append an event; its number in the task's stream (1, 2, ...)."""

        def tx(c: sqlite3.Connection) -> int:
            seq = int(
                c.execute(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM task_events WHERE task_id = ?",
                    (task_id,),
                ).fetchone()[0]
            )
            c.execute(
                "INSERT INTO task_events VALUES (?, ?, ?, ?, ?)",
                (task_id, seq, kind, json.dumps(data), ts),
            )
            return seq

        return await self.run(tx)

    async def events_after(
        self, task_id: str, after: int, count: int
    ) -> builtins.list[tuple[int, str, JSON, str]]:
        rows = await self.run(
            lambda c: c.execute(
                "SELECT seq, type, data, ts FROM task_events WHERE task_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (task_id, after, count),
            ).fetchall()
        )
        return [(r["seq"], r["type"], json.loads(r["data"]), r["ts"]) for r in rows]

    # --- API tokens ---------------------------------------------------------------------------

    async def create_token(
        self,
        token_id: str,
        name: str,
        secret_sha256: str,
        workspaces: Sequence[str] | None,
        limits: TokenLimits,
    ) -> ApiToken:
        now = _now().isoformat()
        scope = None if workspaces is None else json.dumps(list(workspaces))

        def tx(c: sqlite3.Connection) -> sqlite3.Row:
            c.execute(
                "INSERT INTO api_tokens (id, name, secret_sha256, workspaces, created_at,"
                " max_priority, max_running, max_queued) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (token_id, name, secret_sha256, scope, now, *_limits(limits)),
            )
            row: sqlite3.Row = c.execute(
                "SELECT * FROM api_tokens WHERE id = ?", (token_id,)
            ).fetchone()
            return row

        return _token(await self.run(tx))

    async def token_digest(self, token_id: str) -> tuple[ApiToken, str] | None:
        now = _now()

        def tx(c: sqlite3.Connection) -> sqlite3.Row | None:
            row: sqlite3.Row | None = c.execute(
                "SELECT * FROM api_tokens WHERE id = ?", (token_id,)
            ).fetchone()
            if row is not None and row["revoked_at"] is None:
                c.execute(
                    "UPDATE api_tokens SET last_used_at = ? WHERE id = ? AND"
                    " (last_used_at IS NULL OR last_used_at < ?)",
                    (now.isoformat(), token_id, (now - timedelta(minutes=1)).isoformat()),
                )
            return row

        row = await self.run(tx)
        return None if row is None else (_token(row), row["secret_sha256"])

    async def update_token(self, token_id: str, limits: TokenLimits) -> ApiToken:
        def tx(c: sqlite3.Connection) -> sqlite3.Row | None:
            c.execute(
                "UPDATE api_tokens SET max_priority = ?, max_running = ?, max_queued = ?"
                " WHERE id = ?",
                (*_limits(limits), token_id),
            )
            row: sqlite3.Row | None = c.execute(
                "SELECT * FROM api_tokens WHERE id = ?", (token_id,)
            ).fetchone()
            return row

        row = await self.run(tx)
        if row is None:
            raise NotFoundError(f"no API token with id {token_id!r}")
        return _token(row)

    async def record_home(self, workspace_id: str, host: str) -> None:
        now = _now().isoformat()
        await self.run(
            lambda c: c.execute(
                "INSERT INTO workspace_homes (workspace_id, host, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (workspace_id) DO UPDATE SET host = excluded.host,"
                " updated_at = excluded.updated_at",
                (workspace_id, host, now),
            )
        )

    async def homes(self) -> dict[str, str]:
        rows = await self.run(
            lambda c: c.execute("SELECT workspace_id, host FROM workspace_homes").fetchall()
        )
        return {r[0]: r[1] for r in rows}

    async def count_queued(self, token_id: str) -> int:
        row = await self.run(
            lambda c: c.execute(
                "SELECT count(*) FROM task_executions WHERE status = 'queued'"
                " AND json_extract(configuration, '$.token_id') = ?",
                (token_id,),
            ).fetchone()
        )
        return int(row[0])

    async def list_tokens(self) -> builtins.list[ApiToken]:
        rows = await self.run(
            lambda c: c.execute("SELECT * FROM api_tokens ORDER BY created_at, id").fetchall()
        )
        return [_token(r) for r in rows]

    async def revoke_token(self, token_id: str) -> ApiToken:
        now = _now().isoformat()

        def tx(c: sqlite3.Connection) -> sqlite3.Row | None:
            c.execute(
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (now, token_id),
            )
            row: sqlite3.Row | None = c.execute(
                "SELECT * FROM api_tokens WHERE id = ?", (token_id,)
            ).fetchone()
            return row

        row = await self.run(tx)
        if row is None:
            raise NotFoundError(f"no API token with id {token_id!r}")
        return _token(row)


@asynccontextmanager
async def open_sqlite_store(path: Path, *, lease_s: float = 60.0) -> AsyncIterator[SqliteStore]:
    """Open (creating if needed) the store at `path`; WAL mode, so readers never wait on a write.

    Raises:
        UnavailableError: the file cannot be opened or is not a wsrunner store.
    """

    def start() -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a completed task survives a power cut
        conn.executescript(SCHEMA)
        for table, column, kind in ADDED:
            known = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in known:  # our own constants, not input
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        conn.isolation_level = "DEFERRED"
        return conn

    try:
        conn = await trio.to_thread.run_sync(start)
    except sqlite3.Error as exc:
        raise UnavailableError(f"the embedded store {path} cannot be used: {exc}") from exc
    try:
        yield SqliteStore(conn, lease_s)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close)
