from __future__ import annotations

from typing import Any

import redis.asyncio
from saq import Queue

from bench.peers.common import URL, job_async

queue = Queue.from_url(URL)
_r = redis.asyncio.Redis.from_url(URL)


async def job(ctx: dict[str, Any], *, run: str, tid: str) -> None:
    await job_async(_r, run, tid)


settings = {"queue": queue, "functions": [job], "concurrency": 3}
