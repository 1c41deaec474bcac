"""Warm sandboxes (issue 21): one live sandbox per workspace, each command started inside it.

Real bubblewrap, real cgroups, real processes. Which sandbox a command ran in is read from
inside (its pid and mount namespaces) and from the pool (`WarmPool.sandboxes`); what is left
running is read from the host (`/proc`), by the unique arguments the test gave a command or
by the workspace's uid.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import (
    DATABASE_URL,
    REDIS_URL,
    cmd,
    host_pids,
    task_body,
    traversable,
    unique_seconds,
    wait_for,
    wait_terminal,
)
from tests.integration.test_metrics import samples
from tests.reliability.conftest import Deployment
from tests.system.test_invariants import TASK_ENV
from wsrunner.daemon import Daemon, reload_policy
from wsrunner.execution.process import Capture
from wsrunner.execution.sandbox import Sandbox, cgroups
from wsrunner.execution.sandbox.supervisor import receive
from wsrunner.execution.sandbox.warm import SUPERVISOR, WarmCommand, WarmKey, WarmSandbox
from wsrunner.execution.sandbox.warm_pool import WarmPool
from wsrunner.metrics import WARM_STARTS, WARM_STOPS
from wsrunner.policy import bundled_policy, load_policy

#: The variables of a task's commands (wsrunner/workspace/directories.py `open_task`).
POLICY = """\
apiVersion: wsrunner/v1
kind: Policy
metadata: {{name: warm-test}}
spec:
  sandbox: {{require: full, network: none, protect: [{protect}]}}
  limits: {{memory: {memory}, pids: {pids}, timeoutSeconds: 60, stdoutBytes: 4096,
           stderrBytes: 2048, cpuSeconds: 30, openFiles: 256, fileSize: 8MiB}}
  rules:
    - {{id: anything, action: allow, commands: ["*"]}}
"""
#: What a command prints about where it runs: its sandbox's pid and mount namespaces.
WHERE = "readlink /proc/self/ns/pid /proc/self/ns/mnt | tr '\\n' ' '"


def write_policy(path: Path, *, memory: str = "128MiB", pids: int = 64, protect: str = "") -> Path:
    path.write_text(POLICY.format(memory=memory, pids=pids, protect=protect))
    return path


@pytest.fixture(name="warm")
async def _warm(start_daemon: Callable[..., Any], tmp_path: Path) -> Callable[..., Any]:
    """warm(**settings) -> a daemon with warm sandboxes and the test's permissive policy."""

    async def start(**overrides: Any) -> Daemon:
        policy = write_policy(tmp_path / "policy.yaml")
        daemon: Daemon = await start_daemon(policy_file=policy, **overrides)
        assert sandbox_of(daemon).warm is not None, "this host keeps no warm sandboxes"
        return daemon

    return start


def sandbox_of(daemon: Daemon) -> Sandbox:
    return daemon.service.workspace.executor.sandbox


def pool_of(daemon: Daemon) -> WarmPool:
    pool = sandbox_of(daemon).warm
    assert pool is not None
    return pool


async def run(daemon: Daemon, ws: str, command: str, cwd: str = ".", timeout: int = 30) -> Any:
    """The internal /exec's result for `command` in workspace `ws`."""
    return await daemon.service.workspace.exec(ws, command, cwd, timeout)


async def task(daemon: Daemon, ws: str, *commands: str) -> list[dict[str, Any]]:
    """Each step's result of a task running `commands` in workspace `ws`."""
    sub = await daemon.service.submit(task_body(*(cmd(c) for c in commands), workspace_id=ws))
    record = await wait_terminal(daemon, sub.record.id)
    return [s["result"] for s in record.result["result"]["steps"]]


def runner_busy(daemon: Daemon) -> bool:
    return bool(daemon.runner.running)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first), or [] if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def alive(pid: int) -> bool:
    return _stat(pid)[:1] not in ([], ["Z"], ["X"])


