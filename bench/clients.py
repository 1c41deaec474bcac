"""Why each backend has two clients: the per-task half against the general-purpose one, side by side.

    .venv/bin/python bench/clients.py [--calls 2000] [--json]

Redis: one round trip (`PING`) on the native trio client (`wsrunner.backends.redis.resp`,
the per-task half) against redis-py's asyncio client through trio-asyncio (the half that keeps
the cancel channel's subscription). PostgreSQL: one prepared statement (`SELECT $1::int`) on the
trio thread through `wsrunner.backends.postgres.libpq` (the per-task half) against the psycopg
connection pool in a worker thread (`trio.to_thread`, as the store runs every other statement).
Sequential calls on one connection each, against the local servers; microseconds per call
(median of five rounds) and the process's CPU per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import trio_asyncio  # isort: skip  (before psycopg)
import psycopg_pool
import redis.asyncio
import trio

from wsrunner.backends.postgres.libpq import LibpqPool
from wsrunner.backends.redis.resp import RespClient

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def measure(call: Callable[[], Awaitable[object]], calls: int) -> tuple[float, float]:
    """(median wall µs per call over five rounds, process CPU µs per call over all of them)."""
    for _ in range(min(200, calls)):  # warm: connections open, statements prepared
        await call()
    walls, cpu0 = [], time.process_time()
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            await call()
        walls.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(walls), (time.process_time() - cpu0) / (5 * calls) * 1e6


async def main(calls: int) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    native = RespClient.from_url(REDIS_URL)
    out["redis: native trio client (resp.py)"] = await measure(
        lambda: native.execute("PING"), calls
    )
    await native.aclose()

    async with trio_asyncio.open_loop():
        client = redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=None)
        ping = trio_asyncio.aio_as_trio(client.ping)
        out["redis: redis-py asyncio via trio-asyncio"] = await measure(ping, calls)
        await trio_asyncio.aio_as_trio(client.aclose)()

    fast = LibpqPool(DATABASE_URL, options="", size=1)
    try:
        out["postgres: libpq on the trio thread (libpq.py)"] = await measure(
            lambda: fast.call("one", "SELECT $1::int", ["1"]), calls
        )
    finally:
        fast.close()

    pool = psycopg_pool.ConnectionPool(DATABASE_URL, min_size=1, max_size=1, open=True)

    def select() -> object:
        with pool.connection() as conn:
            return conn.execute("SELECT %s::int", (1,), prepare=True).fetchone()

    try:
        out["postgres: psycopg pool in a worker thread"] = await measure(
            lambda: trio.to_thread.run_sync(select), calls
        )
    finally:
        pool.close()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (five rounds)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    results = trio.run(main, args.calls)
    if args.json:
        print(json.dumps({k: {"wall_us": w, "cpu_us": c} for k, (w, c) in results.items()}))
    else:
        print(f"{'client':48} {'wall µs/call':>13} {'CPU µs/call':>12}")
        for name, (wall, cpu) in results.items():
            print(f"{name:48} {wall:13.1f} {cpu:12.1f}")
