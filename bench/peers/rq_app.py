from __future__ import annotations

from bench.peers.common import job_sync


def job(run: str, tid: str) -> None:
    job_sync(run, tid)
