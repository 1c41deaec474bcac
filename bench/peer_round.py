"""One round of one workload for one peer queue; prints a JSON line. Run by bench/peers.py in
the benchmark's own virtualenv (bench/.venv), where the peers are installed from PyPI:

    bench/.venv/bin/python -m bench.peer_round PEER throughput|latency|drain|priority N
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.machine import machine_busy_s

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ["BENCH_REDIS_URL"]
PY = sys.executable
BIN = Path(sys.executable).parent
WORKERS = {
    "arq": [PY, "-m", "arq", "bench.peers.arq_app.WorkerSettings"],
    "saq": [PY, "-m", "saq", "bench.peers.saq_app.settings"],
    "dramatiq": [
        PY,
        "-m",
        "dramatiq",
        "bench.peers.dramatiq_app",
        "--processes",
        "1",
        "--threads",
        "3",
    ],
    "celery": [
        PY,
        "-m",
        "celery",
        "-A",
        "bench.peers.celery_app",
        "worker",
        "--concurrency",
        "3",
        "--pool",
        "threads",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        "WARNING",
    ],
    # RQ runs one job per process; its pool of 3 is how it reaches a concurrency of 3.
    "rq": [str(BIN / "rq"), "worker-pool", "--num-workers", "3", "--url", URL, "--quiet"],
}


class Producer:
    """The peer's own client API, as its users enqueue."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.loop = asyncio.new_event_loop()
        if peer == "arq":
            from arq import create_pool

            from bench.peers.arq_app import SETTINGS

            self.pool = self.loop.run_until_complete(create_pool(SETTINGS))
        elif peer == "saq":
            from bench.peers.saq_app import queue

            self.queue = queue
            self.loop.run_until_complete(queue.connect())
        elif peer == "dramatiq":
            from bench.peers.dramatiq_app import job

            self.job = job
        elif peer == "celery":
            from bench.peers.celery_app import job as cjob

            self.job = cjob
        elif peer == "rq":
            from rq import Queue

            self.queue = Queue(connection=redis.Redis.from_url(URL))

    def send(self, run: str, tid: str, *, queue: str | None = None) -> None:
        if self.peer == "arq":
            self.loop.run_until_complete(self.pool.enqueue_job("job", run, tid))
        elif self.peer == "saq":
            self.loop.run_until_complete(self.queue.enqueue("job", run=run, tid=tid))
        elif self.peer == "dramatiq":
            self.job.send(run, tid)
        elif self.peer == "celery":
            self.job.delay(run, tid)
        elif queue is not None:
            from rq import Queue

            Queue(queue, connection=self.queue.connection).enqueue(
                "bench.peers.rq_app.job", run, tid
            )
        else:
            self.queue.enqueue("bench.peers.rq_app.job", run, tid)


#: Peers whose worker takes a higher priority first, and how it is asked to.
PRIORITY = {"rq": ["high", "low"]}  # the worker serves its queues in the order given


def start_worker(peer: str, queues: list[str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*WORKERS[peer], *(queues or [])],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def throughput(peer: str, n: int) -> dict[str, Any]:
    r = redis.Redis.from_url(URL)
    r.flushdb()
    run = uuid.uuid4().hex[:8]
    producer = Producer(peer)
    for i in range(n):  # queued before the worker starts: only the draining is timed
        producer.send(run, f"t{i}")
    worker = start_worker(peer)
    deadline = time.time() + 600
    try:
        while (done0 := r.hlen(f"bench:{run}:done")) == 0 and time.time() < deadline:
            time.sleep(0.01)
        busy0 = machine_busy_s()  # from the first end on: the worker's start-up left out
        while r.hlen(f"bench:{run}:done") < n and time.time() < deadline:
            time.sleep(0.05)
        busy = machine_busy_s() - busy0
        time.sleep(0.5)  # would a task run twice?
    finally:
        stop_worker(worker)
    starts = [float(v) for v in r.hvals(f"bench:{run}:start")]
    done = [float(v) for v in r.hvals(f"bench:{run}:done")]
    span = max(done) - min(starts)
    return {
        "peer": peer,
        "workload": "throughput",
        "n": n,
        "tasks_per_s": len(done) / span,
        "lost": n - len(done),
        "machine_cpu_ms_per_task": busy / max(1, n - done0) * 1000,
        "run_twice": sum(1 for v in r.hvals(f"bench:{run}:runs") if int(v) > 1),
    }


def latency(peer: str, n: int) -> dict[str, Any]:
    r = redis.Redis.from_url(URL)
    r.flushdb()
    run = uuid.uuid4().hex[:8]
    producer = Producer(peer)
    worker = start_worker(peer)
    start_ms: list[float] = []
    done_ms: list[float] = []
    try:
        for i in range(-5, n):  # five warm-up tasks, not counted
            tid = f"t{i}"
            t0 = time.time()
            producer.send(run, tid)
            deadline = t0 + (120 if i < 0 else 30)
            while (end := r.hget(f"bench:{run}:done", tid)) is None:
                if time.time() > deadline:
                    raise TimeoutError(f"{peer}: task {tid} did not finish")
                time.sleep(0.0002)
            if i >= 0:
                start_ms.append((float(r.hget(f"bench:{run}:start", tid)) - t0) * 1000)
                done_ms.append((float(end) - t0) * 1000)
    finally:
        stop_worker(worker)
    return {
        "peer": peer,
        "workload": "latency",
        "n": n,
        **quantiles("start", start_ms),
        **quantiles("done", done_ms),
    }


def priority(peer: str, n_low: int) -> dict[str, Any]:
    """n_low low tasks drain; once 100 of them ran, 100 high ones are queued. Counted: the low
    tasks that started after the high ones were queued and before the last high one started
    (a strict priority queue: 0), and before the last high one finished."""
    if peer not in PRIORITY:
        return {"peer": peer, "workload": "priority", "n": n_low, "skipped": "no priority on Redis"}
    high_q, low_q = PRIORITY[peer]
    r = redis.Redis.from_url(URL)
    r.flushdb()
    run = uuid.uuid4().hex[:8]
    producer = Producer(peer)
    for i in range(n_low):
        producer.send(run, f"low{i}", queue=low_q)
    worker = start_worker(peer, PRIORITY[peer])
    try:
        while r.hlen(f"bench:{run}:done") < 100:
            time.sleep(0.01)
        t_high = time.time()
        for i in range(100):
            producer.send(run, f"high{i}", queue=high_q)
        while sum(1 for k in r.hkeys(f"bench:{run}:done") if k.startswith(b"high")) < 100:
            time.sleep(0.02)
    finally:
        stop_worker(worker)
    start = {k.decode(): float(v) for k, v in r.hgetall(f"bench:{run}:start").items()}
    done = {k.decode(): float(v) for k, v in r.hgetall(f"bench:{run}:done").items()}
    last_start = max(v for k, v in start.items() if k.startswith("high"))
    last_done = max(v for k, v in done.items() if k.startswith("high"))
    lows = [v for k, v in start.items() if k.startswith("low") and v > t_high]
    return {
        "peer": peer,
        "workload": "priority",
        "n": n_low,
        "low_before_last_high_start": sum(v < last_start for v in lows),
        "low_before_last_high_done": sum(v < last_done for v in lows),
    }


def quantiles(name: str, values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        f"{name}_p50_ms": statistics.median(values),
        f"{name}_p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))],
    }


if __name__ == "__main__":
    peer, workload, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run_workload = {
        "throughput": throughput,
        "drain": throughput,
        "latency": latency,
        "priority": priority,
    }[workload]
    result = run_workload(peer, count)
    result["workload"] = workload
    print(json.dumps(result))
