"""The isolation invariants (docs/security.md), checked on every way the daemon starts a
process for a tenant, by one shared probe.

Each way is one entry of PATHS (one test id per path and network mode); a new way of
starting a process joins PATHS to pass review. On each, the same probe (PROBE, a Python
script in the workspace) reports from inside: its descriptors and those of the processes
above it in the sandbox (I1: 0, 1 and 2 only), its exact environment (I2: the task's, no
OLDPWD, no git token), whether it reached listeners the test opens on the host (I4: on
127.0.0.1, ::1 and the host's addresses, also through the sandbox's gateway), its uid,
capabilities, no_new_privs and seccomp mode (I8); in network mode `none` (the default) and
`egress`. Where the daemon runs git, the probe is what git itself starts on the workspace's
side: a filter, hook, upload-pack or receive-pack the tenant planted in its global or the
repository's git config. What runs nothing of the tenant's (ripgrep, the daemon's own
network-side git, the privileged launch chain) is inspected from the host while it runs
(`HostWatch`).

Also here: a tenant's core.sshCommand never runs when git goes to the network (I3), and a
daemon killed while a command runs restarts on its ports (no command holds its sockets).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import (
    DATABASE_URL,
    INTERNAL_TOKEN,
    REDIS_URL,
    git_repo,
    host_pids,
    submit_and_wait,
    traversable,
    unique_seconds,
    wait_for,
)
from tests.reliability.conftest import Daemon as ReliabilityDaemon
from tests.reliability.conftest import Deployment
from wsrunner.daemon import Daemon

#: The probe. Arguments: tag=NAME, out=DIR (also write the report there, or where it can:
#: its directory, $TMPDIR, $HOME), targets=H:P,... (try to connect to each), `filter` (be a
#: git clean/smudge filter: pass stdin through) and `quiet` (print nothing: git reads stdout).
PROBE = r"""
import json, os, socket, sys, time

def main():
    opts = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    flags = {a for a in sys.argv[1:] if "=" not in a}
    data = sys.stdin.buffer.read() if "filter" in flags else None
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass  # the listing's own descriptor, closed by now
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    ancestors, pid = [], os.getppid()
    while pid > 1 and len(ancestors) < 16:  # up to the sandbox's init (pid 1), or the host's
        proc = {"pid": pid}
        ancestors.append(proc)
        try:
            with open("/proc/%d/stat" % pid) as f:
                stat = f.read()
            proc["comm"] = stat[stat.index("(") + 1:stat.rindex(")")]
            pid = int(stat[stat.rindex(")") + 2:].split()[1])
            proc["fds"] = {}
            for name in os.listdir("/proc/%d/fd" % proc["pid"]):
                try:
                    proc["fds"][name] = os.readlink("/proc/%d/fd/%s" % (proc["pid"], name))
                except OSError:
                    pass
        except (OSError, ValueError) as exc:
            proc["error"] = repr(exc)
            break
    targets = [t for t in opts.get("targets", "").split(",") if t]
    gateway = None
    try:  # the default route's gateway: where a user-mode stack may map the host's loopback
        with open("/proc/net/route") as f:
            for line in f.read().splitlines()[1:]:
                parts = line.split()
                if parts[1] == "00000000" and parts[2] != "00000000":
                    gateway = ".".join(str(b) for b in bytes.fromhex(parts[2])[::-1])
                    targets += [gateway + ":" + t.rsplit(":", 1)[1] for t in list(targets)]
    except OSError:
        pass
    reached, refused = [], {}
    for target in targets:
        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            reached.append(target)
        except OSError as exc:
            refused[target] = repr(exc)
    report = {
        "tag": opts.get("tag"), "argv": sys.argv, "pid": os.getpid(), "ppid": os.getppid(),
        "uid": os.getuid(), "euid": os.geteuid(), "fds": fds, "env": dict(os.environ),
        "status": {k: status.get(k) for k in ("Uid", "Gid", "Groups", "Seccomp", "NoNewPrivs",
                                              "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "cwd": os.getcwd(), "reached": reached, "refused": refused, "ancestors": ancestors,
        "gateway": gateway,
    }
    text = json.dumps(report)
    name = "%s-%d-%d.json" % (opts.get("tag", "probe"), os.getpid(), time.time_ns())
    for where in (opts.get("out"), ".", os.environ.get("TMPDIR"), os.environ.get("HOME")):
        if where:
            try:
                os.makedirs(where, exist_ok=True)
                with open(os.path.join(where, name), "w") as f:
                    f.write(text)
                break
            except OSError:
                continue
    if data is not None:
        sys.stdout.buffer.write(data)
    elif "quiet" not in flags:
        print("WSRPROBE " + text)

main()
"""

#: The task environment a command gets (wsrunner/workspace/directories.py `open_task`), by name; the
#: values that matter are checked in `check_report`.
TASK_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_ALL",
        "WORKSPACE_ID",
        "TASK_ID",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "GIT_CONFIG_GLOBAL",
        "GIT_CONFIG_NOSYSTEM",
        "GIT_TERMINAL_PROMPT",
        "GIT_EDITOR",
        "GIT_PAGER",
        "PAGER",
        "GIT_ALLOW_PROTOCOL",
    }
)
#: Where the command starts (bubblewrap's --chdir, or `/bin/sh -c`).
SHELL_ENV = frozenset({"PWD"})
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WS = "ws-inv"

POLICY = """\
apiVersion: wsrunner/v1
kind: Policy
metadata: {name: invariants}
spec:
  sandbox: {require: full, network: none, protect: []}
  limits: {memory: 256MiB, pids: 64, timeoutSeconds: 120}
  rules:
    - {id: anything, action: allow, commands: ["*"]}
"""
OVERLAY = """\
apiVersion: wsrunner/v1
kind: PolicyOverlay
metadata: {{name: network-{mode}}}
spec:
  sandbox: {{network: {mode}, gitNetwork: {mode}}}
"""


@dataclass
class Host:
    """Listeners on the host that no tenant process may reach: on 127.0.0.1, on ::1 and on
    every address (reached through the host's own addresses)."""

    sockets: list[socket.socket] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    def listen(self, family: socket.AddressFamily, bind: str, *shown: str) -> None:
        s = socket.socket(family)
        s.bind((bind, 0))
        s.listen(64)
        s.setblocking(False)
        port = s.getsockname()[1]
        self.sockets.append(s)
        self.targets += [f"{h}:{port}" for h in shown]

    def accepted(self) -> int:
        """How many connections arrived (accepted and closed here)."""
        n = 0
        for s in self.sockets:
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()
                n += 1
        return n

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def _host_addresses() -> list[str]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]


@dataclass
class Tenant:
    """A daemon serving both APIs, a workspace with the probe, and a token scoped to it."""

    daemon: Daemon
    public: str
    internal: str
    token: str
    host: Host
    mode: str
    root: Path
    tmp: Path

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.public, timeout=90, headers={"Authorization": f"Bearer {self.token}"}
        )

    def internal_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.internal, timeout=90, headers={"X-Internal-Token": INTERNAL_TOKEN}
        )

    def probe_command(self, tag: str, *extra: str) -> str:
        return " ".join(
            [
                "python3",
                str(self.root / "probe.py"),
                f"tag={tag}",
                f"targets={','.join(self.host.targets)}",
                *extra,
            ]
        )

    async def submit(self, *steps: dict[str, Any]) -> dict[str, Any]:
        """Submit a task through the public API and wait for its end; its record."""
        async with self.client() as c:
            return await submit_and_wait(c, WS, list(steps))


