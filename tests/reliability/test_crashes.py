"""Daemons killed, Redis wiped, PostgreSQL restarted: every task still ends exactly once."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import httpx
import trio

from tests.conftest import PrivateRedis, cmd, task_body, wait_for
from tests.reliability.conftest import Deployment, PrivatePostgres, assert_complete

LEASE_S = 2.0  # WSRUNNER_LEASE_TTL of every daemon here


async def submit(c: httpx.AsyncClient, *steps: dict[str, Any], **extra: Any) -> str:
    r = await c.post("/api/tasks/submit", json=task_body(*steps, **extra))
    assert r.status_code == 202, r.text
    return str(r.json()["task_id"])


def runs_recorded(deployment: Deployment, task_id: str) -> int:
    """How many runs of the task's step reached its first line (the file it counts in)."""
    f = deployment.volume / "ws-1" / f"run-{task_id}"
    return int(f.read_text()) if f.exists() else 0


async def test_sigkill_one_of_two_daemons_loses_nothing(deployment: Deployment) -> None:
    a = await deployment.start("daemon-a")
    b = await deployment.start("daemon-b")
    # Each step says which attempt it is: a file per task in the shared workspace.
    step = cmd(
        'n=$(cat "run-$TASK_ID" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "run-$TASK_ID"; '
        'sleep 1; echo "attempt $n"'
    )
    async with deployment.client(a) as c:
        ids = [await submit(c, step, timeout_seconds=60) for _ in range(12)]

    # Kill A while it holds running tasks: frozen first, so that what it holds can be read
    # (statements it had sent land, commands it had started write their file), then killed.
    def running_on_a() -> list[str]:
        return [
            i
            for i, r in deployment.rows().items()
            if r["worker_id"] == "daemon-a" and r["status"] == "running"
        ]

    await wait_for(
        lambda: (
            len(ids_ := running_on_a()) >= 2 and any(runs_recorded(deployment, i) for i in ids_)
        ),
        timeout=30,
    )
    a.kill(signal.SIGSTOP)
    await trio.sleep(0.3)
    held = set(running_on_a())
    # A task A started just before the freeze may not have reached its command yet.
    runs_before = {i: runs_recorded(deployment, i) for i in held}
    assert len(held) >= 2 and any(runs_before.values()), runs_before
    killed_at = time.monotonic()
    a.kill(signal.SIGKILL)
    rows = await deployment.wait_terminal(ids, timeout=60)
    taken_over_in = time.monotonic() - killed_at
    for i in ids:
        assert_complete(rows[i])
    for i in held:  # run again by B after A's lease expired, and counted
        assert rows[i]["worker_id"] == "daemon-b" and rows[i]["attempts"] == 2, rows[i]
        # The re-run sees the workspace as A's run left it.
        stdout = rows[i]["result"]["result"]["steps"][0]["result"]["stdout"]
        assert stdout == f"attempt {runs_before[i] + 1}\n", (stdout, runs_before[i])
    assert all(rows[i]["attempts"] == 1 for i in set(ids) - held)
    # The bound: lease (2 s) + one reaper pass (heartbeat interval) + the re-run (1 s) + slack.
    assert taken_over_in < LEASE_S + 12, taken_over_in
    assert await b.stop() == 0


async def test_redis_restarted_empty_while_tasks_queue_and_run(
    deployment: Deployment, private_redis: PrivateRedis
) -> None:
    deployment.redis_url = private_redis.url
    d = await deployment.start("daemon", WORKER_CONCURRENCY="1")
    async with deployment.client(d) as c:
        ids = [await submit(c, cmd(f"sleep 0.5; echo {n}")) for n in range(8)]
        await wait_for(lambda: any(r["status"] == "running" for r in deployment.rows().values()))
        private_redis.stop()  # queued payloads, status hashes, events, claims: all gone
        await trio.sleep(1)
        private_redis.start()
        rows = await deployment.wait_terminal(ids, timeout=90)
        for n, i in enumerate(ids):
            assert_complete(rows[i], stdout=f"{n}\n")
        # New work is accepted and runs as before.
        last = await submit(c, cmd("echo after"))
        assert_complete(
            (await deployment.wait_terminal([last], timeout=30))[last], stdout="after\n"
        )
    assert await d.stop() == 0