def sandbox_processes(root: Path) -> set[tuple[int, str]]:
    """(pid, start time) of the live processes of a workspace's sandboxes seen from the host:
    those working in the workspace (a supervisor, commands) and their bubblewrap parents.
    Workspaces of other tests (or other runs) may have the same uid: the uid alone is not it."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/cwd") != str(root):
                continue
        except OSError:
            continue
        for pid in (int(entry.name), int((_stat(int(entry.name)) or ["", "0"])[1])):
            if alive(pid):
                found.add((pid, _stat(pid)[19]))
    return found


def gone(processes: set[tuple[int, str]]) -> bool:
    return all(not alive(pid) or _stat(pid)[19] != start for pid, start in processes)


# --- reuse and isolation ------------------------------------------------------------------------


async def test_a_workspaces_commands_share_its_sandbox_and_never_anothers(warm: Any) -> None:
    daemon = await warm()
    first = await run(daemon, "ws-a", WHERE)
    again = await run(daemon, "ws-a", WHERE)
    (in_task,) = await task(daemon, "ws-a", WHERE)
    other = await run(daemon, "ws-b", WHERE)
    assert first["exit_code"] == 0, first
    assert first["stdout"] == again["stdout"] == in_task["stdout"]
    assert set(other["stdout"].split()).isdisjoint(first["stdout"].split())
    pool = pool_of(daemon)
    assert pool.statistics()["starts"] == 2
    by_root = {Path(s.key.root).name: s for s in pool.sandboxes()}
    assert set(by_root) == {"ws-a", "ws-b"}
    assert by_root["ws-a"].key.uid != by_root["ws-b"].key.uid
    # The cold path (egress, git) is another sandbox each time: not this one.
    assert all(alive(s.supervisor_pid) for s in by_root.values())


async def test_commands_at_once_start_one_sandbox_and_run_side_by_side(warm: Any) -> None:
    daemon = await warm()
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        results[i] = await run(daemon, "ws-many", f"sleep 0.5; echo {i}; {WHERE}")

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
    assert [results[i]["stdout"].split()[0] for i in range(4)] == ["0", "1", "2", "3"]
    assert len({results[i]["stdout"].split(maxsplit=1)[1] for i in range(4)}) == 1
    assert pool_of(daemon).statistics() == {"alive": 1, "active": 0, "starts": 1}


async def test_a_daemon_that_stops_stops_every_sandbox(warm: Any) -> None:
    daemon = await warm()
    for ws in ("ws-x", "ws-y"):
        await run(daemon, ws, "true")
    sandboxes = pool_of(daemon).sandboxes()
    assert len(sandboxes) == 2
    daemon.stop()
    await wait_for(lambda: sandbox_of(daemon).warm is None)
    assert not any(alive(s.supervisor_pid) or alive(s.pid) for s in sandboxes)


async def test_each_command_gets_exactly_its_environment_and_directory(warm: Any) -> None:
    daemon = await warm()
    show = "env | sort; echo; pwd; exit 3"
    one, two = await task(daemon, "ws-env", show, show)
    (other,) = await task(daemon, "ws-env", show)
    await run(daemon, "ws-env", "mkdir -p sub/dir")
    here = await run(daemon, "ws-env", "pwd; env | sort", cwd="sub/dir")
    root = daemon.settings.volume_path / "ws-env"
    envs = []
    for result in (one, two, other):
        assert result["exit_code"] == 3, result
        text, cwd = result["stdout"].rsplit("\n\n", 1)
        envs.append(dict(line.split("=", 1) for line in text.splitlines()))
        assert cwd.strip() == str(root)
    wanted = TASK_ENV | {"PWD"}
    assert all(set(env) == wanted for env in envs), envs
    assert envs[0]["TASK_ID"] == envs[1]["TASK_ID"] != envs[2]["TASK_ID"]
    assert envs[0]["HOME"] != envs[2]["HOME"] and envs[0]["TMPDIR"] != envs[2]["TMPDIR"]
    assert envs[0]["HOME"].startswith(f"{root}/tasks/")
    assert here["stdout"].splitlines()[0] == f"{root}/sub/dir"
    assert f"PWD={root}/sub/dir" in here["stdout"].splitlines()
    assert pool_of(daemon).statistics()["starts"] == 1


async def test_a_command_holds_descriptors_0_1_2_and_the_cold_limits(warm: Any) -> None:
    """Nothing of the supervisor's reaches the command (its socket above all), and the
    rlimits are those the cold chain sets: CPU seconds, 512-byte blocks, files, core."""
    daemon = await warm()
    limits = "ulimit -t; ulimit -f; ulimit -n; ulimit -c"
    result = await run(daemon, "ws-fd", f"ls /proc/$$/fd; {limits}")
    assert result["stdout"].split() == ["0", "1", "2", "30", "16384", "256", "0"], result
    status = await run(daemon, "ws-fd", "grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status")
    fields = dict(line.split(":\t") for line in status["stdout"].splitlines())
    assert fields == {"NoNewPrivs": "1", "Seccomp": "2", "CapEff": "0000000000000000"}


# --- nothing of a command survives it -----------------------------------------------------------


def memory_cgroup(pid: int, controller: str = "memory") -> Path | None:
    """The v1 cgroup directory of a live process (its memory one, by default), or None."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    return None