@pytest.fixture(name="tenant", params=["none", "egress"])
async def _tenant(
    request: pytest.FixtureRequest, start_daemon: Callable[..., Any], tmp_path: Path
) -> AsyncIterator[Tenant]:
    mode = request.param
    etc = tmp_path / "etc"
    (etc / "policy.d").mkdir(parents=True)
    (etc / "policy.yaml").write_text(POLICY)
    if mode != "none":
        (etc / "policy.d" / f"50-{mode}.yaml").write_text(OVERLAY.format(mode=mode))
    host = Host()
    host.listen(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    host.listen(socket.AF_INET, "0.0.0.0", *_host_addresses())
    if socket.has_ipv6:
        try:
            host.listen(socket.AF_INET6, "::1", "[::1]")
        except OSError:
            pass  # no IPv6 loopback on this host
    daemon: Daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
        sse_keepalive_s=0.5,
        policy_file=etc / "policy.yaml",
        policy_dir=etc / "policy.d",
        git_schemes=("https", "ssh", "file"),
    )
    _, token = await daemon.service.tokens.create("tenant", [WS])
    public, internal = daemon.urls
    root = daemon.settings.volume_path / WS
    tenant = Tenant(daemon, public, internal, token, host, mode, root, tmp_path)
    async with tenant.internal_client() as c:  # the operator puts the probe in place
        r = await c.post(
            f"/workspaces/{WS}/files/write", json={"path": "probe.py", "content": PROBE}
        )
        assert r.status_code == 200, r.text
    try:
        yield tenant
    finally:
        host.close()


# --- the checks ---------------------------------------------------------------------------


def outcome(result: dict[str, Any]) -> Any:
    """What matters of a task record or an operation's result when an assertion fails: each
    step's error and stderr."""
    steps = (result.get("result") or {}).get("result", {}).get("steps")
    if isinstance(result.get("result"), dict) and "exit_code" in result["result"]:
        result = result["result"]  # a tool call's
    if steps is None:
        return {k: result.get(k) for k in ("error", "exit_code", "stderr", "stdout")}
    return [
        {
            "step": s["step"],
            "action": s["action"],
            **{k: s["result"][k] for k in ("error", "stderr") if s["result"].get(k)},
        }
        for s in steps
    ]


def output_of(result: dict[str, Any]) -> str:
    """Everything a task record's steps, an operation or a tool call printed (not the task's
    own definition, which holds the commands)."""
    if "configuration" in result:
        results = [s["result"] for s in result["result"]["result"]["steps"]]
    else:
        results = [result.get("result", result)]
    return "".join(r.get("stdout", "") + r.get("stderr", "") for r in results)


