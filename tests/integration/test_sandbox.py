"""The OS sandbox: an escape suite, limits, the isolation probe, and the file API under attack.

The escape suite runs each attempt for real under a policy that allows every program, so what
is tested is the sandbox (the boundary), not the gate. Each attempt is also put to the default
policy, to show which of them the gate alone would have let through.
"""

from __future__ import annotations

import base64
import ctypes
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import cmd, git_repo, host_pids, task_body, unique_seconds, wait_for
from tests.conftest import wait_terminal as wait_done
from wsrunner.daemon import Daemon
from wsrunner.errors import (
    PathEscapeError,
    PathNotFoundError,
    QuotaExceededError,
    WorkspaceError,
)
from wsrunner.execution.process import Capture, run_process
from wsrunner.execution.sandbox import Isolation, Sandbox, _command_argv, probe
from wsrunner.execution.sandbox.identity import UidRange, assign
from wsrunner.policy import bundled_policy, load_policy
from wsrunner.policy.engine import Limits
from wsrunner.workspace import paths

PERMISSIVE = """\
apiVersion: wsrunner/v1
kind: Policy
metadata: {name: permissive-test}
spec:
  sandbox:
    require: full
    network: none
    protect: [.git/hooks, .git/config, "repos/*/.git/hooks", "repos/*/.git/config"]
  limits: {memory: 128MiB, pids: 64, fileSize: 8MiB, cpuSeconds: 3, cpus: 0.5, timeoutSeconds: 60}
  rules:
    - {id: anything, action: allow, commands: ["*"]}
"""
DEFAULT = load_policy(bundled_policy()).for_workspace("ws-1")


class Host:
    """What a command must never reach: a canary directory anyone may write, a secret file
    anyone may read, another workspace's file, the daemon's environment and a loopback port."""

    def __init__(self, tmp_path: Path, volume: Path) -> None:
        self.canary = tmp_path / "canary"
        self.canary.mkdir(mode=0o777)
        self.canary.chmod(0o777)
        self.secret_text = f"host-secret-{uuid.uuid4().hex}"
        self.secret = tmp_path / "secret.txt"
        self.secret.write_text(self.secret_text)
        self.secret.chmod(0o644)
        self.other_text = f"other-ws-{uuid.uuid4().hex}"
        self.other = volume / "ws-other" / "secret.txt"
        self.env_text = os.environ["WSRUNNER_TEST_CANARY"]
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(f"\0wsrunner-test-{uuid.uuid4().hex}")
        self.abstract.listen(4)
        self.abstract_name = self.abstract.getsockname()[1:].decode()

    def fmt(self, template: str) -> str:
        return template.format(
            canary=self.canary,
            secret=self.secret,
            other=self.other,
            volume=self.other.parent.parent,
            port=self.port,
            abstract=self.abstract_name,
            pid=os.getpid(),
        )

    def escaped(self, output: str) -> list[str]:
        found = [f"canary: {p.name}" for p in self.canary.iterdir()]
        for what, text in (
            ("host secret", self.secret_text),
            ("other workspace", self.other_text),
            ("daemon environment", self.env_text),
        ):
            if text in output:
                found.append(what)
        return found


