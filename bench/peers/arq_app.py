from __future__ import annotations

from typing import Any, ClassVar

import redis.asyncio
from arq.connections import RedisSettings

from bench.peers.common import URL, job_async

SETTINGS = RedisSettings.from_dsn(URL)


async def job(ctx: dict[str, Any], run: str, tid: str) -> None:
    await job_async(ctx["bench_redis"], run, tid)


async def startup(ctx: dict[str, Any]) -> None:
    ctx["bench_redis"] = redis.asyncio.Redis.from_url(URL)


class WorkerSettings:
    functions: ClassVar = [job]
    redis_settings = SETTINGS
    max_jobs = 3  # arq's other settings are its defaults (poll_delay 0.5 s)
    on_startup = startup


async def enqueue(pool: Any, run: str, tid: str) -> None:
    await pool.enqueue_job("job", run, tid)
