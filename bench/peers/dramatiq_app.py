from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.peers.common import URL, job_sync

dramatiq.set_broker(RedisBroker(url=URL))


@dramatiq.actor(max_retries=0)
def job(run: str, tid: str) -> None:
    job_sync(run, tid)
