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

from tests.conftest import INTERNAL_TOKEN, cmd, git_repo, traversable, wait_for
from wsrunner.policy import bundled_policy

WS = "ws-t"
HOSTILE = "[core]\n\tfsmonitor = touch /tmp/pwned\n"


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
        r = await self.client.post(
            "/api/tasks/submit", json={"workspace_id": workspace_id, "steps": list(steps)}
        )
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
        return await self.client.post(
            "/api/tools/call", json={"workspace_id": WS, "tool": name, "arguments": arguments}
        )


@pytest.fixture(name="tenant")
async def _tenant(start_daemon, tmp_path: Path) -> Any:
    daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
        policy_file=_default_policy(tmp_path),
    )
    _, token = await daemon.service.tokens.create("tenant", [WS])
    async with httpx.AsyncClient(
        base_url=daemon.urls[0], timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        yield Tenant(daemon, client)


async def _cloned(tenant: Tenant, tmp_path: Path) -> Path:
    """A clone at repos/origin (by the daemon's git_clone step); its .git directory."""
    origin = tmp_path / "origin"
    origin.mkdir()
    traversable(origin)
    url = git_repo(origin, {"README": "hi\n"})
    [clone] = await tenant.steps({"action": "git_clone", "repo": url, "shallow": False})
    assert "error" not in clone, clone
    return tenant.root / "repos" / "origin" / ".git"


# --- protect (finding 5) ----------------------------------------------------------------------

#: Ways a command tries to put its own config where the repository's is, then to plant a hook.
REPLACE_CONFIG = {
    "mv .git away": "mv repos/origin/.git repos/origin/moved; mkdir -p repos/origin/.git; "
    "printf '{h}' > repos/origin/.git/config",
    "rm config": "rm -f repos/origin/.git/config; printf '{h}' > repos/origin/.git/config",
    "ln -s over it": "printf '{h}' > c; ln -sf $PWD/c repos/origin/.git/config",
    "cp --remove-destination": "printf '{h}' > c; cp --remove-destination c "
    "repos/origin/.git/config",
    "mv a file over it": "printf '{h}' > c; mv -f c repos/origin/.git/config",
    "mv hooks away": "mv repos/origin/.git/hooks repos/origin/h; mkdir repos/origin/.git/hooks; "
    "printf '#!/bin/sh\\ntouch x\\n' > repos/origin/.git/hooks/pre-commit",
    "rm -rf .git": "rm -rf repos/origin/.git; mkdir -p repos/origin/.git; "
    "printf '{h}' > repos/origin/.git/config",  # last: it empties the rest of .git
}


async def test_a_command_cannot_move_or_replace_a_repositorys_config_or_hooks(
    tenant: Tenant, tmp_path: Path
) -> None:
    git = await _cloned(tenant, tmp_path)
    config = (git / "config").read_text()
    same = git.stat().st_ino
    # Work inside the repository goes on as before.
    [commit] = await tenant.steps(
        cmd("cd repos/origin && git commit -q --allow-empty -m agent && git log --oneline | wc -l")
    )
    assert commit.get("stdout", "").strip() == "2", commit
    for name, attack in REPLACE_CONFIG.items():
        [result] = await tenant.steps(cmd(attack.format(h=HOSTILE.replace("\n", "\\n"))))
        assert (git / "config").read_text() == config, (name, result)
        assert "error" in result, (name, result)  # the command is refused somewhere
        assert git.stat().st_ino == same, name  # still the same .git directory
        assert not (git / "hooks" / "pre-commit").exists(), name
    # Its parent directory may be renamed: the protected .git goes along, unchanged, and what the
    # command makes in its place is a new repository of its own (see policies/README.md).
    [moved] = await tenant.steps(cmd("mv repos/origin repos/kept"))
    assert "error" not in moved, moved
    assert (tenant.root / "repos" / "kept" / ".git" / "config").read_text() == config


async def test_the_daemons_writes_refuse_protected_paths(tenant: Tenant, tmp_path: Path) -> None:
    git = await _cloned(tenant, tmp_path)
    config = (git / "config").read_text()
    # Steps of a task.
    results = await tenant.steps(
        {"action": "write_file", "path": "repos/origin/.git/config", "content": HOSTILE},
        {"action": "write_file", "path": "repos/origin/.git/hooks/pre-commit", "content": "x"},
        {"action": "create_directory", "path": "repos/origin/.git/hooks/sub"},
        {"action": "write_file", "path": ".git/config", "content": HOSTILE},  # not there yet
    )
    for result, (path, rule) in zip(
        results,
        [
            ("repos/origin/.git/config", "repos/*/.git/config"),
            ("repos/origin/.git/hooks/pre-commit", "repos/*/.git/hooks"),
            ("repos/origin/.git/hooks/sub", "repos/*/.git/hooks"),
            (".git/config", ".git/config"),
        ],
        strict=True,
    ):
        assert f"path {path!r} is protected by the policy's sandbox.protect rule {rule!r}" in (
            result.get("error", "")
        ), result
    # The tools' file write (public API) and the orchestrator's /files/write (internal API).
    r = await tenant.tool("workspace_write_file", path="repos/origin/.git/config", content=HOSTILE)
    assert r.status_code == 403, r.text
    assert "'repos/*/.git/config'" in r.json()["detail"]
    async with httpx.AsyncClient(
        base_url=tenant.daemon.urls[1], headers={"X-Internal-Token": INTERNAL_TOKEN}
    ) as internal:
        r = await internal.post(
            f"/workspaces/{WS}/files/write",
            json={"path": "repos/origin/.git/hooks/post-checkout", "content": "#!/bin/sh\n"},
        )
    assert r.status_code == 403, r.text
    assert "'repos/*/.git/hooks'" in r.json()["detail"]
    assert (git / "config").read_text() == config
    assert not (git / "hooks" / "pre-commit").exists()
    assert not (git / "hooks" / "post-checkout").exists() and not (git / "hooks" / "sub").exists()
    assert not (tenant.root / ".git").exists()
    # Beside them, files are written as ever.
    [ok] = await tenant.steps(
        {"action": "write_file", "path": "repos/origin/notes.md", "content": "fine"}
    )
    assert ok.get("written") is True, ok


async def test_a_symlink_to_a_protected_path_is_no_way_around_it(
    tenant: Tenant, tmp_path: Path
) -> None:
    git = await _cloned(tenant, tmp_path)
    config = (git / "config").read_text()
    [link] = await tenant.steps(cmd("ln -s repos/origin/.git alias && ln -s alias/hooks hk"))
    assert "error" not in link, link
    results = await tenant.steps(
        {"action": "write_file", "path": "alias/config", "content": HOSTILE},
        {"action": "create_directory", "path": "alias/hooks/new"},
        {"action": "write_file", "path": "hk/pre-commit", "content": "#!/bin/sh\n"},
    )
    for result, shown in zip(
        results,
        [
            "repos/origin/.git/config",
            "repos/origin/.git/hooks/new",
            "repos/origin/.git/hooks/pre-commit",
        ],
        strict=True,
    ):
        assert f"resolves to {shown!r}" in result.get("error", ""), result
        assert "sandbox.protect rule" in result["error"]
    r = await tenant.tool("workspace_write_file", path="alias/hooks/post-merge", content="x")
    assert r.status_code == 403 and "resolves to" in r.json()["detail"], r.text
    assert (git / "config").read_text() == config
    assert sorted(p.name for p in (git / "hooks").iterdir() if not p.name.endswith(".sample")) == []


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
    [made] = await tenant.steps(
        cmd(f"ln -s {there} repos/there && ln -s {tmp_path}/nothing repos/gone")
    )
    assert "error" not in made, made
    results = await tenant.steps(
        *({"action": "git_pull", "repo_name": n} for n in ("there", "gone", "never"))
    )
    errors = [r.get("error") for r in results]
    assert errors == [f"Repo not cached: {n}. Clone it first." for n in ("there", "gone", "never")]
    assert [set(r) - {"duration_ms"} for r in results] == [{"error"}] * 3


# --- the inode quota (finding 9) --------------------------------------------------------------


async def test_a_task_making_more_files_than_the_inode_quota_is_stopped(
    start_daemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
        policy_file=_default_policy(tmp_path),
        workspace_inode_quotas={WS: 3000},
    )
    _, token = await daemon.service.tokens.create("tenant", [WS])
    async with httpx.AsyncClient(
        base_url=daemon.urls[0], timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as client:
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


def test_find_protected_pins_the_holding_directory_and_follows_no_symlink(tmp_path: Path) -> None:
    from wsrunner.workspace.protect import find_protected, rule_for

    for repo in ("a", "b"):
        (tmp_path / "repos" / repo / ".git" / "hooks").mkdir(parents=True)
        (tmp_path / "repos" / repo / ".git" / "config").write_text("")
    (tmp_path / "repos" / "c").mkdir()
    (tmp_path / "repos" / "c" / ".git").symlink_to(tmp_path / "repos" / "a" / ".git")
    (tmp_path / "repos" / "d").symlink_to(tmp_path / "repos" / "b")
    globs = (".git/config", "repos/*/.git/config", "repos/*/.git/hooks", "repos/a/.git/hooks/x")
    (tmp_path / "repos" / "a" / ".git" / "hooks" / "x").mkdir()
    found = find_protected(str(tmp_path), globs)
    rel = lambda ps: [p.removeprefix(f"{tmp_path}/") for p in ps]  # noqa: E731
    assert rel(found.read_only) == [
        "repos/a/.git/config",
        "repos/a/.git/hooks",
        "repos/a/.git/hooks/x",
        "repos/b/.git/config",
        "repos/b/.git/hooks",
    ]
    # The .git holding them, pinned; never a directory inside a read-only one (hooks/).
    assert rel(found.pinned) == ["repos/a/.git", "repos/b/.git"]
    assert rule_for("repos/a/.git/hooks/pre-commit", globs) == "repos/*/.git/hooks"
    assert rule_for("repos/a/.git", globs) is None
    assert rule_for("repos/a/b/.git/config", globs) is None


def test_disk_usage_counts_inodes_at_any_depth_and_follows_no_symlink(tmp_path: Path) -> None:
    import os

    from wsrunner.workspace.usage import disk_usage

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