def reports_in(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line.split(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("WSRPROBE ")
    ]


def _fd_breaks(fds: dict[str, str], tenant: Tenant, *, own: bool) -> dict[str, str]:
    """Descriptors beyond 0, 1, 2; with `own`, those a git started by the daemon hands down
    to what it starts (its pipes, the workspace file it filters) are not counted."""
    return {
        n: t
        for n, t in fds.items()
        if int(n) > 2 and not (own and (t.startswith("pipe:") or t.startswith(f"{tenant.root}/")))
    }


def check_report(
    report: dict[str, Any], tenant: Tenant, *, git: bool = False, task_id: str | None = None
) -> list[str]:
    """Every invariant the report breaks, one line each (empty: it holds them all).

    `git`: the probe is a program git started (a filter, hook, upload-pack): git's own pipes
    and the workspace files it has open are allowed, in it and in the git processes above it
    (which cannot be looked at before they open them); anything else (a socket, a memfd, a
    file outside the workspace) is not. Git adds a few variables of its own (GIT_ADDED_ENV)
    and its exec-path to PATH.
    """
    broken: list[str] = []
    if extra := _fd_breaks(report["fds"], tenant, own=git):
        broken.append(f"I1: descriptors other than 0, 1, 2: {report['fds']}")
    chain = report["ancestors"]
    for proc in chain:
        if "error" in proc:
            broken.append(f"I1: could not read the descriptors of {proc}")
        elif extra := _fd_breaks(proc["fds"], tenant, own=git):
            broken.append(f"I1: {proc['comm']} (pid {proc['pid']} in the sandbox) holds {extra}")
    env = dict(report["env"])
    if git:
        while env.get("PATH", "").startswith("/usr/lib/git-core:"):
            env["PATH"] = env["PATH"].removeprefix("/usr/lib/git-core:")
        added = {k for k in env if k in GIT_ADDED_ENV or k.startswith("GITHEAD_")}
        required, allowed = TASK_ENV, TASK_ENV | SHELL_ENV | added
    else:
        required = allowed = TASK_ENV | SHELL_ENV
    if not required <= set(env) <= allowed:
        broken.append(
            f"I2: environment names: unexpected {sorted(set(env) - allowed)}, "
            f"missing {sorted(required - set(env))}"
        )
    if tokens := sorted(k for k in env if k.startswith("WSRUNNER_")):
        broken.append(f"I3: git token variables {tokens}")
    for name, want in (("PATH", SAFE_PATH), ("LANG", "C.UTF-8"), ("WORKSPACE_ID", WS)):
        if env.get(name) != want:
            broken.append(f"I2: {name}={env.get(name)!r}, expected {want!r}")
    if task_id is not None and env.get("TASK_ID") != task_id:
        broken.append(f"I2: TASK_ID={env.get('TASK_ID')!r}, expected {task_id!r}")
    for name in ("HOME", "TMPDIR", "GIT_CONFIG_GLOBAL"):
        if name in env and not env[name].startswith(f"{tenant.root}/tasks/"):
            broken.append(f"I2: {name}={env[name]!r} is not in the task's directory")
    status = report["status"]
    if status["Seccomp"] != "2":
        broken.append(f"I8: Seccomp {status['Seccomp']}, expected 2 (a filter)")
    if status["NoNewPrivs"] != "1":
        broken.append(f"I8: NoNewPrivs {status['NoNewPrivs']}, expected 1")
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if int(status[cap], 16) != 0:
            broken.append(f"I8: {cap} {status[cap]}, expected none")
    owner = tenant.root.stat().st_uid
    if report["uid"] == 0 or report["euid"] == 0 or report["uid"] != owner:
        broken.append(f"I8: uid {report['uid']}/{report['euid']}, expected the workspace's {owner}")
    if report["reached"]:
        broken.append(f"I4: reached host listeners {report['reached']} (mode {tenant.mode})")
    if tenant.mode == "egress" and not git and "gateway" in report and not report["gateway"]:
        broken.append("egress: no default route, so nothing above says egress keeps the host out")
    return broken


def assert_holds(result: dict[str, Any], tenant: Tenant, **kw: Any) -> None:
    """The probe ran (its report is in the command's stdout) and holds every invariant."""
    reports = reports_in(result["stdout"])
    assert reports, f"the probe did not run: {outcome(result)}"
    broken = {r.get("tag") or "?": check_report(r, tenant, **kw) for r in reports}
    assert not any(broken.values()), json.dumps(broken, indent=1)
    assert tenant.host.accepted() == 0, "a connection reached a host listener"


# --- the paths ------------------------------------------------------------------------------


async def via_execute_command(tenant: Tenant) -> None:
    record = await tenant.submit(
        {"action": "execute_command", "command": tenant.probe_command("execute_command")}
    )
    result = record["result"]["result"]["steps"][0]["result"]
    assert_holds(result, tenant, task_id=record["id"])


async def via_exec(tenant: Tenant) -> None:
    async with tenant.internal_client() as c:
        r = await c.post(f"/workspaces/{WS}/exec", json={"command": tenant.probe_command("exec")})
    assert r.status_code == 200, r.text
    assert_holds(r.json(), tenant)


async def via_exec_stream(tenant: Tenant) -> None:
    async with tenant.internal_client() as c:
        body = {"command": tenant.probe_command("exec_stream")}
        events = []
        async with aconnect_sse(c, "POST", f"/workspaces/{WS}/exec/stream", json=body) as source:
            async for ev in source.aiter_sse():
                events.append((ev.event, json.loads(ev.data)))
    assert events and events[-1][0] == "exit", events
    assert_holds(events[-1][1], tenant)


async def via_workspace_exec(tenant: Tenant) -> None:
    async with tenant.client() as c:
        r = await c.post(
            "/api/tools/call",
            json={
                "workspace_id": WS,
                "tool": "workspace_exec",
                "arguments": {"command": tenant.probe_command("workspace_exec")},
            },
        )
    assert r.status_code == 200, r.text
    assert_holds(r.json()["result"], tenant)


HOST_PIDNS = os.readlink("/proc/self/ns/pid")


class HostWatch:
    """While on, inspects from the host every process `match(pid, argv)` picks, in a sandbox
    (another pid namespace) or, with `sandboxed` False, outside any (the launch chain): a
    thread polls /proc, stops each such process (SIGSTOP), reads what the probe would report
    about itself (`_proc_report`) and lets it go on (SIGCONT); once per program a process
    runs. For what runs nothing of the tenant's (ripgrep, the daemon's own git, the launch
    chain), so the probe cannot run inside it."""

    def __init__(
        self, match: Callable[[int, list[bytes]], bool], *, sandboxed: bool = True
    ) -> None:
        self.match = match
        self.sandboxed = sandboxed
        self.reports: dict[tuple[int, bytes], dict[str, Any]] = {}
        self._seen: set[tuple[int, bytes]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HostWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        args = f.read().split(b"\0")
                    key = (pid, args[0])
                    if key in self._seen or not self.match(pid, args):
                        continue
                    if (os.readlink(f"/proc/{pid}/ns/pid") != HOST_PIDNS) != self.sandboxed:
                        continue
                    self._seen.add(key)
                    os.kill(pid, signal.SIGSTOP)
                except OSError:
                    continue  # gone already
                try:
                    self.reports[key] = _proc_report(pid)
                except OSError:
                    pass  # it ended before it stopped
                finally:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
            time.sleep(0.001)


def _proc_report(pid: int) -> dict[str, Any]:
    """What PROBE reports about itself, read from the host about process `pid`."""
    fds = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[name] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(v.decode().split("=", 1) for v in f.read().split(b"\0") if v)
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    uid, euid = (int(u) for u in status["Uid"].split()[:2])
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
    return {
        "tag": f"pid {pid}",
        "argv": argv,
        "fds": fds,
        "env": env,
        "uid": uid,
        "euid": euid,
        "status": {
            k: status.get(k)
            for k in ("Seccomp", "NoNewPrivs", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
        },
        "netns": os.readlink(f"/proc/{pid}/ns/net"),
        "reached": [],
        "ancestors": [],
    }


#: What ripgrep runs with (operations.py `grep`): no task environment; bubblewrap sets PWD
#: where its --chdir took it (checked: the workspace).
GREP_ENV = frozenset({"PATH", "LANG", "PWD"})


async def via_grep(tenant: Tenant) -> None:
    """ripgrep runs no program of the tenant's: its process is inspected from the host while
    it runs (kept running by a search with megabytes of matches), for descriptors (besides
    the workspace directories and files it is reading and the system's it loads), its
    environment, identity, seccomp, and a network namespace of its own.

    Not probed: whether it could connect anywhere (it runs no code of the tenant's, so
    nothing would try; its network namespace is checked instead), and whether it could read
    outside the workspace (it follows no symlink and the path is checked before it starts;
    with nothing to make it look elsewhere, no honest search can show it).
    """
    token = f"needle{uuid.uuid4().hex}"
    line = f"{token} " + "x" * 100 + "\n"
    async with tenant.internal_client() as c:
        for i in range(8):
            r = await c.post(
                f"/workspaces/{WS}/files/write",
                json={"path": f"hay/{i}.txt", "content": line * 20000},
            )
            assert r.status_code == 200, r.text

        def ripgrep(pid: int, args: list[bytes]) -> bool:
            return os.path.basename(args[0]) == b"rg" and token.encode() in args

        with HostWatch(ripgrep) as watch:
            r = await c.get(f"/workspaces/{WS}/files/grep", params={"pattern": token})
        assert r.status_code == 200 and r.json()["engine"] == "ripgrep", r.text
    assert watch.reports, "no ripgrep process was seen while the search ran"
    (report, *_) = watch.reports.values()
    # What ripgrep opens itself while it runs (the workspace's files, its libraries, its own
    # /proc/self/mountinfo, seen from the host as the sandbox's /proc/2/...) is not inherited.
    fds = {
        k: v
        for k, v in report["fds"].items()
        if v != str(tenant.root) and not v.startswith((f"{tenant.root}/", "/usr/", "/proc/"))
    }
    report["fds"] = fds
    broken = [b for b in check_report(report, tenant) if "I2" not in b]
    env = report["env"]
    if set(env) != GREP_ENV or env["PWD"] != str(tenant.root):
        broken.append(f"I2: environment {env}, expected the names {sorted(GREP_ENV)}")
    if report["netns"] == os.readlink("/proc/self/ns/net"):
        broken.append("I4: ripgrep runs in the host's network namespace")
    assert not broken, json.dumps(broken, indent=1)


# --- git: the probe as what git starts on the workspace's side -------------------------------

#: Every file named *.probe goes through the tenant's filter (defined in a git config).
GITATTRIBUTES = "*.probe filter=wsrprobe\n"
#: Names git itself adds to the environment of the programs it starts (filters, hooks,
#: upload-pack): git's, not the daemon's nor the tenant's.
GIT_ADDED_ENV = frozenset(
    {
        "GIT_DIR",
        "GIT_PREFIX",
        "GIT_EXEC_PATH",
        "GIT_INDEX_FILE",
        "GIT_WORK_TREE",
        "GIT_PROTOCOL",
        "GIT_REFLOG_ACTION",
        "GIT_CONFIG_PARAMETERS",
        "GIT_NO_LAZY_FETCH",
    }
)


@dataclass
class Repo:
    """A repository on the host (file://) and its clone in the workspace, repos/<name>."""

    name: str
    origin: Path
    url: str

    def advance(self) -> None:
        """A new commit on the origin that changes a.probe, so that a pull checks it out."""
        (self.origin / "a.probe").write_text(f"{uuid.uuid4().hex}\n")
        env = dict(
            os.environ,
            GIT_AUTHOR_NAME="t",
            GIT_AUTHOR_EMAIL="t@t",
            GIT_COMMITTER_NAME="t",
            GIT_COMMITTER_EMAIL="t@t",
        )
        subprocess.run(
            ["git", "-C", str(self.origin), "commit", "-qam", "next"], check=True, env=env
        )


def trigger(tenant: Tenant, tag: str, *flags: str) -> str:
    """The probe as a command git runs, writing its report to reports/ of the workspace."""
    return tenant.probe_command(tag, f"out={tenant.root}/reports", *flags)


def git_config_commands(repo: str | None, entries: dict[str, str]) -> str:
    """A shell command setting `entries` in repos/<repo>/.git/config, or (None) the task's
    global git config."""
    where = "config --global" if repo is None else f"-C repos/{repo} config"
    return " && ".join(f"git {where} {shlex.quote(k)} {shlex.quote(v)}" for k, v in entries.items())


def planted_repo_config(tenant: Tenant) -> dict[str, str]:
    """Programs a tenant can name in a repository's own .git/config."""
    return {
        "filter.wsrprobe.smudge": trigger(tenant, "smudge-repo", "filter"),
        "filter.wsrprobe.clean": trigger(tenant, "clean-repo", "filter"),
        "core.fsmonitor": trigger(tenant, "fsmonitor-repo", "quiet"),
        "core.hooksPath": str(tenant.root / "hooks"),
        "remote.origin.uploadpack": trigger(tenant, "uploadpack-repo", "quiet")
        + "; git-upload-pack",
        "remote.origin.receivepack": trigger(tenant, "receivepack-repo", "quiet")
        + "; git-receive-pack",
    }


def planted_global_config(tenant: Tenant) -> dict[str, str]:
    """Programs a task's earlier step can name in its global git config."""
    return {
        "filter.wsrprobe.smudge": trigger(tenant, "smudge-global", "filter"),
        "filter.wsrprobe.clean": trigger(tenant, "clean-global", "filter"),
        "core.hooksPath": str(tenant.root / "hooks"),
    }


def hook_files(tenant: Tenant) -> list[dict[str, Any]]:
    """write_file steps for hooks that run the probe (made executable by `chmod_hooks`)."""
    return [
        {
            "action": "write_file",
            "path": f"hooks/{name}",
            "content": f"#!/bin/sh\nexec {trigger(tenant, 'hook-' + name, 'quiet')}\n",
        }
        for name in ("post-checkout", "post-merge")
    ]


CHMOD_HOOKS = {"action": "execute_command", "command": "chmod +x hooks/*"}


async def cloned(tenant: Tenant) -> Repo:
    """A new origin on the host, cloned into the workspace by a task, with the tenant's
    programs planted in its .git/config and in hooks/."""
    name = f"origin{uuid.uuid4().hex[:8]}"
    origin = tenant.tmp / name
    origin.mkdir()
    url = git_repo(origin, {".gitattributes": GITATTRIBUTES, "a.probe": "1\n"})
    plant = git_config_commands(name, planted_repo_config(tenant))
    record = await tenant.submit(
        {"action": "git_clone", "repo": url, "shallow": False},
        *hook_files(tenant),
        CHMOD_HOOKS,
        {"action": "execute_command", "command": plant},
    )
    assert record["status"] == "completed", outcome(record)
    return Repo(name, origin, url)


def git_reports(tenant: Tenant) -> list[dict[str, Any]]:
    """The reports the probe wrote in reports/ (and removes them)."""
    found = []
    folder = tenant.root / "reports"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        found.append(json.loads(path.read_text()))
        path.unlink()
    return found


def stray_reports(tenant: Tenant) -> list[str]:
    """Reports of the tenant's git programs written anywhere but reports/: one of them ran
    where reports/ is not to be seen (the daemon's mirror, say)."""
    found = []
    for pattern in ("*-repo-*.json", "*-global-*.json", "hook-*.json"):
        found += [str(p) for p in tenant.tmp.rglob(pattern) if p.parent != tenant.root / "reports"]
    return found


def assert_git_holds(tenant: Tenant, result: dict[str, Any], *, required: bool) -> None:
    """The probe's reports hold the invariants; `required`: git started at least one."""
    assert stray_reports(tenant) == [], "a program of the tenant's ran outside the workspace"
    reports = git_reports(tenant)
    if required:
        assert reports, f"git started none of the tenant's programs: {outcome(result)}"
    broken = {r["tag"]: check_report(r, tenant, git=True) for r in reports}
    assert not any(broken.values()), json.dumps(broken, indent=1)
    assert tenant.host.accepted() == 0, "a connection reached a host listener"


async def internal_git(
    tenant: Tenant, operation: str, cwd: str, args: Any = None
) -> dict[str, Any]:
    async with tenant.internal_client() as c:
        r = await c.post(
            f"/workspaces/{WS}/git", json={"operation": operation, "cwd": cwd, "args": args}
        )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def via_git_clone(tenant: Tenant) -> None:
    name = f"fresh{uuid.uuid4().hex[:8]}"
    origin = tenant.tmp / name
    origin.mkdir()
    url = git_repo(origin, {".gitattributes": GITATTRIBUTES, "a.probe": "1\n"})
    plant = git_config_commands(None, planted_global_config(tenant))
    record = await tenant.submit(
        *hook_files(tenant),
        CHMOD_HOOKS,
        {"action": "execute_command", "command": plant},
        {"action": "git_clone", "repo": url, "shallow": False},
    )
    assert_git_holds(tenant, record, required=True)


async def via_git_pull(tenant: Tenant) -> None:
    repo = await cloned(tenant)
    git_reports(tenant)
    repo.advance()
    plant = git_config_commands(None, planted_global_config(tenant))
    record = await tenant.submit(
        {"action": "execute_command", "command": plant},
        {"action": "git_pull", "repo_name": repo.name},
    )
    assert_git_holds(tenant, record, required=True)


async def via_internal_git_pull(tenant: Tenant) -> None:
    repo = await cloned(tenant)
    git_reports(tenant)
    repo.advance()
    result = await internal_git(tenant, "pull", f"repos/{repo.name}")
    assert_git_holds(tenant, result, required=True)


async def via_internal_git_clone(tenant: Tenant) -> None:
    """A clone into an existing clone of the same origin pulls it (the cached path)."""
    repo = await cloned(tenant)
    git_reports(tenant)
    repo.advance()
    result = await internal_git(tenant, "clone", ".", [repo.url])
    assert_git_holds(tenant, result, required=True)


async def via_internal_git_fetch(tenant: Tenant) -> None:
    """A fetch checks nothing out: git may start none of the tenant's programs on the
    workspace's side (an upload-pack named in .git/config is one it could)."""
    repo = await cloned(tenant)
    git_reports(tenant)
    repo.advance()
    result = await internal_git(tenant, "fetch", f"repos/{repo.name}")
    assert_git_holds(tenant, result, required=False)


async def via_internal_git_push(tenant: Tenant) -> None:
    """As fetch: a receive-pack named in .git/config is the tenant's program it could start."""
    repo = await cloned(tenant)
    git_reports(tenant)
    result = await internal_git(tenant, "push", f"repos/{repo.name}")
    assert_git_holds(tenant, result, required=False)


async def via_internal_git_local(tenant: Tenant) -> None:
    """An operation without network (`add`) runs the clean filter of .git/config."""
    repo = await cloned(tenant)
    (tenant.root / "repos" / repo.name / "a.probe").write_text("changed\n")
    git_reports(tenant)
    result = await internal_git(tenant, "add", f"repos/{repo.name}", ["a.probe"])
    assert_git_holds(tenant, result, required=True)


async def via_workspace_git(tenant: Tenant) -> None:
    repo = await cloned(tenant)
    git_reports(tenant)
    repo.advance()
    async with tenant.client() as c:
        r = await c.post(
            "/api/tools/call",
            json={
                "workspace_id": WS,
                "tool": "workspace_git",
                "arguments": {"operation": "pull", "cwd": f"repos/{repo.name}"},
            },
        )
    assert r.status_code == 200, r.text
    assert_git_holds(tenant, r.json()["result"], required=True)


#: The whole environment of the daemon's network-side git (the mirror): its own HOME and
#: global config (outside the workspace), ssh with `-F /dev/null`; nothing of the task's.
MIRROR_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "GIT_CONFIG_NOSYSTEM",
        "GIT_CONFIG_GLOBAL",
        "GIT_TERMINAL_PROMPT",
        "GIT_ALLOW_PROTOCOL",
        "GIT_SSH_COMMAND",
    }
)


def check_network_side(report: dict[str, Any], tenant: Tenant) -> list[str]:
    """What a process of the daemon's network-side git breaks: I1 (besides git's pipes, the
    repositories' files it reads and writes, /dev/null and the system's files it loads), I3 (its configuration is the daemon's,
    outside the workspace: no task variable), I4 (a network namespace of its own), I8."""
    broken = []
    fds = {
        n: t
        for n, t in report["fds"].items()
        if int(n) > 2
        and not (t.startswith(("pipe:", "/usr/", f"{tenant.tmp}/")) or t == "/dev/null")
    }
    if fds:
        broken.append(f"I1: descriptors {fds}")
    env = dict(report["env"])
    while env.get("PATH", "").startswith("/usr/lib/git-core:"):
        env["PATH"] = env["PATH"].removeprefix("/usr/lib/git-core:")
    allowed = MIRROR_ENV | {"PWD"} | GIT_ADDED_ENV
    if not MIRROR_ENV <= set(env) <= allowed:
        broken.append(
            f"I3: environment names: unexpected {sorted(set(env) - allowed)}, "
            f"missing {sorted(MIRROR_ENV - set(env))}"
        )
    for name in ("HOME", "GIT_CONFIG_GLOBAL"):
        if env.get(name, "").startswith(f"{tenant.root}/") or not env.get(name):
            broken.append(f"I3: {name}={env.get(name)!r}: the tenant's, or none")
    if env.get("GIT_CONFIG_NOSYSTEM") != "1" or "-F /dev/null" not in env.get(
        "GIT_SSH_COMMAND", ""
    ):
        broken.append("I3: the system's git config or ssh config is read")
    broken += [b for b in check_report(report, tenant) if b.startswith("I8")]
    if report["netns"] == os.readlink("/proc/self/ns/net"):
        broken.append("I4: the network-side git runs in the host's network namespace")
    return broken


async def via_git_mirror(tenant: Tenant) -> None:
    """The daemon's own network-side git (fetching into its mirror) runs nothing of the
    tenant's either, so it is inspected from the host while it runs: every process outside
    the workspace with the origin in its arguments or as its directory (git fetch,
    upload-pack, pack-objects), kept running by a repository with 16 MiB that does not
    compress."""
    name = f"big{uuid.uuid4().hex[:8]}"
    origin = tenant.tmp / name
    origin.mkdir()
    (origin / "blob.bin").write_bytes(os.urandom(16 * 2**20))
    url = git_repo(origin, {"f": "1\n"})
    wanted = {url.encode(), str(origin).encode(), f"{origin}/.git".encode()}

    def network_side(pid: int, args: list[bytes]) -> bool:
        if os.path.basename(args[0]) == b"bwrap":
            return False  # the sandbox's own init
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return False
        if cwd == str(tenant.root) or cwd.startswith(f"{tenant.root}/"):
            return False  # the workspace's side (`remote set-url origin <url>`, no network)
        return bool(wanted & set(args)) or cwd in (str(origin), f"{origin}/.git")

    with HostWatch(network_side) as watch:
        record = await tenant.submit({"action": "git_clone", "repo": url, "shallow": False})
    assert record["status"] == "completed", outcome(record)
    assert watch.reports, "no process of the network-side git was seen while it ran"
    broken = {
        f"{r['tag']} {r['argv'][:3]}": check_network_side(r, tenant) for r in watch.reports.values()
    }
    assert not any(broken.values()), json.dumps(broken, indent=1)


#: The environment of the launch chain (the shell that joins the cgroups as root, setpriv,
#: bubblewrap outside its sandbox): fixed, the daemon's; PWD is the shell's, after its `cd`.
LAUNCH_ENV = frozenset({"PATH", "LC_ALL", "PWD"})


def daemon_sockets() -> set[str]:
    """The daemon runs in this process: its sockets (listeners, Redis, ...)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if (target := os.readlink(f"/proc/self/fd/{name}")).startswith("socket:"):
                found.add(target)
        except OSError:
            pass
    return found


async def via_launch_chain(tenant: Tenant) -> None:
    """What runs with more privilege than the sandbox to start a command (I2): inspected from
    the host while a command runs, it holds no task variable (the task's environment is set
    inside the sandbox) and none of the daemon's sockets (it would hand them on; a socket of
    its own, such as libc's for a user lookup, is not the daemon's). The cold chain, which a
    warm sandbox starts through too: warm sandboxes are set aside meanwhile."""
    command = f"sleep 1.5 && echo {uuid.uuid4().hex}"

    def launcher(pid: int, args: list[bytes]) -> bool:
        return command.encode() in args

    sandbox = tenant.daemon.service.workspace.executor.sandbox
    pool, sandbox.warm = sandbox.warm, None
    try:
        with HostWatch(launcher, sandboxed=False) as watch:
            async with tenant.internal_client() as c:
                r = await c.post(f"/workspaces/{WS}/exec", json={"command": command})
    finally:
        sandbox.warm = pool
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    assert watch.reports, "no process of the launch chain was seen while the command ran"
    daemons = daemon_sockets()
    broken = {}
    for report in watch.reports.values():
        problems = []
        if unexpected := sorted(set(report["env"]) - LAUNCH_ENV):
            problems.append(f"I2: variables beyond the launch's own: {unexpected}")
        if shared := {n: t for n, t in report["fds"].items() if t in daemons}:
            problems.append(f"I1: the daemon's own sockets {shared}")
        broken[f"{report['tag']} {report['argv'][0]}"] = problems
    assert not any(broken.values()), json.dumps(broken, indent=1)


async def via_warm_sandbox(tenant: Tenant) -> None:
    """Warm sandboxes (issue 21): with the network `none`, commands start in the workspace's
    live sandbox, whose pid 1 is its supervisor; with `egress`, in a sandbox of their own
    (bubblewrap's init is pid 1). Either way the probe holds every invariant, twice in a row
    (the second command in the same sandbox). The supervisor, inspected from the host, is no
    more than a command: the workspace's uid, no capability, the seccomp filter, no task
    variable, none of the daemon's sockets; and not dumpable (its /proc files are root's), so
    that no command can trace it, read it or take its descriptors. The bubblewrap outside,
    the daemon's child, holds no task variable and none of the daemon's sockets either."""
    results = []
    async with tenant.internal_client() as c:
        for tag in ("warm-1", "warm-2"):
            command = f"{tenant.probe_command(tag)}; cat /proc/1/comm"
            r = await c.post(f"/workspaces/{WS}/exec", json={"command": command})
            assert r.status_code == 200, r.text
            results.append(r.json())
    for result in results:
        assert_holds(result, tenant)
    first_pid1 = {r["stdout"].splitlines()[-1] for r in results}
    assert first_pid1 == ({"python3"} if tenant.mode == "none" else {"bwrap"}), results
    pool = tenant.daemon.service.workspace.executor.sandbox.warm
    assert pool is not None
    if tenant.mode != "none":
        return
    (warm,) = [s for s in pool.sandboxes() if s.key.root == str(tenant.root)]
    daemons = daemon_sockets()
    supervisor = _proc_report(warm.supervisor_pid)
    broken = [b for b in check_report(supervisor, tenant) if not b.startswith(("I1", "I2"))]
    if unexpected := sorted(set(supervisor["env"]) - LAUNCH_ENV):
        broken.append(f"I2: the supervisor has variables {unexpected}")
    if shared := {n: t for n, t in supervisor["fds"].items() if t in daemons}:
        broken.append(f"I1: the supervisor holds the daemon's sockets {shared}")
    if os.stat(f"/proc/{warm.supervisor_pid}/mem").st_uid != 0:
        broken.append("the supervisor is dumpable: a command could trace it or read its memory")
    outside = _proc_report(warm.pid)
    if unexpected := sorted(set(outside["env"]) - LAUNCH_ENV):
        broken.append(f"I2: the sandbox's bubblewrap has variables {unexpected}")
    if shared := {n: t for n, t in outside["fds"].items() if t in daemons}:
        broken.append(f"I1: the sandbox's bubblewrap holds the daemon's sockets {shared}")
    assert not broken, json.dumps(broken, indent=1)


PATHS: dict[str, Callable[[Tenant], Any]] = {
    "execute_command": via_execute_command,
    "exec": via_exec,
    "exec_stream": via_exec_stream,
    "workspace_exec": via_workspace_exec,
    "grep": via_grep,
    "git_clone": via_git_clone,
    "git_pull": via_git_pull,
    "git_internal_pull": via_internal_git_pull,
    "git_internal_clone": via_internal_git_clone,
    "git_internal_fetch": via_internal_git_fetch,
    "git_internal_push": via_internal_git_push,
    "git_internal_local": via_internal_git_local,
    "workspace_git": via_workspace_git,
    "git_mirror": via_git_mirror,
    "launch_chain": via_launch_chain,
    "warm_sandbox": via_warm_sandbox,
}


@pytest.mark.parametrize("path", list(PATHS))
async def test_invariants_hold_on_every_path(tenant: Tenant, path: str) -> None:
    await PATHS[path](tenant)


@pytest.mark.parametrize("tenant", ["host"], indirect=True)
async def test_the_probe_sees_the_host_when_the_policy_gives_it(tenant: Tenant) -> None:
    """`network: host` gives up I4 on purpose: the probe must see that, or its silence in the
    other modes would mean nothing."""
    async with tenant.internal_client() as c:
        r = await c.post(f"/workspaces/{WS}/exec", json={"command": tenant.probe_command("host")})
    (report,) = reports_in(r.json()["stdout"])
    assert "127.0.0.1:" in " ".join(report["reached"]), report["refused"]


# --- restart --------------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["full", "off"])
async def test_a_daemon_killed_while_a_command_runs_restarts_on_its_ports(
    tmp_path: Path, prefix: str, schema: str, isolation: str
) -> None:
    """SIGKILL a real daemon while a task's command runs, start it again at once on the same
    ports: it binds and serves, because no command holds the daemon's listening sockets (I1).

    Under full isolation the command dies with its sandbox (bubblewrap --die-with-parent);
    with the sandbox turned off (WSRUNNER_SANDBOX=off, `require: none`) it outlives the daemon,
    and a listening socket it inherited would keep the port.
    """
    traversable(tmp_path)
    dep = Deployment(tmp_path, prefix, schema, REDIS_URL, DATABASE_URL)
    extra = {}
    if isolation == "off":
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy.read_text().replace("require: full", "require: none"))
        extra["WSRUNNER_SANDBOX"] = "off"
    seconds = unique_seconds()
    try:
        first = await dep.start("inv-restart", **extra)
        async with dep.client(first) as c:
            body = {
                "workspace_id": "ws-restart",
                "steps": [{"action": "execute_command", "command": f"sleep {seconds}"}],
            }
            r = await c.post("/api/tasks/submit", json=body)
            assert r.status_code == 202, r.text
            task_id = r.json()["task_id"]
        await wait_for(lambda: host_pids(seconds), timeout=30)
        first.kill(signal.SIGKILL)
        await first.wait()
        if isolation == "off":  # else this case would show nothing
            assert host_pids(seconds), "the command was to outlive its daemon"
        again = ReliabilityDaemon("inv-restart-again", first.env)  # the same ports
        again.start()
        dep.daemons.append(again)
        await again.ready()  # fails if it exits (the ports are taken) or never answers
        async with dep.client(again) as c, httpx.AsyncClient(timeout=5) as probe:
            for _ in range(20):  # each on a new connection: none may land in a stale backlog
                assert (await probe.get(f"{again.internal}/livez")).status_code == 200
                r = await c.get(f"/api/tasks/{task_id}", headers={"Connection": "close"})
                assert r.status_code == 200, r.text
    finally:
        await dep.close()
        for pid in host_pids(seconds):
            os.kill(pid, signal.SIGKILL)


# --- git: tenant configuration never meets the network (I3) ---------------------------------


def ssh_url(name: str) -> str:
    """An ssh remote nobody answers: only a tenant's core.sshCommand makes it "work"."""
    return f"ssh://wsrunner-probe.invalid/{name}.git"