def spare_of(sandbox: WarmSandbox) -> int:
    """The pid of the process its supervisor forked for the next command."""
    children = Path(f"/proc/{sandbox.supervisor_pid}/task/{sandbox.supervisor_pid}/children")
    (pid,) = (int(child) for child in children.read_text().split())
    return pid


async def running_cgroup(daemon: Daemon, ws: str) -> tuple[Path, str]:
    """The memory cgroup a command of `ws` runs in and its pids limit (read from the host
    while it runs)."""
    t = unique_seconds()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, daemon, ws, f"sleep {t}")
        [pid] = await wait_for(lambda: host_pids(t))
        group, pids = memory_cgroup(pid), memory_cgroup(pid, "pids")
        assert group is not None and pids is not None
        pids_max = (pids / "pids.max").read_text().strip()
        os.kill(pid, signal.SIGKILL)
    return group, pids_max


async def test_commands_start_in_cgroups_made_ahead_and_each_is_removed(warm: Any) -> None:
    """After a workspace's first command, the process for its next one waits in cgroups of its
    own with the policy's limits, made while nothing asked for them; each command runs in its
    own, which are removed once it ended, as is the last one made ahead when the daemon stops."""
    daemon = await warm()
    await run(daemon, "ws-ahead", "true")  # the first: the limits to make them with are known
    (sandbox,) = pool_of(daemon).sandboxes()
    await wait_for(lambda: (g := memory_cgroup(spare_of(sandbox))) and g.name.startswith("cmd-"))
    ahead = memory_cgroup(spare_of(sandbox))
    assert ahead is not None
    assert (ahead / "memory.limit_in_bytes").read_text() == f"{128 * 2**20}\n"
    assert (ahead / "cgroup.procs").read_text().split() == [str(spare_of(sandbox))]
    used = [(await running_cgroup(daemon, "ws-ahead"))[0] for _ in range(3)]
    assert used[0] == ahead and len(set(used)) == 3 and all(g.name.startswith("cmd-") for g in used)
    await wait_for(lambda: not any(g.exists() for g in used))
    last = memory_cgroup(spare_of(sandbox))
    assert last is not None and last.exists()
    daemon.stop()
    await wait_for(lambda: sandbox_of(daemon).warm is None)
    assert not last.exists()


