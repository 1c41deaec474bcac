"""The seven step actions, containment, quota and credentials, run by a real daemon."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import trio

from tests.conftest import (
    cmd,
    git_repo,
    raw_payload,
    task_body,
    traversable,
    wait_for,
    wait_terminal,
)
from wsrunner.daemon import Daemon
from wsrunner.models import TaskState
from wsrunner.workspace.directories import META_FLUSH_S, SPARES, Workspaces


async def run(daemon: Daemon, *steps, **extra):
    sub = await daemon.service.submit(task_body(*steps, **extra))
    return await wait_terminal(daemon, sub.record.id)


def results(rec):
    return [s["result"] for s in rec.result["result"]["steps"]]


def task_dirs(workspace: Path) -> list[str]:
    """The task directories in a workspace (not the spares kept for later tasks)."""
    return sorted(n for n in os.listdir(workspace / "tasks") if n != SPARES)


async def test_file_steps_round_trip(daemon: Daemon) -> None:
    rec = await run(
        daemon,
        {"action": "create_directory", "path": "src/pkg"},
        {"action": "write_file", "path": "src/pkg/a.txt", "content": "héllo\n"},
        {"action": "read_file", "path": "src/pkg/a.txt"},
        {"action": "list_directory", "path": "src"},
        cmd("cat src/pkg/a.txt", cwd="."),
    )
    assert rec.status is TaskState.COMPLETED, rec.error_message
    mk, wr, rd, ls, sh = results(rec)
    assert mk["created"] is True and wr["size_bytes"] == len("héllo\n".encode())
    assert rd["content"] == "héllo\n" and rd["truncated"] is False
    assert [e["name"] for e in ls["entries"]] == ["pkg"] and ls["entries"][0]["type"] == "dir"
    assert sh["stdout"] == "héllo\n"


async def test_workspace_layout_and_metadata(daemon: Daemon) -> None:
    rec = await run(daemon, cmd("pwd; echo $HOME"), workspace_id="ws-layout")
    root = daemon.settings.volume_path / "ws-layout"
    out = results(rec)[0]["stdout"].split()
    assert out[0] == str(root) and out[1] == str(root / "tasks" / rec.id / "home")
    assert {"repos", "artifacts", "tasks"} <= set(os.listdir(root))
    assert not (root / "tasks" / rec.id).exists()  # ephemeral: removed after the task

    def meta() -> dict[str, Any]:
        return json.loads((root / ".workspace_meta.json").read_text())

    # The count is written behind, by the daemon's own writer, within META_FLUSH_S.
    await wait_for(lambda: meta()["total_tasks_run"] == 1, timeout=META_FLUSH_S + 2)
    assert meta()["workspace_id"] == "ws-layout" and meta()["repos_cached"] == []

    # A removed layout directory is made again for the next task (the layout is only checked
    # per task, not re-made), and tasks ending together are all counted.
    os.rmdir(root / "artifacts")
    ws = daemon.runner.workspaces
    async with trio.open_nursery() as nursery:
        for n in range(24):
            nursery.start_soon(open_and_close, ws, "ws-layout", f"t{n}")
    assert (root / "artifacts").is_dir()
    await ws.flush_metadata()
    assert meta()["total_tasks_run"] == 25 and not task_dirs(root)


async def open_and_close(ws: Workspaces, workspace_id: str, task_id: str) -> None:
    await ws.open_task(workspace_id, task_id, None)
    await ws.close_task(workspace_id, task_id, count=True)


async def test_task_directories_are_made_and_removed_by_the_helper(daemon: Daemon) -> None:
    """The helper process makes and removes task directories as a worker thread would (the
    same files, modes and environment); anything unusual it leaves to the daemon."""
    helper = daemon.runner.workspaces.helper
    await wait_for(lambda: helper.pid is not None)
    # Its environment is where to import from, nothing of the daemon's (no secrets).
    environ = Path(f"/proc/{helper.pid}/environ").read_bytes().split(b"\0")
    assert [e.split(b"=")[0] for e in environ if e] == [b"PYTHONPATH"]

    probe = (
        'stat -c "%a %F" "$HOME" "$TMPDIR" "$GIT_CONFIG_GLOBAL"; cat "$GIT_CONFIG_GLOBAL"; '
        'ls -A "$HOME/.."; find "$HOME" "$TMPDIR" -mindepth 1 | wc -l; stat -c %i "$HOME"'
    )
    rec = await run(daemon, cmd("true"), workspace_id="ws-helper")  # the first one prepares
    before = dir_operations(daemon)
    homes = []
    for _ in range(2):
        rec = await run(daemon, cmd(probe), workspace_id="ws-helper")
        assert rec.status is TaskState.COMPLETED, results(rec)
        out = results(rec)[0]["stdout"].splitlines()
        assert out[:3] == ["755 directory", "755 directory", "644 regular file"], out
        assert out[3:6] == ["[user]", '\tname = "wsrunner"', '\temail = "wsrunner@localhost"']
        assert out[6:10] == ["gitconfig", "home", "tmp", "0"], out  # HOME, TMPDIR empty
        homes.append(out[10])
    assert dir_operations(daemon, since=before) == (4, 0)  # made, removed: by the helper
    # The directory of the first was parked as it was made and is the second's (one inode).
    assert homes[0] == homes[1]
    assert task_dirs(daemon.settings.volume_path / "ws-helper") == []

    # Leftovers: the helper declines the removal; the daemon walks them.
    before = dir_operations(daemon)
    rec = await run(
        daemon, cmd('mkdir -p "$TMPDIR/a/b" && touch "$HOME/.x"'), workspace_id="ws-helper"
    )
    assert rec.status is TaskState.COMPLETED, results(rec)
    assert dir_operations(daemon, since=before) == (1, 1)
    assert task_dirs(daemon.settings.volume_path / "ws-helper") == []


def dir_operations(daemon: Daemon, since: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Task directory operations (by the helper, by a thread) the daemon's metrics counted."""
    get = daemon.metrics.registry.get_sample_value
    done = [
        int(get("wsrunner_task_dir_operations_total", {"by": by}) or 0)
        for by in ("helper", "thread")
    ]
    return done[0] - since[0], done[1] - since[1]