@dataclass
class Planted:
    """A core.sshCommand of the tenant's: the probe (its report is the marker), then a line
    on stderr, then failure."""

    tenant: Tenant
    word: str = field(default_factory=lambda: f"WSRMARKER{uuid.uuid4().hex}")

    def command(self, where: str) -> str:
        probe = self.tenant.probe_command(
            f"ssh-{where}", f"out={self.tenant.root}/markers", "quiet"
        )
        return f"{probe}; echo {self.word} >&2; exit 1"

    def ran(self, result: dict[str, Any]) -> list[str]:
        """Every trace of it: markers anywhere under the test's directory (the volume, and a
        daemon's mirrors if they are there), its word in the result, a connection."""
        traces = [str(p) for p in self.tenant.tmp.rglob("ssh-*.json")]
        if self.word in output_of(result):
            traces.append("its stderr line in the result")
        if self.tenant.host.accepted():
            traces.append("a connection to a host listener")
        return traces


async def planted_ssh_repo(tenant: Tenant, planted: Planted) -> Repo:
    """A clone whose origin is an ssh URL, with the tenant's core.sshCommand in .git/config."""
    repo = await cloned(tenant)
    repo.url = ssh_url(repo.name)
    plant = git_config_commands(
        repo.name, {"remote.origin.url": repo.url, "core.sshCommand": planted.command("repo")}
    )
    record = await tenant.submit({"action": "execute_command", "command": plant})
    assert record["status"] == "completed", outcome(record)
    return repo