async def test_postgres_restarted_mid_run_degrades_health_and_loses_nothing(
    deployment: Deployment, private_postgres: PrivatePostgres
) -> None:
    deployment.database_url = private_postgres.url
    d = await deployment.start("daemon")
    async with (
        deployment.client(d) as c,
        httpx.AsyncClient(base_url=d.internal, timeout=10) as internal,
    ):
        ids = [await submit(c, cmd(f"sleep 0.3; echo {n}")) for n in range(12)]
        await wait_for(lambda: any(r["status"] == "running" for r in deployment.rows().values()))
        private_postgres.stop()
        started = time.monotonic()
        health: list[dict[str, Any]] = []
        while time.monotonic() - started < 3:
            t0 = time.monotonic()
            r = await internal.get("/health")
            assert time.monotonic() - t0 < 6  # CHECK_TIMEOUT_S bounds each check
            health.append({"code": r.status_code, **r.json()})
            await trio.sleep(0.5)
        assert all(h["code"] == 503 and h["status"] == "degraded" for h in health), health
        assert all(h["checks"]["postgres"].startswith("unavailable") for h in health)
        assert all(h["checks"]["redis"] == "ok" for h in health)
        assert d.proc is not None and d.proc.poll() is None  # the daemon stays up
        private_postgres.start()
        rows = await deployment.wait_terminal(ids, timeout=120)
        r = await internal.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "healthy"
    for n, i in enumerate(ids):
        assert_complete(rows[i], stdout=f"{n}\n")
    assert await d.stop() == 0


async def test_sigterm_drains_requeues_the_rest_and_ends_streams(deployment: Deployment) -> None:
    d = await deployment.start("graceful", WSRUNNER_SHUTDOWN_GRACE="3")
    ends: dict[str, list[str]] = {}
    async with deployment.client(d) as c:
        short = [await submit(c, cmd(f"sleep 1; echo short{n}")) for n in range(2)]
        long = await submit(
            c,
            cmd("if [ -e resumed ]; then echo resumed; else touch resumed; sleep 300; fi"),
            timeout_seconds=600,
        )
        await wait_for(
            lambda: sum(r["status"] == "running" for r in deployment.rows().values()) == 3
        )

        async def follow(tid: str) -> None:
            seen: list[str] = []
            async with c.stream("GET", f"/api/tasks/{tid}/events") as r:
                async for line in r.aiter_lines():  # ends without an error when the daemon goes
                    if line.startswith("data:"):
                        seen.append(json.loads(line[5:]).get("status", ""))
            ends[tid] = seen

        async with trio.open_nursery() as nursery:
            for tid in (*short, long):
                nursery.start_soon(follow, tid)
            await trio.sleep(0.5)
            t0 = time.monotonic()
            d.kill(signal.SIGTERM)
            assert await d.wait(timeout=30) == 0
            assert time.monotonic() - t0 < 3 + 5  # the grace period, and the requeue after it
    rows = deployment.rows()
    for n, tid in enumerate(short):  # finished within the grace period
        assert_complete(rows[tid], stdout=f"short{n}\n")
        assert "completed" in ends[tid]
    assert rows[long]["status"] == "queued"  # given back, not lost and not failed
    assert set(ends) == {*short, long}
    successor = await deployment.start("successor")
    rows = await deployment.wait_terminal([long], timeout=30)
    assert_complete(rows[long], stdout="resumed\n")
    assert rows[long]["attempts"] == 2 and rows[long]["worker_id"] == "successor"
    assert await successor.stop() == 0