async def test_a_killed_helper_is_started_again_and_no_task_notices(daemon: Daemon) -> None:
    helper = daemon.runner.workspaces.helper
    first = await wait_for(lambda: helper.pid)
    await run(daemon, cmd("true"), workspace_id="ws-helper")
    os.kill(first, 9)
    rec = await run(daemon, cmd("echo still here"), workspace_id="ws-helper")  # in threads
    assert rec.status is TaskState.COMPLETED and results(rec)[0]["stdout"] == "still here\n"
    await wait_for(lambda: helper.pid not in (None, first), timeout=10)
    before = dir_operations(daemon)
    rec = await run(daemon, cmd("true"), workspace_id="ws-helper")
    assert rec.status is TaskState.COMPLETED and dir_operations(daemon, since=before) == (2, 0)
    assert task_dirs(daemon.settings.volume_path / "ws-helper") == []


async def test_paths_cannot_leave_the_workspace(daemon: Daemon, tmp_path) -> None:
    root = daemon.settings.volume_path / "ws-esc"
    root.mkdir(parents=True)
    (root / "out").symlink_to("/etc")
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    (root / "leak").symlink_to(secret)
    rec = await run(
        daemon,
        {"action": "read_file", "path": "../../etc/passwd"},
        {"action": "read_file", "path": "/etc/passwd"},
        {"action": "read_file", "path": "out/passwd"},
        {"action": "read_file", "path": "leak"},
        {"action": "write_file", "path": "out/evil", "content": "x"},
        {"action": "list_directory", "path": "out"},
        cmd("pwd", cwd="out"),
        workspace_id="ws-esc",
    )
    res = results(rec)
    assert all("error" in r for r in res), res
    assert all("s3cret" not in str(r) and "root:" not in str(r) for r in res)
    assert "absolute" in res[1]["error"] and "outside the workspace" in res[2]["error"]
    assert not os.path.exists("/etc/evil")


async def test_quota_exceeded_fails_with_a_clear_message(start_daemon) -> None:
    daemon = await start_daemon(workspace_quotas={"ws-small": 64 * 1024})
    root = daemon.settings.volume_path / "ws-small"
    root.mkdir(parents=True)
    (root / "big").write_bytes(os.urandom(128 * 1024))
    rec = await run(daemon, cmd("echo never"), workspace_id="ws-small")
    assert rec.status is TaskState.FAILED
    assert "storage quota" in rec.error_message and "ws-small" in rec.error_message
    events = await daemon.service.events(rec.id)
    assert events[-1].type == "status_changed" and events[-1].data["status"] == "failed"
    assert any(e.type == "error" for e in events)


async def test_credentials_are_for_the_task_only(daemon: Daemon, redis_client) -> None:
    # Credentials come with a producer's queue payload (the reference system's way); the API
    # refuses them (test_api_public).
    creds = {
        "env_vars": {"API_TOKEN": "tok-123"},
        "git_name": "Ada",
        "git_email": "ada@example.org",
        "ssh_private_key": "-----BEGIN KEY-----\nabc\n-----END KEY-----",
    }
    # The ssh key goes to the daemon's git mirror only (gitremote): no file, no variable here.
    step = cmd(
        'echo "$API_TOKEN"; git config --global user.name; '
        'ls "$(dirname "$HOME")"; echo "${GIT_SSH_COMMAND-unset}"'
    )
    payload = raw_payload(workspace_id="ws-1", steps=[step], credentials=creds)
    keys = daemon.service.queue.keys  # type: ignore[attr-defined]
    redis_client.lpush(keys.queue("normal"), payload)
    rec = await wait_terminal(daemon, json.loads(payload)["task_id"])
    out = results(rec)[0]["stdout"].split()
    assert out == ["tok-123", "Ada", "gitconfig", "home", "tmp", "unset"]
    root = daemon.settings.volume_path / "ws-1"
    assert not (root / "tasks" / rec.id).exists()
    assert not list(root.rglob("ssh_key")) and not list(root.rglob("gitconfig"))  # no spare's
    assert "tok-123" not in str(rec.configuration) and "BEGIN KEY" not in str(rec.configuration)
    events = await daemon.service.events(rec.id)
    assert "BEGIN KEY" not in str([e.data for e in events])