async def test_a_command_whose_process_is_killed_before_it_starts_runs_in_another(
    warm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command of the workspace may kill the process forked for the next command (the
    spare) as it is handed a request: nothing of that command ran, so it is started again in
    another process, instead of failing (CI saw a task fail so after a spare-kill loop)."""
    daemon = await warm()
    await run(daemon, "ws-retry", "true")
    join, killed = WarmCommand._join, []

    async def killed_first(command: WarmCommand, pidfd: int, pending: Any) -> int:
        if not killed:  # as a command killing spares would, just before the daemon's checks
            killed.append(pidfd)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], 5)  # readable once it has exited
        return await join(command, pidfd, pending)

    monkeypatch.setattr(WarmCommand, "_join", killed_first)
    result = await run(daemon, "ws-retry", "echo ran")
    assert killed and result["stdout"] == "ran\n" and result["exit_code"] == 0, result
    assert "error" not in result, result


async def test_a_command_with_other_limits_gets_cgroups_of_its_own(
    warm: Any, tmp_path: Path
) -> None:
    """Cgroups made ahead have the last command's limits; a command with others (a policy
    reloaded, its sandbox kept) does not run in them."""
    daemon = await warm()
    await run(daemon, "ws-limits", "true")
    (sandbox,) = pool_of(daemon).sandboxes()
    await wait_for(lambda: (g := memory_cgroup(spare_of(sandbox))) and g.name.startswith("cmd-"))
    write_policy(tmp_path / "policy.yaml", pids=48)  # not part of a sandbox's key
    assert await reload_policy(daemon.policy, daemon.metrics)
    group, pids_max = await running_cgroup(daemon, "ws-limits")
    assert pool_of(daemon).sandboxes() == [sandbox]
    assert group.name.startswith("cmd-") and pids_max == "48"
    assert (await run(daemon, "ws-limits", "echo next"))["stdout"] == "next\n"


async def test_what_a_command_leaves_running_ends_with_it(warm: Any) -> None:
    daemon = await warm()
    bg, away = unique_seconds(), unique_seconds()
    # The escapee is in a session of its own (out of the command's process group) before
    # the command ends, and holds its output open.
    escape = f"setsid sh -c 'touch escaped; exec sleep {away}' & until [ -e escaped ]; do :; done"
    result = await run(daemon, "ws-bg", f"sleep {bg} & {escape}; echo started")
    assert result["stdout"] == "started\n" and result["exit_code"] == 0, result
    assert "warning" not in result, result  # nothing held the output open
    assert host_pids(bg) == [] and host_pids(away) == []
    assert (await run(daemon, "ws-bg", "echo next"))["stdout"] == "next\n"


async def test_a_timeout_kills_the_whole_tree(warm: Any) -> None:
    daemon = await warm()
    bg, fg = unique_seconds(), unique_seconds()
    result = await run(daemon, "ws-to", f"setsid sleep {bg} & sleep {fg}", timeout=1)
    assert result.get("timed_out") is True, result
    assert host_pids(bg) == [] and host_pids(fg) == []
    assert (await run(daemon, "ws-to", "echo next"))["stdout"] == "next\n"


async def test_a_cancel_kills_the_whole_tree(warm: Any) -> None:
    daemon = await warm()
    bg, fg = unique_seconds(), unique_seconds()
    sub = await daemon.service.submit(
        task_body(cmd(f"setsid sleep {bg} & sleep {fg}"), workspace_id="ws-cancel")
    )
    await wait_for(lambda: host_pids(fg) and host_pids(bg))
    await daemon.service.cancel(sub.record.id)
    record = await wait_terminal(daemon, sub.record.id)
    assert record.status.value == "cancelled"
    # The record may say so before the step has unwound: wait for that, not for a kill.
    await wait_for(lambda: not runner_busy(daemon))
    assert host_pids(bg) == [] and host_pids(fg) == []


async def test_output_is_capped_as_on_the_cold_path(warm: Any) -> None:
    daemon = await warm()
    print_both = "head -c 100000 /dev/zero | tr '\\0' a; head -c 5000 /dev/zero | tr '\\0' b >&2"
    result = await run(daemon, "ws-out", print_both)
    assert result["stdout"] == "a" * 4096 and result["stderr"] == "b" * 2048, result["error"]
    assert result["truncated"] is True
    assert (result["stdout_bytes"], result["stderr_bytes"]) == (100000, 5000)


async def test_the_memory_limit_is_the_commands_own(warm: Any) -> None:
    daemon = await warm()
    result = await run(daemon, "ws-mem", "python3 -c 'b = b\"x\" * (400 * 2**20)'")
    assert result.get("limits_hit") == ["memory"], result
    assert (await run(daemon, "ws-mem", "echo next"))["stdout"] == "next\n"
    assert pool_of(daemon).statistics()["starts"] == 1


async def test_the_supervisor_is_not_held_to_a_commands_limits(warm: Any, tmp_path: Path) -> None:
    """A policy may give commands less than the supervisor and its spare need: they have
    limits of their own (no command runs where they live)."""
    daemon = await warm()
    write_policy(tmp_path / "policy.yaml", memory="16MiB", pids=2)
    assert await reload_policy(daemon.policy, daemon.metrics)
    for _ in range(3):
        result = await run(daemon, "ws-small", "echo ok")
        assert result["stdout"] == "ok\n" and "error" not in result, result
    forked = await run(daemon, "ws-small", "sleep 5 & sleep 5 & wait")
    assert forked.get("limits_hit") == ["pids"], forked  # the command's own limit holds
    assert pool_of(daemon).statistics()["starts"] == 1


# --- lifecycle ----------------------------------------------------------------------------------


async def test_an_unused_sandbox_is_stopped_after_the_idle_time(warm: Any) -> None:
    daemon = await warm(warm_idle_s=0.5)
    await run(daemon, "ws-idle", "true")
    (sandbox,) = pool_of(daemon).sandboxes()
    await wait_for(lambda: not pool_of(daemon).sandboxes() and not alive(sandbox.supervisor_pid))
    assert not alive(sandbox.pid)  # its bubblewrap, reaped
    assert (await run(daemon, "ws-idle", "echo again"))["stdout"] == "again\n"
    assert pool_of(daemon).statistics()["starts"] == 2


async def test_at_most_warm_max_sandboxes_live(warm: Any) -> None:
    daemon = await warm(warm_max=2)
    for ws in ("ws-1", "ws-2"):
        await run(daemon, ws, "true")
    oldest = {Path(s.key.root).name: s for s in pool_of(daemon).sandboxes()}["ws-1"]
    await run(daemon, "ws-3", "true")
    names = sorted(Path(s.key.root).name for s in pool_of(daemon).sandboxes())
    assert names == ["ws-2", "ws-3"]
    await wait_for(lambda: not alive(oldest.supervisor_pid))


async def test_with_every_sandbox_busy_a_command_runs_cold(warm: Any) -> None:
    daemon = await warm(warm_max=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, daemon, "ws-busy", "sleep 3")
        await wait_for(lambda: pool_of(daemon).statistics()["active"] == 1)
        result = await run(daemon, "ws-other", WHERE + "; cat /proc/1/comm")
    assert result["stdout"].split()[-1] == "bwrap", result  # bubblewrap's own init: cold
    assert pool_of(daemon).statistics()["starts"] == 1


async def test_a_policy_reload_gives_new_sandboxes_and_running_commands_keep_theirs(
    warm: Any, tmp_path: Path
) -> None:
    daemon = await warm()
    before = await run(daemon, "ws-pol", WHERE)
    async with trio.open_nursery() as nursery:
        running: dict[str, Any] = {}

        async def long() -> None:
            running["result"] = await run(daemon, "ws-pol", f"sleep 1; {WHERE}")

        nursery.start_soon(long)
        await wait_for(lambda: pool_of(daemon).statistics()["active"] == 1)
        write_policy(tmp_path / "policy.yaml", memory="96MiB")
        assert await reload_policy(daemon.policy, daemon.metrics)
        after = await run(daemon, "ws-pol", WHERE)
    assert running["result"]["stdout"] == before["stdout"], running
    assert set(after["stdout"].split()).isdisjoint(before["stdout"].split())
    assert pool_of(daemon).statistics()["starts"] == 2


async def test_protected_paths_bound_when_the_sandbox_started_are_kept_current(
    warm: Any, tmp_path: Path
) -> None:
    """A sandbox binds the protected paths that existed when it started: a new one, or one
    replaced on the host (git renames its config into place), means a new sandbox."""
    daemon = await warm()
    write_policy(tmp_path / "policy.yaml", protect=".git/config")
    assert await reload_policy(daemon.policy, daemon.metrics)
    await run(daemon, "ws-git", "git init -q . && echo '[x]' >> .git/config")
    blocked = await run(daemon, "ws-git", "echo '[y]' >> .git/config")
    assert blocked["exit_code"] != 0 and "Read-only" in blocked["stderr"], blocked
    config = daemon.settings.volume_path / "ws-git" / ".git" / "config"
    fresh = config.with_name("config.new")
    fresh.write_text(config.read_text() + "[host]\n")
    os.chown(fresh, config.stat().st_uid, config.stat().st_gid)
    fresh.rename(config)
    seen = await run(daemon, "ws-git", "tail -n 1 .git/config")
    assert seen["stdout"] == "[host]\n", seen
    assert pool_of(daemon).statistics()["starts"] == 3


# --- failures -----------------------------------------------------------------------------------


async def test_a_killed_supervisor_fails_its_command_and_is_replaced(warm: Any) -> None:
    daemon = await warm()
    await run(daemon, "ws-crash", "true")
    (sandbox,) = pool_of(daemon).sandboxes()
    fg = unique_seconds()
    async with trio.open_nursery() as nursery:
        got: dict[str, Any] = {}

        async def long() -> None:
            got["result"] = await run(daemon, "ws-crash", f"sleep {fg}; echo done")

        nursery.start_soon(long)
        await wait_for(lambda: host_pids(fg))
        os.kill(sandbox.supervisor_pid, signal.SIGKILL)
    result = got["result"]
    assert "the workspace's sandbox failed: its supervisor exited" in result["error"], result
    assert "done" not in result["stdout"] and host_pids(fg) == []
    assert (await run(daemon, "ws-crash", "echo next"))["stdout"] == "next\n"
    (replaced,) = pool_of(daemon).sandboxes()
    assert replaced is not sandbox and replaced.supervisor_pid != sandbox.supervisor_pid


async def test_a_command_cannot_signal_trace_or_read_its_supervisor(warm: Any) -> None:
    """The supervisor is pid 1 of the sandbox (no signal from inside reaches it but SIGCHLD)
    and not dumpable (no ptrace, /proc/1/mem, /proc/1/fd, /proc/1/environ)."""
    daemon = await warm()
    await run(daemon, "ws-hostile", "true")
    (sandbox,) = pool_of(daemon).sandboxes()
    attack = (
        "kill -STOP 1; kill -TERM 1; kill -INT 1; kill -KILL 1; kill -9 -1; echo signalled; "
        "cat /proc/1/environ; ls /proc/1/fd; head -c 1 /proc/1/mem; ls -l /proc/1/cwd; "
        "python3 -c 'import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
        'print("ptrace", libc.ptrace(16, 1, 0, 0), ctypes.get_errno()); '
        'print("getfd", libc.syscall(438, os.pidfd_open(1), 3, 0), ctypes.get_errno())\''
    )
    result = await run(daemon, "ws-hostile", attack)
    assert "signalled" in result["stdout"], result
    assert "ptrace -1 1" in result["stdout"], result  # EPERM (seccomp)
    assert result["stderr"].count("Permission denied") >= 4, result["stderr"]
    assert "getfd -1 1" in result["stdout"], result  # EPERM: not dumpable
    assert alive(sandbox.supervisor_pid)
    assert _stat(sandbox.supervisor_pid)[0] not in ("T", "t")  # not stopped, not traced
    # The process it forked ahead for the next command can be killed (same uid, not pid 1):
    # the next command still starts, in the same sandbox.
    killed = await run(daemon, "ws-hostile", "pkill -KILL -f 'python3 -I -S [-]c'; echo $?")
    assert killed["stdout"] == "0\n", killed
    for _ in range(2):
        assert (await run(daemon, "ws-hostile", "echo next"))["stdout"] == "next\n"
    assert pool_of(daemon).sandboxes() == [sandbox]


async def test_a_supervisor_that_stops_answering_fails_the_command_not_forever(
    warm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP from the host (nothing inside can send it): the next command fails once the
    supervisor's answer is overdue, and the one after gets a new sandbox."""
    monkeypatch.setattr("wsrunner.execution.sandbox.warm.REPLY_S", 1.0)
    daemon = await warm()
    await run(daemon, "ws-stop", "true")
    (sandbox,) = pool_of(daemon).sandboxes()
    os.kill(sandbox.supervisor_pid, signal.SIGSTOP)
    result = await run(daemon, "ws-stop", "echo never")
    assert "did not answer within 1s" in result["error"] and result["stdout"] == "", result
    await wait_for(lambda: not alive(sandbox.supervisor_pid))  # the sandbox was ended
    assert (await run(daemon, "ws-stop", "echo next"))["stdout"] == "next\n"


