"""Protected paths, tenant symlinks and the inode quota, attacked as a tenant would: a public
token scoped to its own workspace, tasks and tool calls only (plus the orchestrator's internal
file write, which must refuse the same paths). Real daemon, bubblewrap, Redis and PostgreSQL.

Each attack here succeeded against the code before issue 18 (finding 5: `protect` moved with a
`mv`, and the daemon's writes ignored it; finding 6: the daemon followed a tenant's symlink as
root; finding 9: inodes were unlimited).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import INTERNAL_TOKEN, cmd, wait_for
from wsrunner.policy import bundled_policy

WS = "ws-t"


def _default_policy(tmp_path: Path) -> Path:
    """The shipped default policy, with the daemon's git on no network (file:// remotes only)."""
    text = re.sub(r"gitNetwork: \w+", "gitNetwork: none", bundled_policy().read_text())
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    return policy


class Tenant:
    """A public-API client with a token scoped to WS, and the daemon's paths for checks."""

    def __init__(self, daemon: Any, client: httpx.AsyncClient) -> None:
        self.daemon = daemon
        self.client = client
        self.root = Path(daemon.settings.volume_path) / WS

    async def task(self, *steps: dict[str, Any], workspace_id: str = WS) -> dict[str, Any]:
        """Submit a task and wait for its end; its record."""
        r = await self.client.post("/api/tasks/submit",
                                   json={"workspace_id": workspace_id, "steps": list(steps)})  # fmt: skip
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]

        async def done() -> dict[str, Any] | None:
            body: dict[str, Any] = (await self.client.get(f"/api/tasks/{task_id}")).json()
            ended = body["status"] in ("completed", "failed", "cancelled", "timed_out")
            return body if ended else None

        record: dict[str, Any] = await wait_for(done, timeout=60)
        return record

    async def steps(self, *steps: dict[str, Any]) -> list[dict[str, Any]]:
        """The step results of a task running `steps`."""
        record = await self.task(*steps)
        return [s["result"] for s in record["result"]["result"]["steps"]]

    async def tool(self, name: str, **arguments: Any) -> httpx.Response:
        return await self.client.post("/api/tools/call", json={"workspace_id": WS, "tool": name,
                                                               "arguments": arguments})  # fmt: skip


@pytest.fixture(name="tenant")
async def _tenant(start_daemon, tmp_path: Path) -> Any:
    daemon = await start_daemon(
        frontend="frontend", public_host="127.0.0.1", public_port=0, health_port=0,
        internal_token=INTERNAL_TOKEN, policy_file=_default_policy(tmp_path),
    )  # fmt: skip
    _, token = await daemon.service.tokens.create("tenant", [WS])
    async with httpx.AsyncClient(base_url=daemon.urls[0], timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as client:  # fmt: skip
        yield Tenant(daemon, client)


# --- tenant symlinks (finding 6) --------------------------------------------------------------


async def test_repos_as_a_symlink_to_a_host_directory_lists_nothing_of_it(
    tenant: Tenant, tmp_path: Path
) -> None:
    host = tmp_path / "host-dir"
    (host / "host-secret-name").mkdir(parents=True)
    record = await tenant.task(cmd(f"rm -rf repos && ln -s {host} repos && ls -la repos"))
    result = record["result"]["result"]
    assert result["steps"][0]["result"]["exit_code"] == 0, result
    assert result["repos_cached"] == [], result
    assert "host-secret-name" not in str(record)


async def test_git_pull_of_a_symlink_to_a_host_path_answers_as_for_a_missing_repo(
    tenant: Tenant, tmp_path: Path
) -> None:
    there = tmp_path / "host-repo"
    (there / ".git").mkdir(parents=True)  # what a repository looks like to a check of .git
    [made] = await tenant.steps(cmd(f"ln -s {there} repos/there && "
                                    f"ln -s {tmp_path}/nothing repos/gone"))  # fmt: skip
    assert "error" not in made, made
    results = await tenant.steps(*({"action": "git_pull", "repo_name": n}
                                   for n in ("there", "gone", "never")))  # fmt: skip
    errors = [r.get("error") for r in results]
    assert errors == [f"Repo not cached: {n}. Clone it first." for n in ("there", "gone", "never")]
    assert [set(r) - {"duration_ms"} for r in results] == [{"error"}] * 3


# --- the inode quota (finding 9) --------------------------------------------------------------


async def test_a_task_making_more_files_than_the_inode_quota_is_stopped(
    start_daemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        frontend="frontend", public_host="127.0.0.1", public_port=0, health_port=0,
        internal_token=INTERNAL_TOKEN, policy_file=_default_policy(tmp_path),
        workspace_inode_quotas={WS: 3000},
    )  # fmt: skip
    _, token = await daemon.service.tokens.create("tenant", [WS])
    async with httpx.AsyncClient(base_url=daemon.urls[0], timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as client:  # fmt: skip
        tenant = Tenant(daemon, client)
        # Empty files without end: a handful of bytes each, so only the inode quota stops this.
        fill = "python3 -c \"import itertools\nfor i in itertools.count(): open(f'f{i}', 'w')\""
        [result] = await tenant.steps(cmd(fill, timeout=60))
        assert result.get("limits_hit") == ["inode_quota"], result
        assert "over its inode quota of 3000" in result["error"], result
        assert result["duration_ms"] < 30_000, result  # the watch, not the 60 s timeout
        # Until files are deleted, nothing more runs and nothing more is written.
        record = await tenant.task(cmd("true"))
        assert record["status"] == "failed", record
        assert "at its inode quota of 3000" in str(record["error_message"]), record
        r = await tenant.tool("workspace_write_file", path="one-more", content="")
        assert r.status_code == 507 and "inode quota" in r.json()["detail"], r.text
    used = await daemon.service.workspace.workspaces.usage(WS, fresh=True)
    print(f"inode quota 3000: stopped after {result['duration_ms']} ms at {used.inodes} inodes")


# --- the pieces, on a real directory tree ------------------------------------------------------


def test_disk_usage_counts_inodes_at_any_depth_and_follows_no_symlink(tmp_path: Path) -> None:
    import os

    from wsrunner.usage import disk_usage

    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(50):
        (outside / f"f{i}").write_text("x" * 10_000)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "link").symlink_to(outside)
    (ws / "a").write_text("a")
    os.link(ws / "a", ws / "b")  # one inode, two names
    # Deeper than PATH_MAX: 40 directories with 200-character names, a 40 KB file at the end.
    fd = os.open(ws, os.O_RDONLY)
    for _ in range(40):
        os.mkdir("d" * 200, dir_fd=fd)
        child = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    deep = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(deep, b"x" * 40_000)
    os.close(deep)
    os.close(fd)
    used = disk_usage(str(ws))
    assert used.inodes == 1 + 1 + 40 + 1  # the link, a (= b), the directories, the deep file
    assert 40_000 <= used.bytes < 500_000  # the deep file counted; the 50 outside files not