async def test_a_reshaped_task_directory_is_removed_without_following_links(
    daemon: Daemon, tmp_path
) -> None:
    """The task directory is removed however its commands left it: leftovers, a file where a
    directory was, a symlink out of it (followed by nothing), and a symlink in its own place."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    traversable(outside)
    reshape = (
        "import os; h = os.environ['HOME']; d = os.path.dirname(h); "
        "os.makedirs(os.environ['TMPDIR'] + '/a/b'); open(os.environ['TMPDIR'] + '/a/b/f', 'w'); "
        f"os.rmdir(h); os.symlink('{outside}', h); os.unlink(d + '/gitconfig'); "
        "os.mkdir(d + '/gitconfig'); os.mkfifo(d + '/fifo')"
    )
    rec = await run(daemon, cmd(f'python3 -c "{reshape}"'), workspace_id="ws-reshape")
    assert rec.status is TaskState.COMPLETED, results(rec)
    tasks = daemon.settings.volume_path / "ws-reshape" / "tasks"
    assert task_dirs(tasks.parent) == [] and (outside / "keep").read_text() == "keep"
    # A task directory replaced by a symlink: the link goes, its target stays.
    replace = (
        "import os, shutil; d = os.path.dirname(os.environ['HOME']); os.chdir('/'); "
        f"shutil.rmtree(d); os.symlink('{outside}', d)"
    )
    rec = await run(daemon, cmd(f'python3 -c "{replace}"'), workspace_id="ws-reshape")
    assert rec.status is TaskState.COMPLETED, results(rec)
    assert task_dirs(tasks.parent) == [] and (outside / "keep").read_text() == "keep"


async def test_git_clone_then_pull(daemon: Daemon, tmp_path) -> None:
    origin = tmp_path / "origin" / "proj"
    origin.mkdir(parents=True)
    url = git_repo(origin, {"README": "v1\n"}, "v1")
    rec = await run(
        daemon,
        {"action": "git_clone", "repo": url, "branch": "main", "shallow": False},
        cmd("cat repos/proj/README"),
        {"action": "git_pull", "repo_name": "proj"},
    )
    assert rec.status is TaskState.COMPLETED, rec.error_message
    clone, cat, pull = results(rec)
    assert clone["repo_path"] == "repos/proj" and clone["cached"] is False
    assert cat["stdout"] == "v1\n" and pull["cached"] is True
    assert rec.result["result"]["repos_cached"] == ["proj"]
    # A second clone of another remote with the same name is refused, not silently pulled.
    other = tmp_path / "elsewhere" / "proj"
    other.mkdir(parents=True)
    rec2 = await run(
        daemon, {"action": "git_clone", "repo": git_repo(other, {"README": "v1\n"}, "v1")}
    )
    assert "already holds another repository" in results(rec2)[0]["error"]


async def test_git_clone_refuses_schemes_not_allowed(start_daemon) -> None:
    daemon = await start_daemon(git_schemes=("https",))
    rec = await run(
        daemon,
        {"action": "git_clone", "repo": "file:///etc"},
        {"action": "git_clone", "repo": "ext::sh -c id"},
        {"action": "git_pull", "repo_name": "nothing"},
    )
    res = results(rec)
    assert "not allowed" in res[0]["error"] and "expected a URL" in res[1]["error"]
    assert "Repo not cached" in res[2]["error"]


async def test_clone_token_stays_out_of_records_and_git_config(
    daemon: Daemon, tmp_path, redis_client
) -> None:
    origin = tmp_path / "o" / "tok"
    origin.mkdir(parents=True)
    git_repo(origin, {"README": "v1\n"}, "v1")
    # The token is in the URL as legacy producers send it; file:// ignores it, the point is where
    # it ends up.
    url = f"file://x-access-token:ghp_SECRET@{origin}"
    payload = raw_payload(workspace_id="ws-1", steps=[{"action": "git_clone", "repo": url}])
    redis_client.lpush(daemon.service.queue.keys.queue("normal"), payload)  # type: ignore[attr-defined]
    rec = await wait_terminal(daemon, json.loads(payload)["task_id"])
    assert "ghp_SECRET" not in str(rec.configuration)
    assert "ghp_SECRET" not in str(await daemon.service.events(rec.id))
    assert "ghp_SECRET" not in str(rec.result)
