"""Load and abuse: many clients, a deep queue, huge output, a full disk, a fork bomb.

Throughout, a watcher asks `/health` every 100 ms: it must answer within 1 s every time, and the
daemon's memory must stay bounded.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import httpx
import redis
import trio

from tests.conftest import cmd, wait_for
from tests.reliability.conftest import TERMINAL, Daemon, Deployment, assert_complete
from tests.reliability.test_crashes import submit

MiB = 1024 * 1024


#: The first line of the warm supervisor's source, which is its command line (`python3 -c`).
WARM_SUPERVISOR = b"The first process of a warm sandbox"


def uid_pids(uid: int) -> list[int]:
    """Host pids of the live (not zombie) processes running as `uid`."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid != uid:
                    continue
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in (b"Z", b"X"):
                pids.append(int(entry.name))
    return pids


def command_pids(uid: int) -> list[int]:
    """`uid_pids` but the workspace's warm sandbox itself (its bubblewrap, supervisor and
    spare), which lives on between commands until it is idle."""

    def sandbox_own(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return False
        return argv[0].endswith(b"bwrap") or any(WARM_SUPERVISOR in arg for arg in argv)

    return [pid for pid in uid_pids(uid) if not sandbox_own(pid)]


class Watch:
    """Health answer times and the daemon's peak RSS, sampled every 100 ms."""

    def __init__(self) -> None:
        self.slowest_s = 0.0
        self.answers = 0
        self.failures: list[str] = []
        self.peak_rss = 0


@asynccontextmanager
async def watched(daemon: Daemon) -> AsyncIterator[Watch]:
    watch = Watch()

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=daemon.internal, timeout=5) as client:
            while True:
                t0 = time.monotonic()
                try:
                    r = await client.get("/health")
                    if r.status_code != 200:
                        watch.failures.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    watch.failures.append(repr(exc))
                watch.slowest_s = max(watch.slowest_s, time.monotonic() - t0)
                watch.answers += 1
                watch.peak_rss = max(watch.peak_rss, daemon.rss_bytes())
                await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        yield watch
        nursery.cancel_scope.cancel()
    assert watch.answers > 0 and not watch.failures, watch.failures[:5]
    assert watch.slowest_s < 1.0, f"/health took {watch.slowest_s:.2f}s"


CLIENTS = """
import json, sys, trio, httpx
url, token = sys.argv[1], sys.argv[2]
ids = []
async def client(n):
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        for k in range(10):
            body = {"workspace_id": f"ws-{n % 5}",
                    "steps": [{"action": "execute_command", "command": f"echo {n}-{k}"}]}
            r = await c.post("/api/tasks/submit", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["task_id"])
async def main():
    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(client, n)
trio.run(main)
print(json.dumps(ids))
"""


async def test_500_concurrent_submissions_from_50_clients(deployment: Deployment) -> None:
    d = await deployment.start("daemon")
    async with watched(d) as watch:
        # The clients run in a process of their own, so the watcher measures only the daemon.
        done = await trio.run_process(
            [sys.executable, "-c", CLIENTS, d.public, deployment.token], capture_stdout=True
        )
        ids = json.loads(done.stdout)
        assert len(set(ids)) == 500
        rows = await deployment.wait_terminal(ids, timeout=180)
    for i in ids:
        assert_complete(rows[i])
        assert rows[i]["attempts"] == 1
    print(
        f"500 submissions: /health slowest {watch.slowest_s * 1000:.0f} ms; peak RSS {watch.peak_rss / MiB:.0f} MiB"
    )
    assert watch.peak_rss < 400 * MiB
    assert await d.stop() == 0


