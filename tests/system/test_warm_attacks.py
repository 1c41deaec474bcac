"""Attacks on warm sandboxes (issue 21), made as a tenant would make them.

A warm sandbox is shared by the commands of one workspace: one pid namespace, one /tmp, one
uid, a supervisor as pid 1. Each test here attacks what that sharing could give away: the
supervisor and the spare it forks ahead, a command's own cgroups (a process of one task that
lives on to watch the next task's credentials), the memory a sandbox keeps between commands,
the CPU its supervisor spends, the pool's room for other workspaces, the protected paths
bound when the sandbox started, a policy reloaded since, the daemon's descriptors and a daemon
killed mid-command. Each asserts the safe outcome; a hole that is not fixed stays as a strict
xfail naming the finding.

Real bubblewrap, cgroups, Redis and PostgreSQL; commands go through the internal exec (`run`,
as /exec) and tasks (`task`), and a producer's payload through Redis where only it carries
`credentials.env_vars`. What is left running is read from the host (`/proc`).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio

from tests.conftest import (
    DATABASE_URL,
    INTERNAL_TOKEN,
    REDIS_URL,
    cmd,
    git_http_server,
    git_repo,
    host_pids,
    raw_payload,
    submit_and_wait,
    traversable,
    unique_seconds,
    wait_for,
    wait_terminal,
)
from tests.integration.test_warm import _stat, alive, pool_of, run, sandbox_of, task
from tests.reliability.conftest import Deployment
from wsrunner.daemon import Daemon, reload_policy

#: What a command prints to say where it runs: "python3" (a warm sandbox's supervisor is its
#: pid 1) or "bwrap" (bubblewrap's own init: a cold sandbox of its own).
PID1 = "cat /proc/1/comm"
#: ... and which sandbox: its pid namespace.
WHERE = "readlink /proc/self/ns/pid"
POLICY = """\
apiVersion: wsrunner/v1
kind: Policy
metadata: {{name: warm-attacks}}
spec:
  sandbox: {{require: full, network: none, gitNetwork: {git_network}, protect: [{protect}],
            readOnlyPaths: [{read_only}]}}
  limits: {{memory: {memory}, pids: {pids}, timeoutSeconds: 60, stdoutBytes: 65536,
           stderrBytes: 8192, cpuSeconds: {cpu}, openFiles: 256, fileSize: {fsize}}}
  rules:
    - {{id: anything, action: allow, commands: ["*"]}}
"""
MIB = 1024**2


def write_policy(
    path: Path,
    *,
    protect: str = "",
    memory: str = "128MiB",
    pids: int = 64,
    cpu: int = 30,
    fsize: str = "8MiB",
    read_only: str = "",
    git_network: str = "egress",
) -> None:
    text = POLICY.format(
        protect=protect,
        memory=memory,
        pids=pids,
        cpu=cpu,
        fsize=fsize,
        read_only=read_only,
        git_network=git_network,
    )
    path.write_text(text)


@pytest.fixture(name="warm")
async def _warm(start_daemon: Callable[..., Any], tmp_path: Path) -> Callable[..., Any]:
    """warm(policy=..., **settings) -> a daemon with warm sandboxes and a permissive policy
    (the attacks are on the sandbox, not the gate)."""

    async def start(policy: dict[str, Any] | None = None, **overrides: Any) -> Daemon:
        write_policy(tmp_path / "policy.yaml", **(policy or {}))
        daemon: Daemon = await start_daemon(policy_file=tmp_path / "policy.yaml", **overrides)
        assert sandbox_of(daemon).warm is not None, "this host keeps no warm sandboxes"
        return daemon

    return start


async def reload(daemon: Daemon, path: Path, **policy: Any) -> None:
    write_policy(path, **policy)
    assert await reload_policy(daemon.policy, daemon.metrics)


def root_of(daemon: Daemon, ws: str) -> Path:
    return daemon.settings.volume_path / ws


def supervisors(root: Path) -> set[int]:
    """Host pids of the live supervisors of a workspace's warm sandboxes, whether the pool
    still lists them or not: pid 1 of their namespace, python3, working in the workspace."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/cwd") != str(root):
                continue
            status = Path(f"/proc/{entry.name}/status").read_text()
            comm = Path(f"/proc/{entry.name}/comm").read_text().strip()
        except OSError:
            continue
        nspid = next(ln for ln in status.splitlines() if ln.startswith("NSpid:")).split()
        if nspid[-1] == "1" and comm == "python3" and alive(int(entry.name)):
            found.add(int(entry.name))
    return found


