"""PostgreSQL adapter: the durable task record, its compare-and-set transitions, and migrations.

psycopg 3 has no trio support, so most calls run the sync driver and a `ConnectionPool` in worker
threads, never on the trio thread; a trio cancellation becomes a server-side
cancel of the running statement, and the transaction rolls back. The two statements every task
runs (`start`, `finish`) go through `wsrunner.backends.postgres.libpq` instead: libpq itself,
non-blocking, on the trio thread, without the thread hops.
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from importlib import resources
from typing import Any, Final, LiteralString, TypeVar, cast

import psycopg
import psycopg.conninfo
import trio
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from wsrunner.backends.postgres.libpq import LibpqPool, Row
from wsrunner.errors import (
    BackendError,
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

logger = logging.getLogger(__name__)
T = TypeVar("T")

_MIGRATION_LOCK: Final = 0x77737275  # pg_advisory_xact_lock key: "wsru"


def _load_queries() -> dict[str, LiteralString]:
    text = (
        resources.files("wsrunner.backends.postgres")
        .joinpath("sql/queries.sql")
        .read_text(encoding="utf-8")
    )
    blocks = re.split(r"^-- name: (\w+)\s*$", text, flags=re.MULTILINE)
    return {
        name: cast("LiteralString", body.strip())
        for name, body in zip(blocks[1::2], blocks[2::2], strict=True)
    }


Q: Final = _load_queries()


def _record(row: dict[str, Any]) -> TaskRecord:
    return TaskRecord(
        id=str(row["id"]),
        workspace_id=row["workspace_id"],
        status=TaskState(row["status"]),
        priority=Priority(row["priority"]),
        task_type=row["task_type"],
        configuration=row["configuration"] or {},
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        result=row["result"],
        error_message=row["error_message"],
        execution_time_ms=row["execution_time_ms"],
        worker_id=row["worker_id"],
        attempts=row["attempts"],
        idempotency_key=row["idempotency_key"],
        correlation_id=row["correlation_id"],
        cancel_requested=row["cancel_requested_at"] is not None,
    )


def _json_text(value: Any) -> str:
    """`value` as JSON for a jsonb column. PostgreSQL refuses the NUL character in jsonb text (a
    command printing binary output would make its result unstorable), so NULs become U+FFFD.

    In the JSON text a literal backslash is always doubled: cut at those pairs, and a `\\u0000`
    left in a piece is an escape, never text. (A regular expression took half a second on the
    event loop for a megabyte of NULs.)
    """
    text = json_text(value)
    if "\\u0000" not in text:
        return text
    return "\\\\".join(part.replace("\\u0000", "\\ufffd") for part in text.split("\\\\"))


def _jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=_json_text)


def _array(states: Iterable[TaskState]) -> str:
    """A text[] literal of state names (plain words: nothing to quote)."""
    return "{" + ",".join(sorted(s.value for s in states)) + "}"


def _insert_params(spec: TaskSpec, workspace_path: str | None) -> tuple[dict[str, Any], str | None]:
    configuration = to_configuration(spec)
    digest = request_hash(spec, configuration)
    return {
        "id": spec.task_id,
        "workspace_id": spec.workspace_id,
        "task_type": spec.task_type,
        "configuration": _jsonb(configuration),
        "priority": spec.priority.value,
        "timeout_seconds": spec.timeout_seconds,
        "idempotency_key": spec.idempotency_key,
        "request_hash": digest,
        "correlation_id": spec.correlation_id,
        "workspace_path": workspace_path,
    }, digest


def _insert(
    cur: psycopg.Cursor[dict[str, Any]], params: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """(the new row, True), or (the task that already has this id or key, False)."""
    cur.execute(Q["insert_task"], params)
    row = cur.fetchone()
    if row is not None:
        return row, True
    if params["idempotency_key"] is not None:
        cur.execute(Q["get_by_idempotency_key"], params)
        row = cur.fetchone()
        if row is not None:
            return row, False
    cur.execute(Q["get_task"], params)
    row = cur.fetchone()
    assert row is not None, "insert conflicted, yet no row has the id or the key"
    return row, False


def _transition(
    cur: psycopg.Cursor[dict[str, Any]], params: dict[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """(the moved row, None), or (None, the current status), or (None, None): no such task."""
    cur.execute(Q["transition"], params)
    row = cur.fetchone()
    if row is not None:
        return row, None
    cur.execute(Q["get_task"], params)
    current = cur.fetchone()
    return None, None if current is None else current["status"]


def _transitioned(
    task_id: str, target: TaskState, row: dict[str, Any] | None, current: str | None
) -> TaskRecord:
    if row is not None:
        return _record(row)
    if current is None:
        raise NotFoundError(f"no task with id {task_id}")
    raise InvalidTransitionError(task_id, current, target.value)


class _Dropped(Exception):
    """Raised in a worker thread that started after its caller was cancelled."""


class PostgresStore:
    """The task_executions table. Create with `open_postgres_store()`."""

    def __init__(
        self, pool: ConnectionPool[Any], fast: LibpqPool, max_size: int, lease_s: float
    ) -> None:
        self._pool = pool
        self._fast = fast  #: the per-task statements, on the trio thread
        self._limiter = trio.CapacityLimiter(max_size)  # never more threads than connections
        self.on_error: Callable[[], None] | None = None  #: called on each failed call (metrics)
        self.lease_s = lease_s

    async def _run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `fn(conn)` in a worker thread inside one transaction.

        Cancellation: the statement is cancelled on the server and the transaction rolled back
        before this returns; the connection goes back to the pool clean. Cancelled while still
        waiting for a pooled connection (PostgreSQL down), it returns at once: the thread drops
        the work when it gets one, or when the pool gives up.
        """
        lock, finished = threading.Lock(), trio.Event()
        # "started": the thread took the work; "dropped": cancelled before that, so it must not.
        state: dict[str, Any] = {"started": False, "dropped": False, "conn": None}
        token = trio.lowlevel.current_trio_token()

        def work() -> T:
            try:
                with lock:
                    if state["dropped"]:
                        raise _Dropped  # nobody waits for this result
                    state["started"] = True
                with self._pool.connection() as conn:
                    with lock:
                        if state["dropped"]:  # the caller gave up while we waited for the pool
                            raise _Dropped
                        state["conn"] = conn
                    try:
                        return fn(conn)
                    finally:
                        with lock:
                            state["conn"] = None
            finally:
                token.run_sync_soon(finished.set)

        try:
            return await trio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=self._limiter
            )
        except trio.Cancelled:
            # Cancelled while waiting for a thread (the limiter), the work never started and
            # never will; cancelled while it runs, stop the statement and wait for the rollback.
            with lock:
                if not state["started"] or state["conn"] is None:
                    # No statement runs yet (the thread waits for the limiter or for a pooled
                    # connection, which with PostgreSQL down can take the pool's timeout):
                    # it will drop the work; nothing to wait for.
                    state["dropped"] = True
                    raise
            # Shielded, and bounded: cancel_safe gives up after 5 s, statement_timeout is 30 s.
            with trio.move_on_after(40) as cleanup:
                cleanup.shield = True

                def cancel_query() -> None:
                    with lock:
                        conn = state["conn"]
                        if conn is not None:
                            try:
                                conn.cancel_safe(timeout=5)
                            except psycopg.Error:
                                pass  # the statement ended on its own meanwhile

                await trio.to_thread.run_sync(cancel_query)
                await finished.wait()
            if cleanup.cancelled_caught:
                logger.error(
                    "a cancelled PostgreSQL call did not end within 40 s; its thread is left"
                )
            raise
        except (psycopg.OperationalError, PoolTimeout) as exc:
            if self.on_error is not None:
                self.on_error()
            raise UnavailableError(f"PostgreSQL failed: {exc}") from exc

    async def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        def q(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute(Q[name], params)
                return cur.fetchall() if cur.description else []

        return await self._run(q)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1"))

    # --- writes -------------------------------------------------------------------------------

    async def create(
        self, spec: TaskSpec, *, workspace_path: str | None = None
    ) -> tuple[TaskRecord, bool]:
        """Insert the `queued` record of `spec`; returns (record, created).

        With an idempotency key already used in the workspace, returns the first task and False
        if the request is the same, and raises IdempotencyConflictError if it differs. A task id
        that exists already returns the existing record and False (a producer re-pushed it).
        """
        params, digest = _insert_params(spec, workspace_path)

        def tx(conn: psycopg.Connection[Any]) -> tuple[dict[str, Any], bool]:
            with conn.cursor(row_factory=dict_row) as cur:
                return _insert(cur, params)

        row, created = await self._run(tx)
        if not created:
            check_idempotent_replay(spec, digest, row)
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
        """Compare-and-set the task's status to `target` if the transition table allows it.

        `expect_worker` additionally requires the task to be held by that daemon (so a daemon
        whose lease was taken over cannot overwrite its successor's state).

        Raises:
            InvalidTransitionError: the current state (or owner) does not allow the move.
            NotFoundError: no task has this id.
        """
        params = self._transition_params(
            task_id,
            target,
            worker_id=worker_id,
            expect_worker=expect_worker,
            result=result,
            error=error,
            execution_time_ms=execution_time_ms,
        )

        def tx(conn: psycopg.Connection[Any]) -> tuple[dict[str, Any] | None, str | None]:
            with conn.cursor(row_factory=dict_row) as cur:
                return _transition(cur, params)

        return _transitioned(task_id, target, *await self._run(tx))

    async def start(self, spec: TaskSpec, *, worker_id: str, workspace_path: str) -> int:
        """Move a claimed task to `running`, first writing its record if its producer did not;
        returns the attempt number.

        One statement, on the trio thread (`wsrunner.backends.postgres.libpq`): the start of every task.

        Raises:
            InvalidTransitionError: the task may not start (ended, started elsewhere, or a
                duplicate of another task by idempotency key).
        """
        configuration = to_configuration(spec)
        digest = request_hash(spec, configuration)
        rows = await self._fast_call(
            "start_task",
            [
                spec.task_id,
                worker_id,
                repr(self.lease_s),
                _array(sources_of(TaskState.RUNNING)),
                spec.workspace_id,
                spec.task_type,
                _json_text(configuration),
                spec.priority.value,
                str(spec.timeout_seconds),
                spec.idempotency_key,
                digest,
                spec.correlation_id,
                workspace_path,
            ],
        )
        if not rows:
            current = "started by another daemon at the same moment"
        elif rows[0][0] is not None:
            return int(rows[0][0])
        else:  # the statement's refusal: the state, or `duplicate:<id>` (queries.sql, start_task)
            current = str(rows[0][1])
            kind, _, original = current.partition(":")
            if kind == "duplicate":
                raise DuplicateTaskError(spec.task_id, original, TaskState.RUNNING.value)
        raise InvalidTransitionError(spec.task_id, current, TaskState.RUNNING.value)

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
        """Write the end of a run by the daemon that holds the task: one statement, on the trio
        thread (`wsrunner.backends.postgres.libpq`).

        Raises:
            InvalidTransitionError: the task is no longer running here (cancelled, taken over).
            NotFoundError: no task has this id.
        """
        rows = await self._fast_call(
            "finish_task",
            [
                task_id,
                target.value,
                _array(sources_of(target)),
                worker_id,
                _json_text(result),
                error,
                str(execution_time_ms),
            ],
        )
        if not rows:
            raise NotFoundError(f"no task with id {task_id}")
        if rows[0][0] != "moved":
            raise InvalidTransitionError(task_id, str(rows[0][0]), target.value)

    async def _fast_call(self, name: str, params: list[str | None]) -> list[Row]:
        try:
            return await self._fast.call(name, Q[name], params)
        except (UnavailableError, BackendError):
            if self.on_error is not None:
                self.on_error()
            raise

    def _transition_params(
        self,
        task_id: str,
        target: TaskState,
        *,
        worker_id: str | None = None,
        expect_worker: str | None = None,
        result: JSON | None = None,
        error: str | None = None,
        execution_time_ms: int | None = None,
    ) -> dict[str, Any]:
        return {
            "id": task_id,
            "target": target.value,
            "terminal": target.terminal,
            "sources": [s.value for s in sources_of(target)],
            "worker_id": worker_id,
            "expect_worker": expect_worker,
            "lease_s": self.lease_s,
            "result": None if result is None else _jsonb(result),
            "error": error,
            "execution_time_ms": execution_time_ms,
        }

    async def attach_result(self, task_id: str, result: JSON, execution_time_ms: int) -> None:
        """Store the result of a task whose terminal state someone else already wrote."""
        await self._rows(
            "attach_result",
            {"id": task_id, "result": _jsonb(result), "execution_time_ms": execution_time_ms},
        )

    async def renew_leases(self, worker_id: str, task_ids: Sequence[str]) -> None:
        if task_ids:
            await self._rows(
                "renew_leases",
                {"worker_id": worker_id, "ids": list(task_ids), "lease_s": self.lease_s},
            )

    # --- reads --------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord:
        rows = await self._rows("get_task", {"id": task_id})
        if not rows:
            raise NotFoundError(f"no task with id {task_id}")
        return _record(rows[0])

    async def expired_running(self, limit: int = 500) -> list[TaskRecord]:
        """Running tasks whose daemon stopped renewing the lease."""
        return [_record(r) for r in await self._rows("expired_running", {"limit": limit})]

    async def stale_queued(self, age_s: float, limit: int = 1000) -> list[TaskRecord]:
        """Tasks queued (or re-queued) more than `age_s` seconds ago, oldest first."""
        return [
            _record(r) for r in await self._rows("stale_queued", {"age_s": age_s, "limit": limit})
        ]

    async def list(
        self,
        *,
        workspace_id: str | None = None,
        workspaces: Sequence[str] | None = None,
        status: TaskState | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
    ) -> list[TaskRecord]:
        """Newest first; `before` is the (submitted_at, id) of the last task of the previous page.

        `workspaces`, when given, restricts the tasks to those workspaces (a token's scope).
        """
        rows = await self._rows(
            "list_tasks",
            {
                "workspace_id": workspace_id,
                "workspaces": None if workspaces is None else list(workspaces),
                "status": None if status is None else status.value,
                "before_ts": None if before is None else before[0],
                "before_id": None if before is None else before[1],
                "limit": limit,
            },
        )
        return [_record(r) for r in rows]

    # --- API tokens ---------------------------------------------------------------------------

    async def create_token(
        self,
        token_id: str,
        name: str,
        secret_sha256: str,
        workspaces: Sequence[str] | None,
        limits: TokenLimits,
    ) -> ApiToken:
        params = {
            "id": token_id,
            "name": name,
            "secret_sha256": secret_sha256,
            "workspaces": None if workspaces is None else list(workspaces),
            **_limits(limits),
        }
        return _token((await self._rows("insert_token", params))[0])

    async def update_token(self, token_id: str, limits: TokenLimits) -> ApiToken:
        rows = await self._rows("update_token_limits", {"id": token_id, **_limits(limits)})
        if not rows:
            raise NotFoundError(f"no API token with id {token_id!r}")
        return _token(rows[0])

    async def record_home(self, workspace_id: str, host: str) -> None:
        """Record (or move) `workspace_id`'s home host."""
        await self._rows("record_home", {"workspace_id": workspace_id, "host": host})

    async def homes(self) -> dict[str, str]:
        """Every workspace's home host."""
        return {r["workspace_id"]: r["host"] for r in await self._rows("list_homes", {})}

    async def count_queued(self, token_id: str) -> int:
        """How many tasks `token_id` submitted are waiting."""
        return int((await self._rows("count_queued_of_token", {"token_id": token_id}))[0]["n"])

    async def token_digest(self, token_id: str) -> tuple[ApiToken, str] | None:
        """The token and its stored digest, or None; marks it used (at most once a minute)."""
        rows = await self._rows("get_token", {"id": token_id})
        if not rows:
            return None
        if rows[0]["revoked_at"] is None:
            await self._rows("touch_token", {"id": token_id})
        return _token(rows[0]), rows[0]["secret_sha256"]

    async def list_tokens(self) -> builtins.list[ApiToken]:
        return [_token(r) for r in await self._rows("list_tokens", {})]

    async def revoke_token(self, token_id: str) -> ApiToken:
        rows = await self._rows("revoke_token", {"id": token_id})
        if not rows:
            raise NotFoundError(f"no API token with id {token_id!r}")
        return _token(rows[0])


def _limits(limits: TokenLimits) -> dict[str, Any]:
    return {
        "max_priority": limits.max_priority.value,
        "max_running": limits.max_running,
        "max_queued": limits.max_queued,
    }


def _token(row: dict[str, Any]) -> ApiToken:
    ws = row["workspaces"]
    return ApiToken(
        id=row["id"],
        name=row["name"],
        workspaces=None if ws is None else tuple(ws),
        limits=TokenLimits(
            max_priority=Priority(row["max_priority"]),
            max_running=row["max_running"],
            max_queued=row["max_queued"],
        ),
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def _migrate(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """Apply the numbered migrations not applied yet, each in its own transaction."""
    applied: list[str] = []
    migrations = sorted(
        (
            f
            for f in resources.files("wsrunner.backends.postgres")
            .joinpath("sql/migrations")
            .iterdir()
            if f.name.endswith(".sql")
        ),
        key=lambda f: f.name,
    )
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS wsrunner_migrations"
            " (version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
    for f in migrations:
        with conn.transaction():
            # Several daemons may start at once: one applies, the others wait and then skip.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            done = conn.execute(
                "SELECT 1 FROM wsrunner_migrations WHERE version = %s", (f.name,)
            ).fetchone()
            if done:
                continue
            conn.execute(f.read_text(encoding="utf-8"))  # our own migration file, not input
            conn.execute("INSERT INTO wsrunner_migrations (version) VALUES (%s)", (f.name,))
            applied.append(f.name)
    return applied


def database_location(url: str) -> str:
    """Where a PostgreSQL URL points, for people: `user@host:port/dbname`, never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unparsable URL)"
    user = f"{info['user']}@" if info.get("user") else ""
    return (
        f"{user}{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
    )


@asynccontextmanager
async def open_postgres_store(
    url: str, *, schema: str = "public", max_size: int = 8, lease_s: float = 60.0
) -> AsyncIterator[PostgresStore]:
    """Connect, apply pending migrations, and yield the store.

    Raises:
        UnavailableError: PostgreSQL cannot be reached or the migrations fail.
    """
    options = f"-c search_path={schema} -c statement_timeout=30000"
    # Checked when lent: after a PostgreSQL restart, a stale connection is replaced there and
    # then, instead of failing the next call (a health check, an API request). The per-task
    # statements, which matter for speed, do not use this pool.
    pool: ConnectionPool[Any] = ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        open=False,
        kwargs={"options": options},
        name="wsrunner",
        check=ConnectionPool.check_connection,
    )

    def start() -> list[str]:
        pool.open(wait=True, timeout=10)
        with pool.connection() as conn:
            conn.autocommit = True
            try:
                return _migrate(conn, schema)
            finally:
                conn.autocommit = False

    try:
        applied = await trio.to_thread.run_sync(start)
    except (psycopg.Error, PoolTimeout) as exc:
        await trio.to_thread.run_sync(lambda: pool.close(timeout=1))
        raise UnavailableError(f"PostgreSQL cannot be used: {str(exc).strip()}") from exc
    for name in applied:
        logger.info("applied migration %s", name, extra={"schema": schema})
    fast = LibpqPool(url, options=options, size=max_size)
    try:
        await fast.fill()
        yield PostgresStore(pool, fast, max_size, lease_s)
    finally:
        fast.close()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: pool.close(timeout=5))