async def test_10000_queued_tasks_run_once_each(deployment: Deployment) -> None:
    # The queue's mechanics, not the sandbox's cost: the sandbox is off (policy `require: none`).
    (deployment.tmp / "policy.yaml").write_text(
        (deployment.tmp / "policy.yaml").read_text().replace("require: full", "require: none")
    )
    r = redis.Redis.from_url(deployment.redis_url)
    now = datetime.now(UTC).isoformat()
    ids = [str(uuid.uuid4()) for _ in range(10_000)]
    payloads = [
        json.dumps(
            {
                "task_id": t,
                "task_type": "background_job",
                "workspace_id": "ws-deep",
                "priority": "normal",
                "timeout_seconds": 60,
                "created_at": now,
                "steps": [cmd("true")],
            }
        )
        for t in ids
    ]
    for i in range(0, len(payloads), 1000):  # as the reference system's producers push
        r.lpush(f"{deployment.prefix}:tasks:normal", *payloads[i : i + 1000])
    d = await deployment.start("daemon", WSRUNNER_SANDBOX="off")
    async with watched(d) as watch:
        t0 = time.monotonic()
        rows = await deployment.wait_terminal(ids, timeout=600)
        took = time.monotonic() - t0
    assert len(rows) == 10_000
    assert all(row["status"] == "completed" and row["attempts"] == 1 for row in rows.values())
    assert r.llen(f"{deployment.prefix}:tasks:normal") == 0
    assert r.hlen(f"{deployment.prefix}:worker:daemon:inflight") == 0
    print(
        f"10,000 queued: drained in {took:.1f}s ({10_000 / took:.0f} tasks/s); /health slowest "
        f"{watch.slowest_s * 1000:.0f} ms; peak RSS {watch.peak_rss / MiB:.0f} MiB"
    )
    assert watch.peak_rss < 400 * MiB
    assert await d.stop() == 0


async def test_gigabyte_output_full_disk_and_fork_bomb_leave_the_daemon_responsive(
    deployment: Deployment,
) -> None:
    d = await deployment.start("daemon", WORKSPACE_DEFAULT_QUOTA_GB="0.05")  # 51.2 MiB each
    async with watched(d) as watch, deployment.client(d) as c:
        flood = await submit(c, cmd("head -c 1073741824 /dev/zero"), workspace_id="ws-flood")
        disk = await submit(
            c, cmd("head -c 200000000 /dev/zero > big && echo never"), workspace_id="ws-disk"
        )
        bomb = await submit(
            c, cmd("bomb() { bomb | bomb & }; bomb", timeout=5), workspace_id="ws-bomb"
        )
        fine = await submit(c, cmd("echo still fine"), workspace_id="ws-ok")
        rows = await deployment.wait_terminal([flood, disk, bomb, fine], timeout=120)
        after = await submit(c, cmd("echo after"), workspace_id="ws-ok")
        rows |= await deployment.wait_terminal([after], timeout=30)
    out = rows[flood]["result"]["result"]["steps"][0]["result"]
    assert rows[flood]["status"] == "completed" and out["stdout_bytes"] == 1073741824
    assert (
        out["truncated"] and out["stdout"] == "\ufffd" * MiB
    )  # the cap kept; NUL stored as U+FFFD
    quota = rows[disk]["result"]["result"]["steps"][0]["result"]
    assert rows[disk]["status"] == "failed" and "never" not in quota["stdout"], quota
    big = deployment.volume / "ws-disk" / "big"
    assert big.stat().st_size <= int(0.05 * 1024 * MiB)  # stopped at the quota, not 200 MB
    # However the bomb's shell ended, nothing of it is left: no process has the workspace's uid.
    uid = (deployment.volume / "ws-bomb").stat().st_uid
    assert uid >= 200_000  # a workspace uid of its own
    assert rows[bomb]["status"] in TERMINAL
    await wait_for(lambda: not command_pids(uid), timeout=5)  # killed with the step's cgroup
    assert_complete(rows[fine], stdout="still fine\n")
    assert_complete(rows[after], stdout="after\n")
    print(
        f"1 GB output, quota, fork bomb: /health slowest {watch.slowest_s * 1000:.0f} ms; "
        f"peak RSS {watch.peak_rss / MiB:.0f} MiB"
    )
    assert watch.peak_rss < 400 * MiB
    assert await d.stop() == 0