async def test_a_daemon_killed_with_sigkill_leaves_no_sandbox(
    tmp_path: Path, prefix: str, schema: str
) -> None:
    """bubblewrap's --die-with-parent follows the daemon's event loop thread, which started
    it; the supervisor, pid 1 of the sandbox, takes every process in it when it dies."""
    traversable(tmp_path)
    dep = Deployment(tmp_path, prefix, schema, REDIS_URL, DATABASE_URL)
    try:
        daemon = await dep.start("warm-kill")
        headers = {"X-Internal-Token": "reliability-internal"}
        async with httpx.AsyncClient(base_url=daemon.internal, headers=headers, timeout=30) as c:
            r = await c.post("/workspaces/ws-kill/exec", json={"command": "cat /proc/1/comm"})
        assert r.status_code == 200 and r.json()["stdout"] == "python3\n", r.text
        left = sandbox_processes(dep.volume / "ws-kill")
        # bubblewrap, the supervisor and the spare it forked for the next command
        assert len(left) == 3, "the warm sandbox was to outlive the command"
        daemon.kill(signal.SIGKILL)
        await daemon.wait()
        await wait_for(lambda: gone(left), timeout=10)
    finally:
        await dep.close()


def test_the_supervisor_runs_without_wsrunner() -> None:
    """It is run by the sandbox's own interpreter, isolated (-I -S): the standard library only."""
    source = SUPERVISOR
    argv = ["/usr/bin/python3", "-I", "-S", "-c", source]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert "IndexError" in done.stderr.splitlines()[-1], done.stderr  # it wants its socket
    imports = [ln.split()[1] for ln in source.splitlines() if ln.startswith(("import ", "from "))]
    assert imports and not [name for name in imports if name.startswith("wsrunner")]


