"""What every peer's job does, sync and async.

With BENCH_PEER_DATABASE_URL set (the `+pg` systems of peers.py), the job also keeps a durable
PostgreSQL record of its task as wsrunner does: a row written when it starts and updated with
its result when it ends, two autocommitted statements (synchronous commit) on a connection of
its own thread (or, async, one free connection per running job). The table (BENCH_PEER_TABLE)
is made by the round; it is smaller than wsrunner's (5 columns and 2 indexes against 38 and 6).

With BENCH_PEER_SANDBOX set too (`dramatiq+pg+bwrap`), the sync job runs its command through
wsrunner's cold sandbox launch (bench/peers/sandbox.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from typing import Any

import redis

from bench.peers.sandbox import CHAIN

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
DATABASE_URL = os.environ.get("BENCH_PEER_DATABASE_URL")
TABLE = os.environ.get("BENCH_PEER_TABLE", "bench_peer_tasks")
START = f"INSERT INTO {TABLE} (id, status, started_at) VALUES (%s, 'running', now())"
END = f"UPDATE {TABLE} SET status = 'completed', completed_at = now(), result = %s WHERE id = %s"
_r = redis.Redis.from_url(URL)
_local = threading.local()


def _result() -> str:
    return json.dumps({"status": "completed", "exit_code": 0, "stdout": "", "stderr": ""})


def _connection() -> Any:
    conn = getattr(_local, "conn", None)
    if conn is None:
        import psycopg

        conn = _local.conn = psycopg.connect(DATABASE_URL, autocommit=True)
    return conn


def job_sync(run: str, tid: str) -> None:
    _r.hincrby(f"bench:{run}:runs", tid, 1)  # a task run twice shows as 2
    _r.hset(f"bench:{run}:start", tid, time.time())
    if DATABASE_URL:
        _connection().execute(START, [f"{run}:{tid}"])
    if CHAIN is not None:
        CHAIN.run(["true"], check=True)
    else:
        subprocess.run(["true"], check=True)
    if DATABASE_URL:
        _connection().execute(END, [_result(), f"{run}:{tid}"])
    _r.hset(f"bench:{run}:done", tid, time.time())


_idle: list[Any] = []  # async connections not in use (the event loop's thread only)


async def _statement(sql: str, params: list[str]) -> None:
    import psycopg

    conn = (
        _idle.pop()
        if _idle
        else await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True)
    )
    try:
        await conn.execute(sql, params)
    finally:
        _idle.append(conn)


async def job_async(r: redis.asyncio.Redis, run: str, tid: str) -> None:  # type: ignore[type-arg]
    await r.hincrby(f"bench:{run}:runs", tid, 1)
    await r.hset(f"bench:{run}:start", tid, time.time())
    if DATABASE_URL:
        await _statement(START, [f"{run}:{tid}"])
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    if DATABASE_URL:
        await _statement(END, [_result(), f"{run}:{tid}"])
    await r.hset(f"bench:{run}:done", tid, time.time())
