"""The stores' compare-and-sets, and the PostgreSQL adapter under cancellation and dropped
connections, against a real server."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from tests.conftest import DATABASE_URL, cmd
from wsrunner.backends.embedded.store import SqliteStore
from wsrunner.backends.postgres.store import PostgresStore, _json_text
from wsrunner.daemon import open_store
from wsrunner.errors import (
    DuplicateTaskError,
    InvalidTransitionError,
    NotFoundError,
    UnavailableError,
)
from wsrunner.models import TaskSpec, TaskState
from wsrunner.payload import parse_task
from wsrunner.ports import Store
from wsrunner.settings import Settings


async def test_cancelled_while_waiting_for_a_thread_returns_at_once(schema: str) -> None:
    """A call cancelled before its worker thread started must not wait for that thread.

    This hung a daemon's shutdown: the reaper was cancelled while it queued for the store's
    thread limiter, and then waited, shielded, for work that would never run.
    """
    settings = Settings(worker_id="t", database_url=DATABASE_URL, database_schema=schema)
    async with open_store(settings, max_size=1) as store:
        busy = trio.Event()

        async def hold_the_only_thread() -> None:
            busy.set()
            await store._run(lambda conn: conn.execute("SELECT pg_sleep(1)"))  # type: ignore[attr-defined]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_the_only_thread)
            await busy.wait()
            await trio.sleep(0.1)  # the sleeper has the only thread now
            with trio.move_on_after(0.2) as waited:
                await store.ping()  # queues for the limiter, then is cancelled there
            # Before the fix, the line above never returned (the test hung here).
            assert waited.cancelled_caught
        await store.ping()  # the store still works


@pytest.fixture(name="any_store", params=("postgres", "embedded"))
async def _any_store(request: pytest.FixtureRequest, schema: str, tmp_path: Path) -> Any:
    if request.param == "embedded":
        settings = Settings(worker_id="t", backend="embedded", state_dir=tmp_path, database_url="")
    else:
        settings = Settings(worker_id="t", database_url=DATABASE_URL, database_schema=schema)
    async with open_store(settings) as store:
        yield store


async def _has_request_hash(store: Store, task_id: str) -> bool:
    """Whether the task's record holds a request hash, read through the store's connection."""
    if isinstance(store, PostgresStore):
        sql = "SELECT request_hash IS NOT NULL FROM task_executions WHERE id = %s"
        return bool(await store._run(lambda c: c.execute(sql, [task_id]).fetchone()[0]))
    assert isinstance(store, SqliteStore)
    sql = "SELECT request_hash IS NOT NULL FROM task_executions WHERE id = ?"
    return bool(await store.run(lambda c: c.execute(sql, [task_id]).fetchone()[0]))


def spec(**extra: Any) -> TaskSpec:
    body = {"task_id": str(uuid.uuid4()), "workspace_id": "ws-1", "steps": [cmd("true")], **extra}
    return parse_task(body)


async def test_start_and_finish_are_compare_and_sets(any_store: Store) -> None:
    """The two writes of every task: a record is written when its producer wrote none; a task
    starts once; a duplicate by idempotency key never starts; only its holder ends it."""
    store = any_store
    pushed = spec(idempotency_key="k1")  # an LPUSH producer: no record yet
    assert await store.start(pushed, worker_id="w1", workspace_path="/v/ws-1") == 1
    rec = await store.get(pushed.task_id)
    assert (rec.status, rec.worker_id, rec.attempts) == (TaskState.RUNNING, "w1", 1)
    assert rec.configuration["steps"][0]["command"] == "true" and rec.idempotency_key == "k1"
    with pytest.raises(InvalidTransitionError, match="running"):
        await store.start(pushed, worker_id="w2", workspace_path="/v/ws-1")

    twin = spec(idempotency_key="k1")  # same key, another id
    with pytest.raises(DuplicateTaskError, match=f"duplicate of task {pushed.task_id}") as dup:
        await store.start(twin, worker_id="w1", workspace_path="/v/ws-1")
    assert dup.value.original_id == pushed.task_id  # typed, on both backends: no string to parse
    with pytest.raises(NotFoundError):
        await store.get(twin.task_id)

    submitted = spec()  # the API path: the record exists, queued
    await store.create(submitted)
    assert await store.start(submitted, worker_id="w1", workspace_path="/v/ws-1") == 1
    unkeyed = spec()  # pushed without a key: no request hash (nothing compares with it)
    await store.start(unkeyed, worker_id="w1", workspace_path="/v/ws-1")
    assert [await _has_request_hash(store, t.task_id) for t in (pushed, submitted, unkeyed)] == [
        True,
        False,
        False,
    ]

    result = {"status": "completed", "result": {"steps": [], "out": "a\u0000b"}}
    with pytest.raises(InvalidTransitionError):  # not the holder
        await store.finish(
            pushed.task_id,
            TaskState.COMPLETED,
            worker_id="w2",
            result=result,
            error=None,
            execution_time_ms=5,
        )
    await store.finish(
        pushed.task_id,
        TaskState.COMPLETED,
        worker_id="w1",
        result=result,
        error=None,
        execution_time_ms=5,
    )
    rec = await store.get(pushed.task_id)
    assert rec.status is TaskState.COMPLETED and rec.execution_time_ms == 5
    assert rec.result is not None and rec.result["result"]["out"] in ("a\u0000b", "a\ufffdb")
    assert rec.completed_at is not None
    with pytest.raises(InvalidTransitionError, match="completed"):  # ended once
        await store.finish(
            pushed.task_id,
            TaskState.FAILED,
            worker_id="w1",
            result=result,
            error="late",
            execution_time_ms=6,
        )
    with pytest.raises(NotFoundError):
        await store.finish(
            str(uuid.uuid4()),
            TaskState.FAILED,
            worker_id="w1",
            result=result,
            error="x",
            execution_time_ms=1,
        )


async def test_the_per_task_connections_are_open_before_the_first_task(schema: str) -> None:
    """All of them, so no task's start waits for a connection while later ones overtake it."""
    settings = Settings(worker_id="t", database_url=DATABASE_URL, database_schema=schema)
    async with open_store(settings, max_size=3) as store:
        fast = store._fast  # type: ignore[attr-defined]
        assert len(fast._idle) == 3
        assert await store.start(spec(), worker_id="w1", workspace_path="/v") == 1
        assert len(fast._idle) == 3  # the one it used is back, none was opened