def held(pid: int) -> int:
    """Bytes a warm sandbox keeps outside its commands, read from the host: files in its own
    tmpfs mounts (/tmp, /run, /dev with /dev/shm) and its SysV shared memory segments."""
    total = 0
    try:
        for mount in ("tmp", "run", "dev"):
            st = os.statvfs(f"/proc/{pid}/root/{mount}")
            total += (st.f_blocks - st.f_bfree) * st.f_frsize
        shm = subprocess.run(
            ["nsenter", "-t", str(pid), "--ipc", "cat", "/proc/sysvipc/shm"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return 0  # it has ended
    size = shm[0].split().index("size")
    return total + sum(int(line.split()[size]) for line in shm[1:])


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_quota(pid: int) -> float | None:
    """The CPUs the cgroup of `pid` may use at once (cpu.max or v1's CFS quota); None: no
    bound."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and Path(f"/sys/fs/cgroup{path}/cpu.max").exists():
            quota, period = Path(f"/sys/fs/cgroup{path}/cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        if "cpu" in controllers.split(","):
            base = Path(f"/sys/fs/cgroup/{controllers}{path}")
            cfs = int((base / "cpu.cfs_quota_us").read_text())
            return None if cfs < 0 else cfs / int((base / "cpu.cfs_period_us").read_text())
    return None


# --- protected paths ----------------------------------------------------------------------------


async def test_a_workspace_with_protected_paths_runs_warm_and_protected(warm: Any) -> None:
    """A repository's config is protected by the default policy, so nearly every workspace
    has a protected path. Its warm sandbox must start (bubblewrap gets the descriptors of the
    paths it binds) and hold them read-only. Before the fix bubblewrap failed ("Can't find
    source path /proc/self/fd/N"): every such command ran cold, safe but never warm."""
    daemon = await warm({"protect": ".git/config"})
    await run(daemon, "ws-prot", "git init -q .")
    attempt = await run(daemon, "ws-prot", f"{PID1}; echo '[x]' >> .git/config")
    assert attempt["stdout"] == "python3\n", attempt  # in its warm sandbox
    assert attempt["exit_code"] != 0 and "Read-only" in attempt["stderr"], attempt
    (sandbox,) = [s for s in pool_of(daemon).sandboxes() if s.key.binds]
    assert sandbox.usable


async def test_a_repository_made_after_the_sandbox_started_is_protected_next(warm: Any) -> None:
    """The sandbox was built before the repository existed: the next command must not find
    its config and hooks writable because the sandbox's binds are older than them."""
    daemon = await warm({"protect": "repos/*/.git/config, repos/*/.git/hooks"})
    first = await run(daemon, "ws-late", WHERE)
    made = await run(daemon, "ws-late", "git init -q repos/late && echo made")
    assert made["stdout"] == "made\n", made  # unprotected while it is made (documented)
    git = root_of(daemon, "ws-late") / "repos" / "late" / ".git"
    config, hooks = (git / "config").read_text(), sorted(os.listdir(git / "hooks"))
    attack = (
        f"{PID1}; echo '[core]' >> repos/late/.git/config; "
        "echo 'exec evil' > repos/late/.git/hooks/pre-commit; "
        "mv repos/late/.git/config repos/late/.git/old; rm -rf repos/late/.git/hooks; "
        "mv repos/late/.git repos/late/moved; echo tried"
    )
    result = await run(daemon, "ws-late", attack)
    assert result["stdout"] == "python3\ntried\n", result
    assert "Read-only" in result["stderr"] and "busy" in result["stderr"], result
    assert (git / "config").read_text() == config and sorted(os.listdir(git / "hooks")) == hooks
    assert not (git.parent / "moved").exists() and not (git / "old").exists()
    again = await run(daemon, "ws-late", WHERE)
    assert again["stdout"] != first["stdout"]  # a sandbox with the new binds


async def test_a_protected_repository_moved_away_stays_protected(warm: Any) -> None:
    """`repos/x` itself may be renamed (documented); its .git goes along still protected,
    and a new repository made in its place is protected from the next command on."""
    daemon = await warm({"protect": "repos/*/.git/config"})
    await run(daemon, "ws-mv", "git init -q repos/x")
    moved = await run(daemon, "ws-mv", "mv repos/x repos/y && git init -q repos/x && echo ok")
    assert moved["stdout"] == "ok\n", moved
    both = "echo a >> repos/x/.git/config; echo b >> repos/y/.git/config; " + PID1
    result = await run(daemon, "ws-mv", both)
    assert result["stdout"] == "python3\n", result
    assert result["stderr"].count("Read-only") == 2, result


@pytest.mark.xfail(
    strict=True,
    reason="I5, cold and warm alike (wsrunner/workspace/protect.py): protect binds a path "
    "read-only, not its inode; a hard link made while the config was not yet protected "
    "(the command that made the repository) still writes it from any later command",
)
async def test_a_hard_link_made_before_a_config_was_protected_cannot_change_it(
    warm: Any,
) -> None:
    daemon = await warm({"protect": "repos/*/.git/config"})
    ws = "ws-link"
    made = await run(daemon, ws, "git init -q repos/x && ln repos/x/.git/config keep && echo ok")
    assert made["stdout"] == "ok\n", made
    config = root_of(daemon, ws) / "repos" / "x" / ".git" / "config"
    before = config.read_text()
    later = await run(daemon, ws, f"{PID1}; printf '[core]\\n\\tfsmonitor = evil\\n' >> keep")
    assert later["stdout"] == "python3\n", later  # protected and warm
    assert config.read_text() == before


# --- nothing of one command outlives it -------------------------------------------------------

#: Looks through every process's environment for the next task's secret, forever.
WATCHER = """\
import glob, sys, time
while True:
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            data = open(path, "rb").read()
        except OSError:
            continue
        if b"WARM_SECRET=" in data:
            with open("leak", "ab") as out:
                out.write(data + b"\\n")
    time.sleep(0.005)
"""


async def test_no_process_of_one_task_lives_on_to_read_the_next_tasks_secret(
    warm: Any, redis_client: redis.Redis
) -> None:
    """A tenant's task (public API, a token scoped to the workspace) leaves watchers behind in
    every way a shell offers (a session of its own, an orphan of pid 1, nohup, signals
    ignored, stopped); the next task of the workspace, from a producer, carries a secret in
    `credentials.env_vars`. Same uid, same pid namespace: a watcher alive then would read it
    from /proc/PID/environ (as the control shows, within one command). None may be alive."""
    daemon = await warm(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
    )
    ws = "ws-secret"
    _, token = await daemon.service.tokens.create("tenant", [ws])
    tokens = [unique_seconds() for _ in range(5)]
    plant = f"cat > watch.py <<'EOF'\n{WATCHER}EOF\n"
    control = (
        "WARM_SECRET=control sleep 3 & timeout 1 python3 watch.py control; "
        "grep -q WARM_SECRET=control leak && echo control-seen; rm -f leak; kill $!; "
    )
    leave = (
        f"setsid python3 watch.py {tokens[0]} & "
        f"(python3 watch.py {tokens[1]} &) ; "
        f"nohup python3 watch.py {tokens[2]} >/dev/null 2>&1 & "
        f"sh -c 'trap \"\" HUP INT TERM; exec python3 watch.py {tokens[3]}' & "
        f"python3 watch.py {tokens[4]} & kill -STOP $! ; "
        f"sleep 0.3; {WHERE}"
    )
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=daemon.urls[0], headers=headers, timeout=60) as c:
        record = await submit_and_wait(c, ws, [cmd(plant + control + leave)])
    (planted,) = [s["result"] for s in record["result"]["result"]["steps"]]
    assert planted["exit_code"] == 0, planted
    seen, planted["stdout"] = planted["stdout"].split("\n", 1)
    assert seen == "control-seen", planted  # the watcher finds a secret where there is one
    assert all(host_pids(t) == [] for t in tokens), "a watcher outlived its task"
    secret = f"s3cr3t-{unique_seconds()}"
    keys = daemon.service.queue.keys
    payload = raw_payload(
        workspace_id=ws,
        steps=[{"action": "execute_command", "command": f"{WHERE}; sleep 1; echo done"}],
        credentials={"env_vars": {"WARM_SECRET": secret}},
    )
    redis_client.lpush(keys.queue("normal"), payload)
    record = await wait_terminal(daemon, json.loads(payload)["task_id"])
    (step,) = [s["result"] for s in record.result["result"]["steps"]]
    assert step["stdout"].split() == [planted["stdout"].strip(), "done"], step  # same sandbox
    leak = root_of(daemon, ws) / "leak"
    assert not leak.exists() or secret not in leak.read_text(errors="replace")


#: Run in a command until the file `stop` appears: every process's environment and command
#: line it can see, searched for the token (given in two halves, so that its own command line
#: does not hold it); prints what it found and how many looks it took.
SCAN = """\
import glob, os, sys
secret, found, looks = (sys.argv[1] + sys.argv[2]).encode(), set(), 0
while not os.path.exists("stop"):
    looks += 1
    for path in glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if secret in open(path, "rb").read():
                found.add(path)
        except OSError:
            pass
print("looks", looks, "found", sorted(found))
"""


GIT_SECRET = "ghp_WARMSECRET_" + "7" * 24


@pytest.fixture(name="git_http")
def _git_http(tmp_path: Path) -> Iterator[str]:
    """A dumb-HTTP git server for one repository (proj.git) that demands GIT_SECRET; its
    host:port."""
    work, bare = tmp_path / "work", tmp_path / "srv" / "proj.git"
    work.mkdir()
    git_repo(work, {"README": "v1\n"})
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    with git_http_server(tmp_path / "srv", GIT_SECRET) as host:
        yield host


async def test_a_warm_command_never_sees_the_git_token_of_a_clone(
    warm: Any, tmp_path: Path, git_http: str
) -> None:
    """The workspace's git token is given to the network half of a clone only, in a sandbox
    of its own; a command of the workspace, in its warm sandbox all along, searches every
    process it can see while the clone runs and finds no trace of it."""
    secret, host = GIT_SECRET, git_http
    creds = tmp_path / "git-credentials.yaml"
    ws = "ws-token"
    creds.write_text(f"workspaces:\n  {ws}:\n    '{host}': {secret}\n")
    creds.chmod(0o600)
    daemon = await warm(
        {"git_network": "host"},
        git_schemes=("https", "http"),
        git_credentials_file=creds,
    )
    await run(daemon, ws, "true")
    mark = unique_seconds()
    async with trio.open_nursery() as nursery:
        got: dict[str, Any] = {}

        async def scan() -> None:
            halves = f"{secret[:10]} {secret[10:]}"
            command = f"python3 - {halves} {mark} <<'EOF'\n{SCAN}EOF"
            got["scan"] = await run(daemon, ws, command, timeout=60)

        nursery.start_soon(scan)
        await wait_for(lambda: host_pids(mark))
        clone = {"action": "git_clone", "repo": f"http://{host}/proj.git", "shallow": False}
        sub = await daemon.service.submit({"workspace_id": ws, "steps": [clone]})
        record = await wait_terminal(daemon, sub.record.id, timeout=60)
        (root_of(daemon, ws) / "stop").touch()
    (cloned,) = [s["result"] for s in record.result["result"]["steps"]]
    assert "error" not in cloned, cloned  # the token reached the server
    looks, found = got["scan"]["stdout"].split(" found ")
    assert found.strip() == "[]" and int(looks.split()[1]) > 0, got["scan"]
    assert got["scan"]["stdout"].startswith("looks"), got["scan"]


# --- the supervisor and its spare ----------------------------------------------------------------

#: Run in a command: every way into the spare the supervisor forked for the next command.
ROB_THE_SPARE = """\
import ctypes, glob, os
libc = ctypes.CDLL(None, use_errno=True)
head = b"/usr/bin/python3\\0-I\\0-S\\0-c\\0"
spares = [int(p.split("/")[2]) for p in glob.glob("/proc/[0-9]*/cmdline")
          if p.split("/")[2] != "1" and open(p, "rb").read().startswith(head)]
print("spares", len(spares))
for pid in spares:
    for what, call in [
        ("fd", lambda: os.listdir(f"/proc/{pid}/fd")),
        ("environ", lambda: open(f"/proc/{pid}/environ", "rb").read()),
        ("mem", lambda: open(f"/proc/{pid}/mem", "rb")),
        ("root", lambda: os.listdir(f"/proc/{pid}/root/")),
        ("map_files", lambda: os.listdir(f"/proc/{pid}/map_files")),
    ]:
        try:
            call()
            print(what, "open")
        except PermissionError:
            print(what, "denied")
    pidfd = os.pidfd_open(pid)
    for fd in range(8):
        if libc.syscall(438, pidfd, fd, 0) >= 0:
            print("getfd", fd, "taken")
    print("getfd errno", ctypes.get_errno())
    print("ptrace", libc.ptrace(16, pid, 0, 0), ctypes.get_errno())
"""


async def test_the_spare_cannot_be_read_traced_or_robbed(warm: Any) -> None:
    """The spare is not pid 1 (a command may kill or stop it, as any process of its
    workspace), but it holds the socket the supervisor hands the next command over: no
    command may open its descriptors, memory or root, take its socket, or trace it. From the
    host, it holds descriptors 0, 1, 2 and that socket, and nothing of the daemon's."""
    daemon = await warm()
    await run(daemon, "ws-spare", "true")
    (sandbox,) = pool_of(daemon).sandboxes()
    result = await run(daemon, "ws-spare", f"python3 - <<'EOF'\n{ROB_THE_SPARE}EOF")
    lines = result["stdout"].splitlines()
    assert lines[0] == "spares 1", result
    assert [ln for ln in lines if ln.endswith(("open", "taken"))] == [], result
    assert "getfd errno 1" in lines and "ptrace -1 1" in lines, result  # EPERM both
    children = Path(f"/proc/{sandbox.supervisor_pid}/task/{sandbox.supervisor_pid}/children")
    (spare,) = [int(p) for p in children.read_text().split()]
    held_fds = {
        int(n): os.readlink(f"/proc/{spare}/fd/{n}") for n in os.listdir(f"/proc/{spare}/fd")
    }
    sockets = [target for fd, target in held_fds.items() if fd > 2]
    daemon_socket = f"socket:[{os.fstat(sandbox.sock.fileno()).st_ino}]"
    assert len(sockets) == 1 and sockets[0].startswith("socket:"), held_fds
    assert daemon_socket not in held_fds.values()


@pytest.mark.parametrize(
    "cripple",
    [
        "prlimit --pid 1 --nproc=1:1",  # its forks fail
        "prlimit --pid 1 --nofile=4:4",  # the descriptors of a request do not fit
    ],
)
async def test_a_command_that_cripples_its_supervisor_costs_one_command(
    warm: Any, cripple: str
) -> None:
    """Same uid: a command may lower pid 1's limits (prlimit checks the uid, not whether the
    process is dumpable). Its supervisor then cannot start a command. That command fails
    with the reason, and the next one gets a new sandbox: before the fix, every later command
    of the workspace failed while the broken sandbox lived (and each use kept it alive).
    Other workspaces never notice."""
    daemon = await warm()
    await run(daemon, "ws-other", "true")
    before = await run(daemon, "ws-crip", WHERE)
    done = await run(daemon, "ws-crip", f"{cripple} && echo crippled")
    assert done["stdout"] == "crippled\n", done
    results = [await run(daemon, "ws-crip", f"echo {i}; {WHERE}") for i in range(4)]
    failed = [r for r in results if r["exit_code"] != 0]
    assert len(failed) <= 2, results  # the spare already forked may still start one
    assert all("could not be started" in r["error"] for r in failed), failed
    assert results[-1]["stdout"].split()[0] == "3", results
    assert results[-1]["stdout"].split()[1] != before["stdout"].strip()  # a new sandbox
    other = await run(daemon, "ws-other", "echo fine")
    assert other["stdout"] == "fine\n", other


@pytest.mark.parametrize(
    ("change", "show"),
    [
        (
            "prlimit --pid 1 --as=150000000:150000000 --stack=100000:100000",
            "ulimit -v; ulimit -s",
        ),
        (
            "chrt -i -p 0 1 && renice -n 19 -p 1 && taskset -p 1 1",
            "chrt -p $$ | head -n 1 | cut -d: -f2; nice; taskset -p $$ | cut -d: -f2",
        ),
        ("ionice -c 3 -p 1", "ionice -p $$"),
    ],
)
async def test_what_a_command_sets_on_its_supervisor_never_reaches_a_later_task(
    warm: Any, change: str, show: str
) -> None:
    """Changed on pid 1 (same uid: prlimit, SCHED_IDLE, nice, CPU affinity, the idle I/O
    class), an attribute was
    inherited by every spare forked since, so by every later task's commands (the address
    space capped, the commands starved), where a cold sandbox starts afresh each time. The
    sandbox is replaced instead, and no command runs with them."""
    daemon = await warm()
    ws = "ws-taint"
    before = await run(daemon, ws, f"{WHERE}; {show}")
    changed = await run(daemon, ws, f"{{ {change}; }} >/dev/null && echo changed")
    assert changed["stdout"] == "changed\n", changed
    for _ in range(3):
        (later,) = await task(daemon, ws, f"{WHERE}; {show}")
        if later["exit_code"] != 0:  # the one process already forked with them: refused
            assert "limits were changed" in later["error"], later
            continue
        assert later["stdout"].split()[1:] == before["stdout"].split()[1:], later
    assert later["stdout"].split()[0] != before["stdout"].split()[0], later  # a new sandbox


FLOOD = """\
import os, time
end = time.monotonic() + 3
while time.monotonic() < end:
    os.kill(1, 17)
"""


async def test_a_sigchld_flood_costs_the_supervisor_a_bounded_share_of_a_cpu(warm: Any) -> None:
    """The supervisor handles SIGCHLD, so a command may send it as many as it likes; each
    wakes it. Its cgroup had no CPU bound: two flooding processes took it to ~0.9 of a CPU
    that no command's `cpus` counted. Now its cgroup has a bound under half a CPU."""
    daemon = await warm()
    await run(daemon, "ws-flood", "true")
    (sandbox,) = pool_of(daemon).sandboxes()
    quota = cpu_quota(sandbox.supervisor_pid)
    assert quota is not None and quota <= 0.4, quota
    before = cpu_seconds(sandbox.supervisor_pid)
    flood = f"python3 -c '{FLOOD}' & python3 -c '{FLOOD}' & wait; echo flooded"
    result = await run(daemon, "ws-flood", flood)
    assert result["stdout"] == "flooded\n", result
    spent = cpu_seconds(sandbox.supervisor_pid) - before
    assert spent < 1.5, f"the supervisor spent {spent:.2f}s of CPU in a 3s flood"
    assert (await run(daemon, "ws-flood", "echo next"))["stdout"] == "next\n"


async def test_a_fork_bomb_leaves_the_supervisor_and_other_workspaces_serving(warm: Any) -> None:
    daemon = await warm()
    await run(daemon, "ws-bomb", "true")
    (sandbox,) = pool_of(daemon).sandboxes()
    async with trio.open_nursery() as nursery:
        got: dict[str, Any] = {}

        async def bomb() -> None:
            bomb = "b() { b | b & }; b; while :; do :; done"
            got["bomb"] = await run(daemon, "ws-bomb", bomb, timeout=3)

        nursery.start_soon(bomb)
        await wait_for(lambda: pool_of(daemon).statistics()["active"] == 1)
        other = await run(daemon, "ws-calm", "echo calm")
        assert other["stdout"] == "calm\n", other
    assert got["bomb"].get("timed_out") is True, got
    assert "Cannot fork" in got["bomb"]["stderr"], got  # held to its process limit
    after = await run(daemon, "ws-bomb", "echo next")
    assert after["stdout"] == "next\n", after
    assert alive(sandbox.supervisor_pid) and sandbox in pool_of(daemon).sandboxes()


PLANTED = "open({marker!r}, 'a').write(__name__)"


async def test_the_supervisor_imports_nothing_a_tenant_planted(warm: Any, tmp_path: Path) -> None:
    """Its directory is the workspace and its HOME in /etc/passwd is the shared /tmp: modules
    planted there (and `python3 -I -S` ignoring both) must never run in the supervisor, even
    in a supervisor started after they were planted and made to fail and fork again."""
    daemon = await warm()
    ws = "ws-plant"
    marker = str(root_of(daemon, ws) / "imported")
    names = [
        "json",
        "socket",
        "select",
        "signal",
        "traceback",
        "linecache",
        "encodings",
        "sitecustomize",
        "usercustomize",
        "ctypes",
        "resource",
        "_collections_abc",
    ]
    planting = ["mkdir -p /tmp/.local/lib/python3.11/site-packages"]
    for place in (".", "/tmp", "/tmp/.local/lib/python3.11/site-packages"):
        for name in names:
            code = shlex.quote(PLANTED.format(marker=marker))
            planting.append(f"echo {code} > {place}/{name}.py")
    planted = await run(daemon, ws, " && ".join(planting) + " && echo planted")
    assert planted["stdout"] == "planted\n", planted
    await reload(daemon, tmp_path / "policy.yaml", memory="120MiB")  # a new supervisor
    for command in ("true", "pkill -KILL -f 'python3 -I -S [-]c'", "no-such-program", "true"):
        await run(daemon, ws, command)
    assert not Path(marker).exists(), Path(marker).read_text()
    assert pool_of(daemon).statistics()["starts"] == 2


# --- what a sandbox keeps between commands -----------------------------------------------------

#: Leaves 37 MiB behind, outside the workspace and the files size limit: in /run, in
#: /dev/shm and in a SysV shared memory segment (key N).
LEAVE = (
    "head -c 7M /dev/zero > /run/a{n} && head -c 7M /dev/zero > /run/b{n} && "
    "head -c 7M /dev/zero > /dev/shm/c{n} && python3 -c 'import ctypes; "
    "libc = ctypes.CDLL(None); libc.shmat.restype = ctypes.c_void_p; "
    "at = libc.shmat(libc.shmget({n} + 1000, 16 << 20, 0o1600), 0, 0); "
    "ctypes.memset(at, 1, 16 << 20)' && echo left"
)


async def test_memory_a_sandbox_keeps_between_commands_is_bounded(warm: Any) -> None:
    """In a cold sandbox, what a command writes to /tmp, /run or /dev/shm, and its SysV
    shared memory, end with the sandbox, and meanwhile count against its memory limit. A warm
    sandbox keeps them after the command, and once the command's cgroups are gone they count
    against no limit: command after command, one tenant held as much of the host's memory as
    it liked (here 37 MiB a command under a 64 MiB limit). Now a sandbox whose commands left
    more than its memory limit is replaced, which frees it all."""
    daemon = await warm({"memory": "64MiB"})
    root = root_of(daemon, "ws-hoard")
    for n in range(5):
        result = await run(daemon, "ws-hoard", LEAVE.format(n=n))
        assert result["stdout"] == "left\n", result

        def bounded() -> bool:
            return sum(held(pid) for pid in supervisors(root)) <= 2 * 64 * MIB

        await wait_for(bounded, timeout=10)


async def test_many_commands_each_leaving_a_little_wear_their_sandbox_out(warm: Any) -> None:
    """A page left in /tmp keeps the removed cgroup of the command that wrote it alive, with
    its kernel structures, for as long as the sandbox lives: tens of KiB each here (more with
    more CPUs), which no limit counted; a command that wrote one small file, again and
    again, held more and more of them. Each such command now counts for at least 1 MiB
    against the sandbox's memory limit, so the sandbox is replaced after a bounded number."""
    daemon = await warm({"memory": "32MiB"})
    ws = "ws-pin"
    first = await run(daemon, ws, WHERE)
    for n in range(40):
        result = await run(daemon, ws, f"echo {n} > /tmp/pin-{n}")
        assert result["exit_code"] == 0, result
    last = await run(daemon, ws, f"{WHERE}; ls /tmp | grep -c pin-")
    now, pins = last["stdout"].split()
    assert now != first["stdout"].strip() and int(pins) < 40, last
    await wait_for(lambda: len(supervisors(root_of(daemon, ws))) == 1, timeout=10)


async def test_one_workspace_holds_one_idle_sandbox_whatever_its_keys(warm: Any) -> None:
    """The key holds the protected paths bound: a tenant that makes a new repository before
    each command gets a new sandbox each time. The old ones lived on until idle, each with
    its /tmp, and took the room of other workspaces' sandboxes (the LRU bound evicted theirs).
    Now a workspace's new sandbox replaces its old ones."""
    daemon = await warm({"protect": "repos/*/.git/config"}, warm_max=2)
    await run(daemon, "ws-victim", "true")
    (victim,) = pool_of(daemon).sandboxes()
    root = root_of(daemon, "ws-churn")
    for n in range(4):
        result = await run(daemon, "ws-churn", f"git init -q repos/r{n} && {PID1}")
        assert result["stdout"] == "python3\n", result
    await wait_for(lambda: len(supervisors(root)) == 1, timeout=10)
    assert victim in pool_of(daemon).sandboxes() and alive(victim.supervisor_pid)
    assert (await run(daemon, "ws-victim", "echo still"))["stdout"] == "still\n"
    assert pool_of(daemon).statistics()["starts"] == 5


# --- policy ------------------------------------------------------------------------------------


async def test_a_reloaded_policy_holds_the_next_command_in_a_live_sandbox(
    warm: Any, tmp_path: Path
) -> None:
    """Limits that do not shape the sandbox (processes, CPU seconds, file size) are not in
    its key: a sandbox started under a looser policy must still give the next command the
    stricter limits; a new protected path makes a new sandbox that binds it."""
    daemon = await warm({"pids": 64, "cpu": 30, "fsize": "8MiB"})
    await run(daemon, "ws-pol", "git init -q .")
    first = await run(daemon, "ws-pol", WHERE)
    await reload(daemon, tmp_path / "policy.yaml", pids=8, cpu=5, fsize="1MiB")
    limits = await run(daemon, "ws-pol", f"{WHERE}; ulimit -t; ulimit -f")
    assert limits["stdout"].split() == [first["stdout"].strip(), "5", "2048"], limits
    forks = await run(daemon, "ws-pol", "for i in 1 2 3 4 5 6 7 8 9; do sleep 2 & done; wait")
    assert "pids" in forks.get("limits_hit", []), forks
    await reload(
        daemon, tmp_path / "policy.yaml", pids=8, cpu=5, fsize="1MiB", protect=".git/config"
    )
    blocked = await run(daemon, "ws-pol", f"{WHERE}; echo '[x]' >> .git/config")
    assert blocked["stdout"].strip() != first["stdout"].strip(), blocked
    assert "Read-only" in blocked["stderr"], blocked


async def test_a_host_path_the_policy_no_longer_shares_is_gone_next(
    warm: Any, tmp_path: Path
) -> None:
    """A sandbox built while the policy shared a host directory must not keep showing it to
    the commands after a reload took it back."""
    shared = tmp_path / "toolchain"
    shared.mkdir()
    (shared / "token").write_text("shared-secret\n")
    daemon = await warm({"read_only": str(shared)})
    seen = await run(daemon, "ws-ro", f"cat {shared}/token")
    assert seen["stdout"] == "shared-secret\n", seen
    await reload(daemon, tmp_path / "policy.yaml")
    after = await run(daemon, "ws-ro", f"{PID1}; cat {shared}/token")
    assert after["stdout"] == "python3\n" and after["exit_code"] != 0, after
    await wait_for(lambda: len(supervisors(root_of(daemon, "ws-ro"))) == 1, timeout=10)


# --- workspaces and the daemon -------------------------------------------------------------------


async def test_workspaces_see_nothing_of_each_others_sandbox(warm: Any) -> None:
    daemon = await warm()
    mark = unique_seconds()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, daemon, "ws-a", f"echo secret > /tmp/a-{mark}; sleep {mark}")
        await wait_for(lambda: host_pids(mark))
        look = "ls -A /tmp /run /dev/shm; ipcs -m; cat /proc/[0-9]*/cmdline | tr '\\0' ' '"
        seen = await run(daemon, "ws-b", look)
        for pid in host_pids(mark):
            os.kill(pid, signal.SIGKILL)
    assert mark not in seen["stdout"], seen


async def test_a_fresh_sandbox_holds_nothing_of_the_daemons(warm: Any) -> None:
    """No file of the daemon's in its own mounts, no shared memory, no descriptor of the
    daemon's in its outer bubblewrap (the supervisor's and the command's are checked in
    tests/integration/test_warm.py)."""
    daemon = await warm()
    # The workspace is bound at its own path, which in tests is under /tmp.
    volume_top = str(Path(*daemon.settings.volume_path.parts[:3]))
    look = "find /run /dev/shm /tmp -mindepth 1 -maxdepth 1; ipcs -m | tail -n +4"
    found = await run(daemon, "ws-fresh", look)
    assert found["stdout"].split() in ([], [volume_top]), found
    (sandbox,) = pool_of(daemon).sandboxes()
    fds = {
        n: os.readlink(f"/proc/{sandbox.pid}/fd/{n}") for n in os.listdir(f"/proc/{sandbox.pid}/fd")
    }
    assert not [t for t in fds.values() if t.startswith("socket:")], fds
    assert sorted(fds) == ["0", "1", "2", "3"], fds  # /dev/null twice, its log pipe, signalfd


async def test_a_daemon_killed_mid_command_leaves_nothing_running(
    tmp_path: Path, prefix: str, schema: str
) -> None:
    """SIGKILL while a warm command and a process it moved to a session of its own run: the
    supervisor's bubblewrap dies with the daemon's thread, the supervisor with it, and with
    pid 1 gone every process of the sandbox."""
    traversable(tmp_path)
    dep = Deployment(tmp_path, prefix, schema, REDIS_URL, DATABASE_URL)
    try:
        daemon = await dep.start("warm-attack-kill")
        headers = {"X-Internal-Token": "reliability-internal"}
        away, fg = unique_seconds(), unique_seconds()
        command = f"setsid sleep {away} & sleep {fg}; {PID1}"

        async def exec_it() -> None:
            async with httpx.AsyncClient(
                base_url=daemon.internal, headers=headers, timeout=30
            ) as client:
                try:
                    await client.post("/workspaces/ws-kill/exec", json={"command": command})
                except httpx.HTTPError:
                    pass  # the daemon is killed under it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(exec_it)
            await wait_for(lambda: host_pids(away) and host_pids(fg))
            root = dep.volume / "ws-kill"
            assert supervisors(root), "the command was to run warm"
            daemon.kill(signal.SIGKILL)
            await daemon.wait()
        await wait_for(lambda: not host_pids(away) and not host_pids(fg), timeout=10)
        await wait_for(lambda: not supervisors(dep.volume / "ws-kill"), timeout=10)
    finally:
        await dep.close()