def test_descriptors_received_from_a_supervisor_are_not_inherited() -> None:
    """The daemon holds pidfds a supervisor sent (its spares', its commands') while it starts
    cold sandboxes; inheritable, they were passed into them (I1: `socket.recv_fds` of Python
    3.11 drops MSG_CMSG_CLOEXEC). A descriptor received is close-on-exec; a child started
    meanwhile holds none of them."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        pidfd = os.pidfd_open(os.getpid())
        socket.send_fds(theirs, [b"{}"], [pidfd])
        os.close(pidfd)
        data, fds, _ = receive(ours, 2, socket.MSG_CMSG_CLOEXEC)
        try:
            assert data == b"{}" and len(fds) == 1
            assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            held = subprocess.run(
                ["ls", "/proc/self/fd"], capture_output=True, text=True, close_fds=False
            )
            assert str(fds[0]) not in held.stdout.split(), held.stdout
        finally:
            os.close(fds[0])


async def test_a_sandbox_records_its_supervisor(warm: Any) -> None:
    daemon = await warm()
    await run(daemon, "ws-rec", "true")
    (sandbox,) = pool_of(daemon).sandboxes()
    assert isinstance(sandbox, WarmSandbox) and sandbox.usable
    text = Path(f"/proc/{sandbox.supervisor_pid}/status").read_text()
    status = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    assert int(status["Uid"].split()[0]) == sandbox.key.uid
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NSpid"].split()[-1] == "1"
    environ = Path(f"/proc/{sandbox.supervisor_pid}/environ").read_bytes().split(b"\0")[:-1]
    pwd = f"PWD={sandbox.key.root}".encode()  # bubblewrap's --chdir
    assert sorted(environ) == [b"LC_ALL=C.UTF-8", b"PATH=/usr/bin:/bin", pwd]
    where = f"/proc/{sandbox.supervisor_pid}/fd"
    fds = sorted(os.readlink(f"{where}/{n}").split(":")[0] for n in os.listdir(where))
    # stdin, stdout, stderr (to the daemon's log), its wake-up pipe, the daemon's socket, and
    # the spare's socket and pidfd
    wanted = ["/dev/null", "/dev/null", "anon_inode", "pipe", "pipe", "pipe", "socket", "socket"]
    assert fds == wanted, fds


#: A supervisor that lies: it names itself as the command's process ("self"), or answers a
#: spawn request with something that is not a message ("garbage"). Run outside any sandbox.
LIAR = r"""
import json, os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
me = os.pidfd_open(os.getpid())
socket.send_fds(sock, [json.dumps({"op": "ready"}).encode()], [me])
while (data := socket.recv_fds(sock, 4096, 8)[0]):
    if sys.argv[2] == "self":
        reply = {"op": "started", "id": json.loads(data)["id"]}
        socket.send_fds(sock, [json.dumps(reply).encode()], [me])
    else:
        sock.send(b"not json")
