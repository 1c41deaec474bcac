"""The isolation invariants (docs/security.md), checked from inside every process the daemon
starts for a tenant, by one shared probe.

A tenant gets a process started on each of the daemon's PATHS below; a new way of starting a
process joins PATHS. On each, the same probe (PROBE, a Python script in the workspace) reports:
its descriptors (I1: 0, 1 and 2 only), its exact environment (I2: the task environment and
nothing of the daemon's, no OLDPWD, no git token), its uid, capabilities, no_new_privs and
seccomp mode (I8), and whether it reached listeners the test opens on the host (I4), in the
default network mode (`none`) and in `egress`. Where the daemon runs git, the probe is what git
itself starts on the workspace's side (a filter, hook or upload-pack the tenant planted); ripgrep
starts nothing, so its process is inspected from the host while it runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from httpx_sse import aconnect_sse

from tests.conftest import (
    DATABASE_URL,
    INTERNAL_TOKEN,
    REDIS_URL,
    host_pids,
    traversable,
    unique_seconds,
    wait_for,
)
from tests.reliability.conftest import Daemon as ReliabilityDaemon
from tests.reliability.conftest import Deployment
from wsrunner.daemon import Daemon

#: The probe. Arguments: tag=NAME, out=DIR (also write the report there), targets=H:P,...
#: (try to connect to each), and `filter` (be a git clean/smudge filter: pass stdin through).
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
    targets = [t for t in opts.get("targets", "").split(",") if t]
    try:  # the default route's gateway: where pasta maps the host's loopback by default
        with open("/proc/net/route") as f:
            for line in f.read().splitlines()[1:]:
                parts = line.split()
                if parts[1] == "00000000" and parts[2] != "00000000":
                    gw = ".".join(str(b) for b in bytes.fromhex(parts[2])[::-1])
                    targets += [gw + ":" + t.rsplit(":", 1)[1] for t in list(targets)]
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
        "cwd": os.getcwd(), "reached": reached, "refused": refused,
    }
    text = json.dumps(report)
    if "out" in opts:
        os.makedirs(opts["out"], exist_ok=True)
        name = "%s-%d-%d.json" % (opts.get("tag", "probe"), os.getpid(), time.time_ns())
        with open(os.path.join(opts["out"], name), "w") as f:
            f.write(text)
    if data is not None:
        sys.stdout.buffer.write(data)
    else:
        print("WSRPROBE " + text)

main()
"""

