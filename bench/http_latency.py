"""Latency of wsrunner's HTTP APIs on this machine (wsrunner alone; the peer comparison is issue 6).

    .venv/bin/python bench/http_latency.py [N] [--cold]

Starts a daemon in this process against the local Redis and PostgreSQL (its own key prefix and
schema, removed afterwards; warm sandboxes on unless --cold), then times N sequential requests
of each kind from a client in another process (the standard library's http.client on one
kept-alive connection, so that the client's own CPU is neither on the daemon's event loop nor
much of the figure), and prints p50 / p99 / max in milliseconds:

- submit:        POST /api/tasks/submit (a one-step `true` task) until its 202
- submit→done:   POST, then the task's SSE stream until its final status event
- exec:          internal POST /workspaces/{ws}/exec of `true`
- read 100 KiB:  internal GET /workspaces/{ws}/files/content
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  (before psycopg)
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

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


def client(public: str, internal: str, token: str, n: int) -> dict[str, list[float]]:
    """In the client process: the samples of each kind, in seconds."""

    def connect(url: str) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)

    def call(
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        data = None if body is None else json.dumps(body).encode()
        conn.request(
            method,
            path,
            body=data,
            headers={**(headers or {}), **({"Content-Type": "application/json"} if data else {})},
        )
        return conn.getresponse()

    out: dict[str, list[float]] = {"submit": [], "submit→done": [], "exec": [], "read 100 KiB": []}
    auth = {"Authorization": f"Bearer {token}"}
    body = {"workspace_id": "bench", "steps": [{"action": "execute_command", "command": "true"}]}
    api, events = connect(public), connect(public)
    call(api, "POST", "/api/tasks/submit", body, auth).read()  # warm-up
    for _ in range(n):
        t0 = time.perf_counter()
        answer = json.loads(call(api, "POST", "/api/tasks/submit", body, auth).read())
        out["submit"].append(time.perf_counter() - t0)
        stream = call(events, "GET", urlsplit(answer["events_url"]).path, None, auth)
        while line := stream.readline():
            if b'"status":"completed"' in line or b'"status":"failed"' in line:
                break
        out["submit→done"].append(time.perf_counter() - t0)
        events.close()  # the stream is left unread: a new connection for the next one
    conn, internal_auth = connect(internal), {"X-Internal-Token": TOKEN}
    write = {"path": "f.txt", "content": "x" * 102400}
    call(conn, "POST", "/workspaces/bench/files/write", write, internal_auth).read()
    for _ in range(n):
        t0 = time.perf_counter()
        call(conn, "POST", "/workspaces/bench/exec", {"command": "true"}, internal_auth).read()
        out["exec"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        path = "/workspaces/bench/files/content?path=f.txt"
        call(conn, "GET", path, None, internal_auth).read()
        out["read 100 KiB"].append(time.perf_counter() - t0)
    return out


async def main(n: int, warm: bool) -> None:
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
            warm_sandboxes=warm,
        )
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(run_daemon, settings)
            _, token = await daemon.service.tokens.create("bench", None)
            public, internal = daemon.urls
            argv = [sys.executable, __file__, "--client", public, internal, token, str(n)]
            done = await trio.run_process(argv, capture_stdout=True)
            daemon.stop()
        print(f"warm sandboxes {'on' if warm else 'off'}; the client in another process")
        for name, samples in json.loads(done.stdout).items():
            _report(name, samples)
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA wsrbench_{tag} CASCADE")  # type: ignore[arg-type]
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"wsrbench-{tag}:*"))
    if keys:
        r.unlink(*keys)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        public, internal, token, count = sys.argv[2:6]
        print(json.dumps(client(public, internal, token, int(count))))
    else:
        args = [a for a in sys.argv[1:] if a != "--cold"]
        trio.run(main, int(args[0]) if args else 200, "--cold" not in sys.argv)