@pytest.fixture(name="sandboxed")
async def _sandboxed(start_daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("WSRUNNER_TEST_CANARY", f"daemon-env-{uuid.uuid4().hex}")
    policy = tmp_path / "etc" / "policy.yaml"
    policy.parent.mkdir()
    policy.write_text(PERMISSIVE)
    daemon: Daemon = await start_daemon(policy_file=policy)
    host = Host(tmp_path, daemon.settings.volume_path)
    await daemon.service.workspace.write_file("ws-other", "secret.txt", host.other_text)
    # A repository in ws-1, for the git cases.
    origin = tmp_path / "origin"
    origin.mkdir()
    sub = await daemon.service.submit(
        task_body({"action": "git_clone", "repo": git_repo(origin, {"f": "1\n"}), "shallow": False})
    )
    assert (await wait_done(daemon, sub.record.id)).status.value == "completed"
    return daemon, host


#: class -> attempts; each must leave no trace on the host and read nothing it should not.
ESCAPES: dict[str, list[str]] = {
    "interpreters and shells": [
        "python3 -c \"open('{canary}/py', 'w').write('x')\"",
        "python3 -c \"print(open('{secret}').read())\"",
        "node -e \"require('fs').writeFileSync('{canary}/node', 'x')\"",
        "sh -c 'echo x > {canary}/sh; cat {secret}'",
    ],
    "data tools that execute": [
        "find . -maxdepth 0 -exec touch {canary}/find ';'",
        "awk 'BEGIN {{ system(\"touch {canary}/awk\") }}'",
        "tar -cf /dev/null --checkpoint=1 --checkpoint-action=exec='touch {canary}/tar' .",
        "echo {canary}/xargs | xargs touch",
        "echo x | sed 'e touch {canary}/sed'",
    ],
    "git config injection": [
        "cd repos/origin && git -c core.fsmonitor='touch {canary}/fsmonitor' status",
        "git -c alias.pwn='!touch {canary}/alias' pwn",
        "printf '#!/bin/sh\\ntouch {canary}/hook\\n' > repos/origin/.git/hooks/post-commit",
        "git -C repos/origin config core.fsmonitor 'touch {canary}/planted'",
    ],
    "shell grammar": [
        "echo $(touch {canary}/subst)",
        "echo {b64} | base64 -d | sh",
        "s\"\"h -c 'touch {canary}/quotes'",
        # The gate now reads eval's argument (a computed program name is refused even under
        # this policy); a quoted name still reaches the sandbox, which is what this tests.
        'eval "tou""ch {canary}/eval"',
    ],
    "path tricks": [
        "ln -s {secret} link && cat link",
        "ln -s / root && echo x > root{canary}/symlink; cat root{secret}",
        "ln {secret} hard; cat hard",
        "mkdir -p bin && printf '#!/bin/sh\\ntouch {canary}/path\\n' > bin/ls && chmod +x bin/ls "
        "&& PATH=$PWD/bin:$PATH ls",
    ],
    "other workspaces and host files": [
        "cat {other}; ls {volume}",
        "cat /proc/1/environ /proc/{pid}/environ; env",
        "ls /root /home /run /etc; cat /etc/shadow /etc/wsrunner/policy.yaml",
        "cat /proc/self/mountinfo | grep -v '^#'",
    ],
    "network": [
        "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\"",
        "python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('\\0{abstract}')\"",
        "curl -sS -m 3 http://127.0.0.1:{port}/",
        "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), 2)\"",
    ],
}


def _cases() -> list[tuple[str, str]]:
    return [(kind, attempt) for kind, attempts in ESCAPES.items() for attempt in attempts]


@pytest.mark.parametrize(("kind", "attempt"), _cases())
async def test_escape_attempt_is_contained(sandboxed: Any, kind: str, attempt: str) -> None:
    daemon, host = sandboxed
    b64 = base64.b64encode(host.fmt("touch {canary}/b64").encode()).decode()
    command = host.fmt(attempt.replace("{b64}", b64))
    result = await daemon.service.workspace.exec("ws-1", command, ".", 30)
    output = result["stdout"] + result["stderr"]
    assert host.escaped(output) == [], (kind, command, result)
    if kind == "network":
        assert result["exit_code"] != 0, result  # nothing answered
    if "host files" in kind:  # nothing listed but this workspace, no host account
        assert "ws-other" not in result["stdout"].split() and "root:" not in output


def test_the_gate_alone_would_let_escapes_through() -> None:
    """The default policy allows these attempts: the gate gives early errors, the sandbox is
    what contains them (docs/security.md)."""
    allowed = {a for _, a in _cases() if DEFAULT.evaluate(a.replace("{b64}", "eA==")).allowed}
    for attempt in (
        ESCAPES["interpreters and shells"][0],
        ESCAPES["data tools that execute"][1],
        ESCAPES["git config injection"][1],
        ESCAPES["path tricks"][0],
        ESCAPES["other workspaces and host files"][0],
        ESCAPES["network"][0],
    ):
        assert attempt in allowed, attempt
    assert len(allowed) >= len(_cases()) // 2


async def test_protected_git_files_stay_as_they_were(sandboxed: Any) -> None:
    daemon, host = sandboxed
    root = daemon.settings.volume_path / "ws-1" / "repos" / "origin" / ".git"
    before = (root / "config").read_text()
    result = await daemon.service.workspace.exec(
        "ws-1", "echo '[core]' >> repos/origin/.git/config", ".", 10
    )
    assert "Read-only file system" in result["stderr"] and (root / "config").read_text() == before
    assert not (root / "hooks" / "post-commit").exists()
    commit = await daemon.service.workspace.git(
        "ws-1", "commit", "repos/origin", ["--allow-empty", "-m", "x"]
    )
    assert commit["exit_code"] == 0 and host.escaped("") == []


async def test_what_a_command_sees_of_the_machine(sandboxed: Any) -> None:
    daemon, _ = sandboxed
    probe_cmd = (
        "hostname; ulimit -n; ulimit -c; grep -E '^(NoNewPrivs|CapBnd)' /proc/self/status;"
        " ps -eo comm= | sort -u | tr '\\n' ' '; echo; unshare -U true || echo no-userns;"
        ' ls /; echo "$HOME $TMPDIR"'
    )
    out = (await daemon.service.workspace.exec("ws-1", probe_cmd, ".", 10))["stdout"].splitlines()
    assert out[:3] == ["wsrunner", "4096", "0"], out
    assert out[3] == "CapBnd:\t0000000000000000" and out[4] == "NoNewPrivs:\t1"
    # Its own pid namespace: the command's processes and the sandbox's pid 1 (bubblewrap, or a
    # warm sandbox's supervisor and its spare, python3).
    assert set(out[5].split()) <= {"bwrap", "python3", "sh", "ps", "sort", "tr"}, out[5]
    assert out[6] == "no-userns"
    assert set(out[7:-1]) <= {
        "bin",
        "dev",
        "etc",
        "lib",
        "lib64",
        "proc",
        "run",
        "sbin",
        "tmp",
        "usr",
        str(daemon.settings.volume_path).split("/")[1],
    }
    task_dirs = str(daemon.settings.volume_path / "ws-1" / "tasks")
    assert all(p.startswith(task_dirs) for p in out[-1].split())  # HOME and TMPDIR


async def test_git_hooks_run_inside_the_sandbox_as_the_workspace_uid(sandboxed: Any) -> None:
    daemon, host = sandboxed
    repo = daemon.settings.volume_path / "ws-1" / "repos" / "origin"
    hook = repo / ".git" / "hooks" / "post-commit"
    # Planted from the host (commands cannot: the hooks are protected), as a hostile repo would.
    hook.write_text(host.fmt("#!/bin/sh\nid -u > ../hook-ran-as; touch {canary}/hook\n"))
    hook.chmod(0o755)
    result = await daemon.service.workspace.exec(
        "ws-1", "cd repos/origin && git commit -q --allow-empty -m by-agent", ".", 10
    )
    assert result["exit_code"] == 0, result
    ran_as = (repo.parent / "hook-ran-as").read_text().strip()
    assert ran_as == str((daemon.settings.volume_path / "ws-1").stat().st_uid)
    assert host.escaped("") == []
    # The daemon's own git never runs a repository's hooks at all.
    (repo.parent / "hook-ran-as").unlink()
    await daemon.service.workspace.git(
        "ws-1", "commit", "repos/origin", ["--allow-empty", "-m", "x"]
    )
    assert not (repo.parent / "hook-ran-as").exists()


async def test_loopback_is_reachable_only_with_host_network(start_daemon, tmp_path: Path) -> None:
    """`egress` reaches the internet (not here: no route out of this machine) but never the
    host's loopback; only `host` does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    probe_cmd = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\""
    for network, reachable in (("none", False), ("egress", False), ("host", True)):
        policy = tmp_path / f"{network}.yaml"
        policy.write_text(PERMISSIVE.replace("network: none", f"network: {network}"))
        daemon = await start_daemon(policy_file=policy)
        result = await daemon.service.workspace.exec("ws-1", probe_cmd, ".", 10)
        assert (result["exit_code"] == 0) is reachable, result
        daemon.stop()
    listener.close()


# --- resources ---------------------------------------------------------------------------------


async def test_limits_are_reported_by_name(sandboxed: Any) -> None:
    daemon, _ = sandboxed
    ws = daemon.service.workspace
    memory = await ws.exec(
        "ws-1", "python3 -c \"b = b'x' * (400 * 2**20); print(len(b))\"", ".", 30
    )
    assert memory["limits_hit"] == ["memory"] and "memory limit of 128 MiB" in memory["error"]
    forks = await ws.exec(
        "ws-1",
        'python3 -c "import os, time\nfor _ in range(200):\n'
        '    if os.fork() == 0: time.sleep(5); os._exit(0)"',
        ".",
        30,
    )
    assert "pids" in forks["limits_hit"] and "limit of 64 processes" in forks["error"]
    cpu = await ws.exec("ws-1", "python3 -c 'while True: pass'", ".", 30)
    assert "limits_hit" in cpu, cpu
    assert cpu["limits_hit"] == ["cpu"] and "CPU time limit of 3s" in cpu["error"]
    big = await ws.exec("ws-1", "head -c 20000000 /dev/zero > big.bin", ".", 30)
    assert big["limits_hit"] == ["file_size"] and "size limit" in big["error"]
    assert (daemon.settings.volume_path / "ws-1" / "big.bin").stat().st_size <= 8 * 2**20
    # Toolchains still start under these limits (RLIMIT_AS would break them; it is not set).
    assert (await ws.exec("ws-1", "node -e 'console.log(1)'", ".", 30))["stdout"] == "1\n"


async def test_each_command_gets_its_own_cgroup_with_the_policy_limits(sandboxed: Any) -> None:
    daemon, _ = sandboxed
    t = unique_seconds()
    seen: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.service.workspace.exec, "ws-1", f"sleep {t}", ".", 3)
        [pid] = await wait_for(lambda: host_pids(t))
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, ctrl, path = line.split(":", 2)
            if ctrl in ("memory", "pids", "cpu,cpuacct", "cpu"):
                base = Path("/sys/fs/cgroup") / ctrl.split(",")[0] / path.lstrip("/")
                name = {
                    "memory": "memory.limit_in_bytes",
                    "pids": "pids.max",
                    "cpu": "cpu.cfs_quota_us",
                }[ctrl.split(",")[0]]
                seen[name] = (base / name).read_text().strip()
                assert base.name.startswith("cmd-")
    assert seen == {
        "memory.limit_in_bytes": str(128 * 2**20),
        "pids.max": "64",
        "cpu.cfs_quota_us": "50000",
    }
    await wait_for(lambda: not host_pids(t))


async def test_filling_the_disk_is_stopped_at_the_quota(start_daemon, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(PERMISSIVE)
    daemon = await start_daemon(policy_file=policy, workspace_quotas={"ws-q": 20 * 2**20})
    # Files under the size limit each, without end: only the quota watch can stop this.
    fill = "i=0; while true; do i=$((i+1)); head -c 1000000 /dev/zero > f$i || exit 9; done"
    result = await daemon.service.workspace.exec("ws-q", fill, ".", 60)
    assert result["limits_hit"] == ["quota"] and "storage quota of 20971520" in result["error"]
    assert result["duration_ms"] < 10_000, result  # stopped by a poll, not by the 60 s timeout
    used = await daemon.service.workspace.workspaces.usage("ws-q", fresh=True)
    print(f"quota 20 MiB: stopped after {result['duration_ms']} ms at {used.bytes / 2**20:.1f} MiB")
    with pytest.raises(QuotaExceededError, match=r"of its 20\.0 MiB storage quota"):
        await daemon.service.workspace.exec("ws-q", "true", ".", 10)


async def test_orphans_do_not_outlive_their_command(sandboxed: Any) -> None:
    daemon, _ = sandboxed
    for template in (
        "setsid sleep {t} > /dev/null 2>&1 & echo started",
        "nohup sleep {t} > /dev/null 2>&1 & echo started",
        "sh -c 'sleep {t} &' & echo started",
    ):
        t = unique_seconds()
        result = await daemon.service.workspace.exec("ws-1", template.format(t=t), ".", 10)
        assert result["stdout"] == "started\n" and result["duration_ms"] < 5000, result
        await wait_for(lambda: not host_pids(t), timeout=5)  # noqa: B023


async def test_commands_run_as_the_workspace_uid(sandboxed: Any) -> None:
    daemon, _ = sandboxed
    ws = daemon.service.workspace
    one = (await ws.exec("ws-1", "id -u; cat /proc/self/status | grep CapEff", ".", 10))["stdout"]
    other = (await ws.exec("ws-other", "id -u", ".", 10))["stdout"]
    uid = (daemon.settings.volume_path / "ws-1").stat().st_uid
    assert one.split()[0] == str(uid) and other.strip() != str(uid)
    assert "CapEff:\t0000000000000000" in one
    assert (daemon.settings.volume_path / "ws-other" / "secret.txt").stat().st_uid != uid
    assert oct((daemon.settings.volume_path / "ws-1").stat().st_mode & 0o777) == "0o700"


# --- the isolation probe -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        'echo "$0 $# [$*]"',
        "foo",
        "if",
        "# a comment\necho after",
        "cat <<EOF\nhi $0\nEOF",
        "exit 7",
        "echo $$ > pid; exec sleep 0",
    ],
)
def test_without_a_sandbox_a_shell_command_runs_in_the_launch_shell(
    tmp_path: Path, command: str
) -> None:
    """With nothing to exec between them, the launch's shell runs the command itself (one exec
    of sh fewer per command): after joining the cgroups and setting the rlimits, as before, and
    seen by the command exactly as `sh -c` would be."""
    procs = tmp_path / "cgroup.procs"
    procs.touch()
    argv = _unsandboxed_argv(command, procs=[str(procs)], cwd=str(tmp_path))
    launched = subprocess.run(argv, capture_output=True, text=True, check=False)
    joined = procs.read_text().split()
    # It joined the cgroup before anything ran (a syntax error on line 1: nothing runs at all).
    assert len(joined) == 1 or "Syntax error" in launched.stderr
    if (tmp_path / "pid").exists():  # the command's shell is the one that joined: no exec
        assert (tmp_path / "pid").read_text().split() == joined
    plain = subprocess.run(
        ["/bin/sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert (launched.returncode, launched.stdout, launched.stderr) == (
        plain.returncode,
        plain.stdout,
        plain.stderr,
    )


def test_without_a_sandbox_the_command_runs_where_the_limits_were_set(tmp_path: Path) -> None:
    argv = _unsandboxed_argv(
        "ulimit -t; ulimit -f; ulimit -n; ulimit -c; tr '\\0' ' ' < /proc/$$/cmdline"
    )
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    *limits, cmdline = out.splitlines()
    assert limits == ["7", "2048", "64", "0"]  # CPU s, 512-byte blocks, files, core
    assert "ulimit -c 0" in cmdline  # the process image that set them up: not exec'd again


def _unsandboxed_argv(command: str, procs: list[str] | None = None, cwd: str = "/") -> list[str]:
    """The launch of a shell command on a host without isolation (a cgroup.procs to join)."""
    limits = Limits(
        timeout_s=60,
        memory_bytes=2**30,
        pids=64,
        cpu_s=7,
        open_files=64,
        file_size_bytes=2**20,
        stdout_bytes=2**20,
        stderr_bytes=2**20,
    )
    return _command_argv(
        Isolation("none", {}, ()),
        ["/bin/sh", "-c", command],
        uid=None,
        binds=[],
        cwd=cwd,
        network="none",
        limits=limits,
        procs=procs or [],
        fds=[],
        env={"PATH": "/usr/bin:/bin"},
    )


def test_probe_finds_full_isolation_here(tmp_path: Path) -> None:
    iso = probe(str(paths_traversable(tmp_path)), UidRange(200000, 265535))
    assert iso.level == "full", iso.missing
    assert iso.uids is not None and {"memory", "pids"} <= iso.cgroups.controllers


def paths_traversable(path: Path) -> Path:
    from tests.conftest import traversable

    return traversable(path)


def test_probe_without_bubblewrap_is_partial_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap, no setpriv on the PATH
    iso = probe(str(paths_traversable(tmp_path)), UidRange(200000, 265535))
    assert iso.level == "none"
    assert "bubblewrap: not installed (apt-get install bubblewrap)" in iso.missing
    refusal = iso.refusal("full")
    assert refusal is not None and "requires full isolation but this host offers only none" in str(
        refusal
    )
    assert iso.refusal("none") is None


async def test_commands_are_refused_below_the_required_level(
    start_daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shutil.which", _which_without("bwrap"))
    daemon = await start_daemon()
    assert daemon.service.workspace.executor.sandbox.isolation.level == "partial"
    sub = await daemon.service.submit(task_body(cmd("echo hi")))
    rec = await wait_done(daemon, sub.record.id)
    step = rec.result["result"]["steps"][0]["result"]
    assert step["isolation_unavailable"]["missing"] == [
        "bubblewrap: not installed (apt-get install bubblewrap)"
    ]
    assert "requires full isolation but this host offers only partial" in step["error"]
    checks = await daemon.service.checks()
    assert checks["sandbox"].startswith("unavailable: the policy requires full isolation")


async def test_partial_isolation_runs_when_the_policy_allows_it(
    start_daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shutil.which", _which_without("bwrap"))
    policy = tmp_path / "p.yaml"
    policy.write_text(PERMISSIVE.replace("require: full", "require: partial"))
    daemon = await start_daemon(policy_file=policy)
    uid = (await daemon.service.workspace.exec("ws-1", "id -u", ".", 10))["stdout"].strip()
    assert int(uid) in range(200000, 265536)  # no namespaces, but its own uid


def _which_without(name: str) -> Callable[..., str | None]:
    import shutil

    real = shutil.which

    def which(cmd: str, *args: Any, **kw: Any) -> str | None:
        return None if cmd == name else real(cmd, *args, **kw)

    return which


# --- the file API under a symlink race ---------------------------------------------------------


_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: str, b: str) -> None:
    if _libc.renameat2(-100, a.encode(), -100, b.encode(), _RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


async def test_a_symlink_swapped_in_during_file_operations_never_escapes(
    sandboxed: Any, tmp_path: Path
) -> None:
    daemon, host = sandboxed
    ws = daemon.service.workspace
    root = daemon.settings.volume_path / "ws-1"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text(host.secret_text)
    (root / "dir").mkdir()
    (root / "dir" / "data.txt").write_text("inside\n")
    (root / "swap").symlink_to(outside)
    stop = threading.Event()
    swaps = [0]

    def flipper() -> None:
        while not stop.is_set():
            _exchange(str(root / "dir"), str(root / "swap"))
            swaps[0] += 1

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    attempts = leaks = 0
    try:
        # Fixed counts, not time windows: a slow machine takes longer, it does not test less.
        for _ in range(60):
            for op in (
                lambda: ws.read_file("ws-1", "dir/data.txt"),
                lambda: ws.write_file("ws-1", "dir/new.txt", "x"),
                lambda: ws.list_files("ws-1", "dir"),
                lambda: ws.grep("ws-1", "host-secret", "dir"),
            ):
                attempts += 1
                try:
                    got = await op()
                except (PathEscapeError, PathNotFoundError, WorkspaceError):
                    continue
                if host.secret_text in str(got.get("matches", got)):
                    leaks += 1
        # The same race against the contained primitives alone, thousands of times a second.
        direct = [0, 0]

        def hammer() -> None:
            for _ in range(2000):
                for fn in (
                    lambda: paths.read_text(str(root), "dir/data.txt", 1000).content,
                    lambda: paths.write_text(str(root), "dir/direct.txt", "x"),
                    lambda: [e.name for e in paths.list_dir(str(root), "dir", 100)[0]],
                ):
                    direct[0] += 1
                    try:
                        got = fn()
                    except (OSError, WorkspaceError):
                        continue
                    direct[1] += host.secret_text in str(got)

        await trio.to_thread.run_sync(hammer)
    finally:
        stop.set()
        thread.join()
    print(
        f"symlink race: {swaps[0]} swaps; {attempts} API operations, {leaks} escapes; "
        f"{direct[0]} direct operations, {direct[1]} escapes"
    )
    assert direct == [6000, 0]
    assert swaps[0] > 1000 and attempts == 240
    assert (
        leaks == 0 and not (outside / "new.txt").exists() and not (outside / "direct.txt").exists()
    )
    assert sorted(p.name for p in outside.iterdir()) == ["data.txt"]


def test_paths_refuse_fifos_and_devices(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "null").symlink_to("/dev/null")
    with pytest.raises(WorkspaceError, match="not a regular file"):
        paths.read_text(str(tmp_path), "fifo", 100)  # returns at once: O_NONBLOCK
    with pytest.raises(PathEscapeError):
        paths.read_text(str(tmp_path), "null", 100)


async def test_turning_the_sandbox_off_takes_the_policy_too(start_daemon, tmp_path: Path) -> None:
    off = await start_daemon(sandbox="off")  # the default policy still requires full
    with pytest.raises(
        WorkspaceError, match=r"offers only none: turned off \(WSRUNNER_SANDBOX=off\)"
    ):
        await off.service.workspace.exec("ws-1", "true", ".", 10)
    off.stop()
    policy = tmp_path / "none.yaml"
    policy.write_text(PERMISSIVE.replace("require: full", "require: none"))
    daemon = await start_daemon(sandbox="off", policy_file=policy)
    result = await daemon.service.workspace.exec("ws-1", "id -u; ulimit -t", ".", 10)
    assert result["stdout"].split() == [str(os.geteuid()), "3"]  # no uid change, rlimits kept


async def test_a_protected_path_swapped_for_a_symlink_binds_nothing_of_the_host(
    tmp_path: Path,
) -> None:
    """What a command of the same workspace can do between the daemon finding the protected
    paths and bubblewrap binding them: make one a symlink to `/`. A bind by path followed it
    and put the host's root inside the sandbox; a bind by descriptor refuses the symlink."""
    volume = paths_traversable(tmp_path) / "volume"
    volume.mkdir(mode=0o711)
    iso = probe(str(volume), UidRange(200000, 265535))
    assert iso.level == "full", iso.missing
    root = volume / "ws-swap"
    root.mkdir(mode=0o700)
    assign(str(volume), str(root), iso.uids)
    (root / "repos" / "x").mkdir(parents=True)
    (root / "repos" / "x" / ".git").symlink_to("/")  # swapped in after find_protected
    canary, secret = tmp_path / "host-canary", f"host-only-{uuid.uuid4().hex}"
    canary.write_text(secret)
    policy = load_policy(bundled_policy()).for_workspace("ws-swap")
    git = str(root / "repos" / "x" / ".git")
    capture = Capture.capped(4096, 4096)
    async with Sandbox(iso).launch(
        ["/bin/sh", "-c", f"cat repos/x/.git{canary} 2>&1; cat repos/x/.git/config{canary} 2>&1"],
        root=str(root),
        cwd=str(root),
        policy=policy.sandbox,
        limits=policy.limits,
        network="none",
        env={"PATH": "/usr/bin:/bin"},
        pinned=[git],
        protect=[f"{git}/config"],
    ) as launch:
        await run_process(
            launch.argv, env=launch.env, capture=capture, kill_grace=1, pass_fds=launch.pass_fds
        )
    out = capture.stdout.text()
    assert secret not in out, out
    # The command ran (the symlink was left out, not handed to bubblewrap to resolve).
    assert out.count("No such file") == 2, (out, capture.stderr.text())
