from __future__ import annotations

from celery import Celery

from bench.peers.common import URL, job_sync

app = Celery("bench", broker=URL)
app.conf.update(
    task_ignore_result=True, worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True
)


@app.task(name="job")
def job(run: str, tid: str) -> None:
    job_sync(run, tid)