"""


@pytest.mark.parametrize(
    ("lie", "reason"),
    [("self", "not a fork of its own"), ("garbage", "protocol violation by its supervisor")],
)
async def test_the_daemon_takes_nothing_a_supervisor_says_on_trust(lie: str, reason: str) -> None:
    """Were a supervisor subverted, it could not have the daemon move a process that is not a
    fresh fork of its own into a command's cgroups, nor keep talking nonsense: its sandbox
    ends and the command fails with the reason."""
    support = cgroups.probe()
    policy = load_policy(bundled_policy()).for_workspace("ws-liar")
    groups = [cgroups.CommandGroup(support, f"test-{uuid.uuid4().hex[:12]}") for _ in range(2)]
    for group in groups:
        await trio.to_thread.run_sync(partial(group.create, memory=2**28, pids=16, cpus=None))
    key = WarmKey("/nonexistent", (0, 0), None, policy.sandbox, 2**28, 64, ())

    def chain(sock: int) -> tuple[list[str], dict[str, str], list[int]]:
        return ["/usr/bin/python3", "-c", LIAR, str(sock), lie], {"PATH": "/usr/bin"}, []

    try:
        sandbox = WarmSandbox.spawn(key, groups[0], chain, trio.CapacityLimiter(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sandbox.serve, lambda _: None)
            await sandbox.settled.wait()
            command = WarmCommand(
                sandbox, ["/bin/true"], {}, "/", policy.limits, groups[1], trio.CapacityLimiter(1)
            )
            rc = await command.run(Capture.capped(100, 100), 1.0, None, 0.0)
            await sandbox.ended.wait()
        assert rc == 125 and len(command.failures) == 1, (rc, command.failures)
        assert reason in command.failures[0], command.failures
        assert not alive(sandbox.pid)
    finally:
        for group in groups:
            await trio.to_thread.run_sync(group.kill)
            await trio.to_thread.run_sync(group.remove)


async def test_metrics_show_the_sandboxes_and_how_commands_started(
    warm: Any, tmp_path: Path
) -> None:
    """The pool's numbers reach /metrics: live sandboxes, commands by how they started (in
    cgroups made ahead, made as they started, or cold) and sandboxes by why they ended."""
    daemon = await warm()
    for _ in range(3):
        assert (await run(daemon, "ws-metrics", "true"))["exit_code"] == 0
    write_policy(tmp_path / "policy.yaml", memory="96MiB")  # a new key: a new sandbox
    assert await reload_policy(daemon.policy, daemon.metrics)
    assert (await run(daemon, "ws-metrics", "true"))["exit_code"] == 0
    await wait_for(lambda: pool_of(daemon).stops["replaced"] == 1)
    m = samples((await daemon.service.metrics_text()).decode())
    assert m[("wsrunner_warm_sandboxes", ())] == 1
    assert m[("wsrunner_warm_commands_running", ())] == 0
    assert m[("wsrunner_warm_sandbox_starts_total", ())] == 2
    started = {s: m[("wsrunner_warm_commands_total", (("start", s),))] for s in WARM_STARTS}
    # Each sandbox's first command makes its own cgroups: the limits are not known before.
    assert started == {"ahead": 2, "joined": 2, "cold": 0}, started
    stops = {r: m[("wsrunner_warm_sandbox_stops_total", (("reason", r),))] for r in WARM_STOPS}
    assert stops == {"idle": 0, "room": 0, "replaced": 1, "failed": 0, "shutdown": 0}, stops