def global_ssh(planted: Planted) -> dict[str, Any]:
    """A step planting core.sshCommand in the task's global git config."""
    plant = git_config_commands(None, {"core.sshCommand": planted.command("global")})
    return {"action": "execute_command", "command": plant}


async def network_git_clone(tenant: Tenant, planted: Planted) -> dict[str, Any]:
    url = ssh_url(f"fresh{uuid.uuid4().hex[:8]}")
    return await tenant.submit(global_ssh(planted), {"action": "git_clone", "repo": url})


async def network_git_pull(tenant: Tenant, planted: Planted) -> dict[str, Any]:
    repo = await planted_ssh_repo(tenant, planted)
    return await tenant.submit(global_ssh(planted), {"action": "git_pull", "repo_name": repo.name})


async def network_internal(operation: str, tenant: Tenant, planted: Planted) -> dict[str, Any]:
    repo = await planted_ssh_repo(tenant, planted)
    if operation == "clone":  # of the same URL: the cached path, a pull
        return await internal_git(tenant, "clone", ".", [repo.url])
    return await internal_git(tenant, operation, f"repos/{repo.name}")


async def network_workspace_git(tenant: Tenant, planted: Planted) -> dict[str, Any]:
    repo = await planted_ssh_repo(tenant, planted)
    async with tenant.client() as c:
        r = await c.post(
            "/api/tools/call",
            json={
                "workspace_id": WS,
                "tool": "workspace_git",
                "arguments": {"operation": "pull", "cwd": f"repos/{repo.name}"},
            },
        )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


NETWORK_PATHS: dict[str, Callable[[Tenant, Planted], Any]] = {
    "git_clone": network_git_clone,
    "git_pull": network_git_pull,
    "git_internal_fetch": lambda t, p: network_internal("fetch", t, p),
    "git_internal_pull": lambda t, p: network_internal("pull", t, p),
    "git_internal_push": lambda t, p: network_internal("push", t, p),
    "git_internal_clone": lambda t, p: network_internal("clone", t, p),
    "workspace_git": network_workspace_git,
}


@pytest.mark.parametrize("tenant", ["none"], indirect=True)
@pytest.mark.parametrize("path", list(NETWORK_PATHS))
async def test_tenant_git_config_never_meets_the_network(tenant: Tenant, path: str) -> None:
    """A core.sshCommand the tenant put in the task's global git config or in the
    repository's .git/config never runs when the daemon's git goes to the network (I3)."""
    planted = Planted(tenant)
    result = await NETWORK_PATHS[path](tenant, planted)
    traces = planted.ran(result)
    assert not traces, f"the tenant's sshCommand ran: {traces}; result: {outcome(result)}"
