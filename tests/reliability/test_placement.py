"""Workspace placement (issue 22) with daemon processes that have volumes of their own: each
workspace runs on its home host only, and when that host is killed with SIGKILL its tasks
fail saying where the workspace is (local volumes, the default), wait for it
(`home_unavailable: wait`), or move to another host (shared volumes)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import trio

from tests.conftest import cmd, task_body, wait_for
from tests.reliability.conftest import Deployment

LEASE_S = 2.0


async def submit(c: httpx.AsyncClient, ws: str, command: str = "true") -> str:
    r = await c.post("/api/tasks/submit", json=task_body(cmd(command), workspace_id=ws))
    assert r.status_code == 202, r.text
    return str(r.json()["task_id"])


def volume(deployment: Deployment, name: str) -> Path:
    path = deployment.tmp / name
    path.mkdir(exist_ok=True)
    path.chmod(0o711)
    return path


def home_of(deployment: Deployment, ws: str) -> str | None:
    with psycopg.connect(deployment.database_url, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT host FROM "{deployment.schema}".workspace_homes WHERE workspace_id = %s',
            (ws,),
        ).fetchone()
    return None if row is None else str(row[0])


async def test_each_workspace_runs_only_on_its_home_host(deployment: Deployment) -> None:
    vol_a, vol_b = volume(deployment, "vol-a"), volume(deployment, "vol-b")
    a = await deployment.start("host-a", WSRUNNER_HOST_ID="ha", WORKSPACE_VOLUME_PATH=str(vol_a))
    async with deployment.client(a) as c:
        first = await submit(c, "ws-a", "echo a > mark")
        await deployment.wait_terminal([first], timeout=60)
        # Keep A's three slots busy, so that B (which has none yet) makes ws-b its own.
        busy = [await submit(c, f"fill-{i}", "sleep 4") for i in range(3)]
        await wait_for(
            lambda: sum(r["status"] == "running" for r in deployment.rows().values()) == 3
        )
        b = await deployment.start(
            "host-b", WSRUNNER_HOST_ID="hb", WORKSPACE_VOLUME_PATH=str(vol_b)
        )
        second = await submit(c, "ws-b", "echo b > mark")
        await deployment.wait_terminal([second], timeout=60)
        ids = [await submit(c, ws) for ws in ("ws-a", "ws-b") * 4]
        rows = await deployment.wait_terminal([*ids, *busy], timeout=90)
    assert home_of(deployment, "ws-a") == "ha" and home_of(deployment, "ws-b") == "hb"
    for tid in ids:
        row = rows[tid]
        expected = "host-a" if row["workspace_id"] == "ws-a" else "host-b"
        assert row["status"] == "completed" and row["worker_id"] == expected, row
    assert (vol_a / "ws-a" / "mark").exists() and (vol_b / "ws-b" / "mark").exists()
    assert not (vol_b / "ws-a").exists() and not (vol_a / "ws-b").exists()
    assert await a.stop() == 0 and await b.stop() == 0


async def _homed_then_killed(deployment: Deployment, **b_env: str) -> tuple[Any, Any]:
    """A (host ha) runs a task of ws-k; B (host hb) starts; A is killed with SIGKILL."""
    a = await deployment.start(
        "host-a", WSRUNNER_HOST_ID="ha", WORKSPACE_VOLUME_PATH=str(volume(deployment, "vol-a"))
    )
    async with deployment.client(a) as c:
        await deployment.wait_terminal([await submit(c, "ws-k")], timeout=60)
    b = await deployment.start("host-b", WSRUNNER_HOST_ID="hb", **b_env)
    a.kill(signal.SIGKILL)
    await a.wait(timeout=10)
    return a, b


async def test_a_killed_home_host_fails_its_workspaces_tasks_saying_where(
    deployment: Deployment,
) -> None:
    _, b = await _homed_then_killed(
        deployment, WORKSPACE_VOLUME_PATH=str(volume(deployment, "vol-b"))
    )
    async with deployment.client(b) as c:
        tid = await submit(c, "ws-k")
        row = (await deployment.wait_terminal([tid], timeout=30))[tid]
    assert row["status"] == "failed" and row["worker_id"] == "host-b", row
    assert "workspace ws-k lives on host ha" in row["error_message"], row["error_message"]
    assert not (deployment.tmp / "vol-b" / "ws-k").exists()  # nothing made on the wrong host
    assert await b.stop() == 0


async def test_a_killed_home_host_keeps_its_tasks_waiting_when_told(
    deployment: Deployment,
) -> None:
    _, b = await _homed_then_killed(
        deployment,
        WORKSPACE_VOLUME_PATH=str(volume(deployment, "vol-b")),
        WSRUNNER_HOME_UNAVAILABLE="wait",
    )
    async with deployment.client(b) as c:
        tid = await submit(c, "ws-k")
        await trio.sleep(LEASE_S + 1.5)  # past A's lease

        async def says_why() -> bool:
            body = (await c.get(f"/api/tasks/{tid}")).json()
            return (
                body["status"] == "queued"
                and body.get("waiting", {}).get("reason") == "home host ha unavailable"
            )

        await wait_for(says_why, timeout=10)
        # The host comes back: its task runs there.
        a = await deployment.start(
            "host-a2", WSRUNNER_HOST_ID="ha", WORKSPACE_VOLUME_PATH=str(deployment.tmp / "vol-a")
        )
        row = (await deployment.wait_terminal([tid], timeout=30))[tid]
    assert row["status"] == "completed" and row["worker_id"] == "host-a2", row
    assert await a.stop() == 0 and await b.stop() == 0


async def test_with_shared_storage_another_host_takes_the_workspace_over(
    deployment: Deployment,
) -> None:
    shared = volume(deployment, "shared")
    a = await deployment.start(
        "host-a",
        WSRUNNER_HOST_ID="ha",
        WORKSPACE_VOLUME_PATH=str(shared),
        WSRUNNER_VOLUME_SHARED="true",
    )
    async with deployment.client(a) as c:
        await deployment.wait_terminal([await submit(c, "ws-s", "echo one >> log")], timeout=60)
    b = await deployment.start(
        "host-b",
        WSRUNNER_HOST_ID="hb",
        WORKSPACE_VOLUME_PATH=str(shared),
        WSRUNNER_VOLUME_SHARED="true",
    )
    a.kill(signal.SIGKILL)
    await a.wait(timeout=10)
    await trio.sleep(LEASE_S + 1.5)  # A's lease ends
    async with deployment.client(b) as c:
        tid = await submit(c, "ws-s", "echo two >> log; cat log")
        row = (await deployment.wait_terminal([tid], timeout=30))[tid]
    assert row["status"] == "completed" and row["worker_id"] == "host-b", row
    assert row["result"]["result"]["steps"][0]["result"]["stdout"] == "one\ntwo\n"
    assert home_of(deployment, "ws-s") == "hb"
    assert await b.stop() == 0
