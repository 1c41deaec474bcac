"""What every peer's job does, sync and async."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import redis

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
_r = redis.Redis.from_url(URL)


def job_sync(run: str, tid: str) -> None:
    _r.hincrby(f"bench:{run}:runs", tid, 1)  # a task run twice shows as 2
    _r.hset(f"bench:{run}:start", tid, time.time())
    subprocess.run(["true"], check=True)
    _r.hset(f"bench:{run}:done", tid, time.time())


async def job_async(r: redis.asyncio.Redis, run: str, tid: str) -> None:  # type: ignore[type-arg]
    await r.hincrby(f"bench:{run}:runs", tid, 1)
    await r.hset(f"bench:{run}:start", tid, time.time())
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    await r.hset(f"bench:{run}:done", tid, time.time())