#: The task environment a command gets (wsrunner/workspace.py `open_task`), by name; values
#: that depend on the task are checked in `check_env`.
TASK_ENV = frozenset({
    "PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "WORKSPACE_ID", "TASK_ID",
    "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_NOSYSTEM",
    "GIT_TERMINAL_PROMPT", "GIT_EDITOR", "GIT_PAGER", "PAGER", "GIT_ALLOW_PROTOCOL",
})  # fmt: skip
#: What `/bin/sh -c` adds when it starts the probe.
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
EGRESS = """\
apiVersion: wsrunner/v1
kind: PolicyOverlay
metadata: {name: egress}
spec:
  sandbox: {network: egress, gitNetwork: egress}
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
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
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

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.public, timeout=90,
                                 headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip

    def internal_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.internal, timeout=90,
                                 headers={"X-Internal-Token": INTERNAL_TOKEN})  # fmt: skip

    def probe_command(self, tag: str, *extra: str) -> str:
        return " ".join(["python3", str(self.root / "probe.py"), f"tag={tag}",
                         f"targets={','.join(self.host.targets)}", *extra])  # fmt: skip

    async def submit(self, *steps: dict[str, Any]) -> dict[str, Any]:
        """Submit a task through the public API and wait for its end; its record."""
        async with self.client() as c:
            r = await c.post("/api/tasks/submit", json={"workspace_id": WS, "steps": list(steps)})
            assert r.status_code == 202, r.text
            task_id = r.json()["task_id"]

            async def ended() -> dict[str, Any] | None:
                body: dict[str, Any] = (await c.get(f"/api/tasks/{task_id}")).json()
                return body if body["status"] in ("completed", "failed", "timed_out") else None

            record: dict[str, Any] = await wait_for(ended, timeout=120, poll=0.1)
            return record


@pytest.fixture(name="tenant", params=["none", "egress"])
async def _tenant(
    request: pytest.FixtureRequest, start_daemon: Callable[..., Any], tmp_path: Path
) -> AsyncIterator[Tenant]:
    mode = request.param
    etc = tmp_path / "etc"
    (etc / "policy.d").mkdir(parents=True)
    (etc / "policy.yaml").write_text(POLICY)
    if mode == "egress":
        (etc / "policy.d" / "50-egress.yaml").write_text(EGRESS)
    host = Host()
    host.listen(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    host.listen(socket.AF_INET, "0.0.0.0", *_host_addresses())
    if socket.has_ipv6:
        try:
            host.listen(socket.AF_INET6, "::1", "[::1]")
        except OSError:
            pass  # no IPv6 loopback on this host
    daemon: Daemon = await start_daemon(
        frontend="frontend", public_host="127.0.0.1", public_port=0, health_port=0,
        internal_token=INTERNAL_TOKEN, sse_keepalive_s=0.5, policy_file=etc / "policy.yaml",
        policy_dir=etc / "policy.d", git_schemes=("https", "ssh", "file"),
    )  # fmt: skip
    _, token = await daemon.service.tokens.create("tenant", [WS])
    public, internal = daemon.urls
    root = daemon.settings.volume_path / WS
    tenant = Tenant(daemon, public, internal, token, host, mode, root)
    async with tenant.internal_client() as c:  # the operator puts the probe in place
        r = await c.post(f"/workspaces/{WS}/files/write", json={"path": "probe.py",
                                                                 "content": PROBE})  # fmt: skip
        assert r.status_code == 200, r.text
    try:
        yield tenant
    finally:
        host.close()


# --- the checks ---------------------------------------------------------------------------


def reports_in(text: str) -> list[dict[str, Any]]:
    return [json.loads(line.split(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("WSRPROBE ")]  # fmt: skip


def check_report(report: dict[str, Any], tenant: Tenant, *, extra_env: frozenset[str] = frozenset(),
                 task_id: str | None = None) -> list[str]:  # fmt: skip
    """Every invariant the report breaks, one line each (empty: it holds them all)."""
    broken: list[str] = []
    fds = report["fds"]
    if sorted(fds, key=int) != ["0", "1", "2"]:
        broken.append(f"I1: descriptors other than 0, 1, 2: {fds}")
    env = report["env"]
    expected = TASK_ENV | SHELL_ENV | extra_env
    if set(env) != expected:
        broken.append(f"I2: environment names: unexpected {sorted(set(env) - expected)}, "
                      f"missing {sorted(expected - set(env))}")  # fmt: skip
    tokens = sorted(k for k in env if k.startswith("WSRUNNER_"))
    if tokens:
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
        broken.append(f"I8: uid {report['uid']}/{report['euid']}, expected the workspace's "
                      f"{owner}")  # fmt: skip
    if report["reached"]:
        broken.append(f"I4: reached host listeners {report['reached']} (mode {tenant.mode})")
    return broken


def assert_holds(reports: list[dict[str, Any]], tenant: Tenant, **kw: Any) -> None:
    assert reports, "the probe did not run"
    broken = {r.get("tag") or "?": check_report(r, tenant, **kw) for r in reports}
    assert not any(broken.values()), json.dumps(broken, indent=1)
    assert tenant.host.accepted() == 0, "a connection reached a host listener"


# --- the paths ------------------------------------------------------------------------------


async def via_execute_command(tenant: Tenant) -> None:
    record = await tenant.submit({"action": "execute_command",
                                  "command": tenant.probe_command("execute_command")})  # fmt: skip
    result = record["result"]["result"]["steps"][0]["result"]
    assert_holds(reports_in(result["stdout"]), tenant, task_id=record["id"])


async def via_exec(tenant: Tenant) -> None:
    async with tenant.internal_client() as c:
        r = await c.post(f"/workspaces/{WS}/exec", json={"command": tenant.probe_command("exec")})
    assert r.status_code == 200, r.text
    assert_holds(reports_in(r.json()["stdout"]), tenant)


async def via_exec_stream(tenant: Tenant) -> None:
    async with tenant.internal_client() as c:
        body = {"command": tenant.probe_command("exec_stream")}
        events = []
        async with aconnect_sse(c, "POST", f"/workspaces/{WS}/exec/stream", json=body) as source:
            async for ev in source.aiter_sse():
                events.append((ev.event, json.loads(ev.data)))
    assert events and events[-1][0] == "exit", events
    assert_holds(reports_in(events[-1][1]["stdout"]), tenant)


async def via_workspace_exec(tenant: Tenant) -> None:
    async with tenant.client() as c:
        r = await c.post("/api/tools/call", json={
            "workspace_id": WS, "tool": "workspace_exec",
            "arguments": {"command": tenant.probe_command("workspace_exec")}})  # fmt: skip
    assert r.status_code == 200, r.text
    assert_holds(reports_in(r.json()["result"]["stdout"]), tenant)


def inspect_from_host(token: str, program: str, deadline: float) -> dict[str, Any] | None:
    """Find a live process running `program` with `token` among its arguments, stop it, read
    what the probe would report about it from /proc, and let it go on; None if none showed up
    before `deadline` (time.monotonic()). Runs in a thread: it polls /proc."""
    want = token.encode()
    while time.monotonic() < deadline:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if os.path.basename(args[0]) != program.encode() or want not in args:
                continue
            pid = int(entry.name)
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            try:
                return _proc_report(pid)
            except OSError:
                continue  # it ended before it stopped
            finally:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        time.sleep(0.001)
    return None


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
    return {
        "tag": f"pid {pid}", "fds": fds, "env": env, "uid": uid, "euid": euid,
        "status": {k: status.get(k) for k in ("Seccomp", "NoNewPrivs", "CapInh", "CapPrm",
                                              "CapEff", "CapBnd", "CapAmb")},
        "netns": os.readlink(f"/proc/{pid}/ns/net"), "reached": [],
    }  # fmt: skip


#: What ripgrep runs with (operations.py `grep`): no task environment.
GREP_ENV = frozenset({"PATH", "LANG"})


async def via_grep(tenant: Tenant) -> None:
    """ripgrep runs no program of the tenant's: its process is inspected from the host while
    it runs (kept running by a search with megabytes of matches), for descriptors (besides
    files of the workspace it is reading), environment, identity, seccomp, and a network
    namespace of its own. What cannot be probed this way: its connections (it makes none)."""
    token = f"needle{uuid.uuid4().hex}"
    line = f"{token} " + "x" * 100 + "\n"
    async with tenant.internal_client() as c:
        for i in range(8):
            r = await c.post(f"/workspaces/{WS}/files/write",
                             json={"path": f"hay/{i}.txt", "content": line * 20000})  # fmt: skip
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        async with trio.open_nursery() as nursery:
            seen: list[dict[str, Any] | None] = []

            async def look() -> None:
                seen.append(await trio.to_thread.run_sync(inspect_from_host, token, "rg", deadline))

            nursery.start_soon(look)
            r = await c.get(f"/workspaces/{WS}/files/grep", params={"pattern": token})
            assert r.status_code == 200 and r.json()["engine"] == "ripgrep", r.text
    report = seen[0]
    assert report is not None, "no ripgrep process was seen while the search ran"
    fds = {k: v for k, v in report["fds"].items() if not v.startswith(f"{tenant.root}/hay")}
    report["fds"] = fds
    broken = [b for b in check_report(report, tenant, extra_env=frozenset()) if "I2" not in b]
    env = report["env"]
    if set(env) != GREP_ENV:
        broken.append(f"I2: environment {sorted(env)}, expected {sorted(GREP_ENV)}")
    if report["netns"] == os.readlink("/proc/self/ns/net"):
        broken.append("I4: ripgrep runs in the host's network namespace")
    assert not broken, json.dumps(broken, indent=1)


PATHS: dict[str, Callable[[Tenant], Any]] = {
    "execute_command": via_execute_command,
    "exec": via_exec,
    "exec_stream": via_exec_stream,
    "workspace_exec": via_workspace_exec,
    "grep": via_grep,
}


@pytest.mark.parametrize("path", list(PATHS))
async def test_invariants_hold_on_every_path(tenant: Tenant, path: str) -> None:
    await PATHS[path](tenant)


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
            body = {"workspace_id": "ws-restart",
                    "steps": [{"action": "execute_command", "command": f"sleep {seconds}"}]}  # fmt: skip
            r = await c.post("/api/tasks/submit", json=body)
            assert r.status_code == 202, r.text
            task_id = r.json()["task_id"]
        await wait_for(lambda: host_pids(seconds), timeout=30)
        first.kill(signal.SIGKILL)
        await first.wait()
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