async def test_the_per_task_statements_survive_a_dropped_connection(schema: str) -> None:
    """A connection the server closed fails one call (UnavailableError); the next one works."""
    settings = Settings(worker_id="t", database_url=DATABASE_URL, database_schema=schema)
    async with open_store(settings) as store:
        first = spec()
        assert await store.start(first, worker_id="w1", workspace_path="/v") == 1
        # Kill every connection of this schema's daemon-side pools from another session.
        await store._run(
            lambda conn: conn.execute(  # type: ignore[attr-defined]
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                "AND application_name = '' AND query LIKE '%task_executions%'"
            )
        )
        second = spec()
        with pytest.raises(UnavailableError):
            await store.start(second, worker_id="w1", workspace_path="/v")
        assert await store.start(second, worker_id="w1", workspace_path="/v") == 1


async def test_a_cancelled_per_task_statement_is_cancelled_on_the_server(schema: str) -> None:
    """Cancelled while its row is locked elsewhere, a start is stopped on the server: the task
    stays queued once the lock goes, and the next call works."""
    settings = Settings(worker_id="t", database_url=DATABASE_URL, database_schema=schema)
    async with open_store(settings) as store:
        queued = spec()
        await store.create(queued)
        locked = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def hold_the_row(conn: Any) -> None:
            conn.execute(
                "SELECT 1 FROM task_executions WHERE id = %s FOR UPDATE", (queued.task_id,)
            )
            token.run_sync_soon(locked.set)
            conn.execute("SELECT pg_sleep(1)")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._run, hold_the_row)  # type: ignore[attr-defined]
            await locked.wait()
            with trio.move_on_after(0.3) as waited:
                await store.start(queued, worker_id="w1", workspace_path="/v")
            assert waited.cancelled_caught
        rec = await store.get(queued.task_id)  # the lock is gone: a live UPDATE would have run
        assert (rec.status, rec.attempts) == (TaskState.QUEUED, 0)
        assert await store.start(queued, worker_id="w1", workspace_path="/v") == 1


async def test_a_stale_pooled_connection_is_replaced_before_use(schema: str) -> None:
    """After PostgreSQL dropped a pooled connection (a restart), the next call still works:
    the pool checks a connection before lending it. Without the check, /health said
    `degraded` once after PostgreSQL came back."""
    settings = Settings(worker_id="t", database_url=DATABASE_URL, database_schema=schema)
    async with open_store(settings, max_size=1) as store:
        pid = await store._run(  # type: ignore[attr-defined]
            lambda conn: conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        )
        with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await store.ping()
        assert (
            await store._run(  # type: ignore[attr-defined]
                lambda conn: conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            )
            != pid
        )


def _nul_free(value: Any) -> Any:
    """What `_json_text` must store: every NUL character replaced, nothing else touched."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_nul_free(v) for v in value]
    return {_nul_free(k): _nul_free(v) for k, v in value.items()}


def test_json_for_jsonb_replaces_nul_characters_and_only_them() -> None:
    rng = random.Random(7)
    alphabet = ["\x00", "\\", "u", "0", "a", "\n", '"', "é"]
    cases: list[Any] = [
        {"stdout": "\x00" * 100_000},
        ["\\u0000", "\\\\u0000", "\\\x00", "\\\\\x00", "\x00\\u0000"],  # literal text, and NULs
        {"k\x00": ["x\x00y", {"\\": "\\\\\\u0000"}]},
    ]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(2000)]
    for value in cases:
        text = _json_text(value)
        assert "\\u0000" not in text.replace("\\\\", "")
        assert json.loads(text) == _nul_free(value), value
