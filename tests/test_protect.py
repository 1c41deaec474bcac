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
