"""Latency of wsrunner's HTTP APIs on this machine (wsrunner alone; the peer comparison is issue 6).

    .venv/bin/python bench/http_latency.py [N]

Starts a daemon in this process against the local Redis and PostgreSQL (its own key prefix and
schema, removed afterwards), then times N sequential requests of each kind with httpx and prints
p50 / p99 / max in milliseconds:

- submit:        POST /api/tasks/submit (a one-step `true` task) until its 202
- submit→done:   POST, then the task's SSE stream until its final status event
- exec:          internal POST /workspaces/{ws}/exec of `true`
- read 100 KiB:  internal GET /workspaces/{ws}/files/content
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  (before psycopg)
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import redis
import trio

from wsrunner.daemon import run_daemon
from wsrunner.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
TOKEN = "bench-internal-token"


def _report(name: str, samples: list[float]) -> None:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(
        f"{name:<14} n={len(ms):<5} p50={statistics.median(ms):7.2f} ms  "
        f"p99={p99:7.2f} ms  max={ms[-1]:7.2f} ms"
    )


async def main(n: int) -> None:
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as volume:
        os.chmod(volume, 0o711)  # the workspaces' own uids pass through, as on a real volume
        settings = Settings(
            worker_id=f"bench-{tag}",
            redis_url=REDIS_URL,
            redis_prefix=f"wsrbench-{tag}",
            database_url=DATABASE_URL,
            database_schema=f"wsrbench_{tag}",
            volume_path=Path(volume),
            public_host="127.0.0.1",
            public_port=0,
            health_port=0,
            internal_token=TOKEN,
            log_level="WARNING",
        )
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(run_daemon, settings)
            _, token = await daemon.service.tokens.create("bench", None)
            public, internal = daemon.urls
            auth = {"Authorization": f"Bearer {token}"}
            body = {
                "workspace_id": "bench",
                "steps": [{"action": "execute_command", "command": "true"}],
            }
            async with httpx.AsyncClient(base_url=public, headers=auth, timeout=30) as c:
                await c.post("/api/tasks/submit", json=body)  # warm-up
                submit, done = [], []
                for _ in range(n):
                    t0 = time.perf_counter()
                    r = await c.post("/api/tasks/submit", json=body)
                    submit.append(time.perf_counter() - t0)
                    async with c.stream("GET", r.json()["events_url"]) as events:
                        async for line in events.aiter_lines():
                            if '"status":"completed"' in line or '"status":"failed"' in line:
                                break
                    done.append(time.perf_counter() - t0)
            headers = {"X-Internal-Token": TOKEN}
            async with httpx.AsyncClient(base_url=internal, headers=headers, timeout=30) as c:
                await c.post(
                    "/workspaces/bench/files/write", json={"path": "f.txt", "content": "x" * 102400}
                )
                exec_, read = [], []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await c.post("/workspaces/bench/exec", json={"command": "true"})
                    exec_.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    await c.get("/workspaces/bench/files/content", params={"path": "f.txt"})
                    read.append(time.perf_counter() - t0)
            daemon.stop()
        _report("submit", submit)
        _report("submit→done", done)
        _report("exec", exec_)
        _report("read 100 KiB", read)
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA wsrbench_{tag} CASCADE")  # type: ignore[arg-type]
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"wsrbench-{tag}:*"))
    if keys:
        r.unlink(*keys)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 200)
