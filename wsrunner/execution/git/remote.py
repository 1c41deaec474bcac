"""The only git that meets the network: a daemon-owned bare mirror per workspace and remote.

A tenant controls everything git reads in its workspace: the task's global config, `~/.ssh`,
each repository's `.git/config` (`core.sshCommand`, `credential.helper`, `url.*.insteadOf`...).
So no git that reads them ever gets a network or a token (I3). The network side is here, on
mirrors outside the workspace (`wsrunner.execution.git.mirror`); the workspace side of each operation
(`wsrunner.execution.git.sync`) runs with no network.

A mirror sandbox runs as the workspace's uid with the workspace's mirrors bound read-write and
the operation's files read-only, never the workspace; its argv, environment and configuration
are the daemon's (GIT_CONFIG_NOSYSTEM, GIT_CONFIG_GLOBAL, HOME, ssh `-F /dev/null`,
GIT_ALLOW_PROTOCOL). The token is in the environment of that one sandbox only. The one
workspace path it may see is a repository's git directory, read-only and without network, for
the local fetch before a push: git's upload-pack serves it, which by design runs nothing from
the repository it serves.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import unquote, urlsplit

import trio

from wsrunner.errors import ConfigError, IsolationUnavailableError, WorkspaceError
from wsrunner.execution.git.credentials import GitCredentialProvider
from wsrunner.execution.git.mirror import (
    MIRRORS_DIR,
    Mirror,
    gitconfig,
    make_operation,
    open_mirror,
    remove_operation,
)
from wsrunner.execution.process import Capture, run_process
from wsrunner.execution.sandbox import Sandbox
from wsrunner.models import JSON
from wsrunner.payload import redact_url
from wsrunner.settings import Settings
from wsrunner.workspace.directories import SAFE_PATH, Workspaces
from wsrunner.workspace.usage import disk_usage

if TYPE_CHECKING:
    from wsrunner.execution.steps import StepContext

#: Keeps a repository's own .git/config and hooks from running programs in daemon git calls.
GIT_SAFE_CONFIG: Final = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.pager=cat",
    "-c",
    "diff.external=",
    "-c",
    "protocol.ext.allow=never",
)
_MIRROR_FLAGS: Final = ("-c", "core.hooksPath=/dev/null", "-c", "protocol.ext.allow=never")
_PROTOCOLS: Final = ("https", "http", "ssh", "git", "file")
_SCP_LIKE: Final = re.compile(r"[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/].*")
_QUOTA_POLL_S: Final = 0.5
History = Literal["shallow", "full", "keep"]


@dataclass(frozen=True, slots=True)
class Remote:
    """A remote as the daemon's git sees it: a URL without secrets, and the secret apart."""

    url: str  #: what git is given and what is stored; never holds a token
    local: str | None = None  #: the host path of a file:// remote (bound read-only)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


def check_url(url: str, schemes: Sequence[str]) -> str:
    """The URL's scheme if `schemes` allow it, else a WorkspaceError naming `repo`."""
    if _SCP_LIKE.fullmatch(url):
        scheme = "ssh"
    else:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if not scheme or "::" in url.split("/", 1)[0] or any(c in url for c in "\0\n\r"):
            raise WorkspaceError(
                f"repo: expected a URL like https://host/owner/name.git, got {redact_url(url)!r}"
            )
    if scheme not in schemes:
        raise WorkspaceError(
            f"repo: URL scheme {scheme!r} is not allowed; expected one of {', '.join(schemes)}"
        )
    return scheme


class GitRemote:
    """Runs git against remotes, only on the daemon's mirrors, in sandboxes of their own."""

    def __init__(
        self,
        settings: Settings,
        workspaces: Workspaces,
        sandbox: Sandbox,
        credentials: GitCredentialProvider,
        describe: Callable[..., JSON],
    ) -> None:
        self.settings = settings
        self.workspaces = workspaces
        self.sandbox = sandbox
        self.credentials = credentials
        self.describe = describe  #: a command's result from its capture (`Executor.describe`)
        self.base = os.path.join(str(settings.volume_path), MIRRORS_DIR)
        self.protocols = ":".join(s for s in settings.git_schemes if s in _PROTOCOLS)
        self._fs = trio.CapacityLimiter(4)
        self._locks: dict[str, tuple[trio.Lock, list[int]]] = {}  #: mirror: (lock, users)

    async def remote(self, url: str, workspace_id: str) -> Remote:
        """`url` checked against the allowed schemes, with its credential set apart: the
        URL's own (a producer of the reference system) or the workspace's for its host."""
        scheme = check_url(url, self.settings.git_schemes)
        if scheme not in ("http", "https", "file"):
            return Remote(url)  # ssh's user@ is a user name, not a secret
        parts = urlsplit(url)
        clean = redact_url(url)
        if scheme == "file":
            if parts.hostname not in (None, "", "localhost") or not parts.path.startswith("/"):
                raise WorkspaceError(
                    f"repo: a file:// URL must name an absolute local path, got {clean!r}"
                )
            return Remote(clean, local=_local_path(parts.path))
        if parts.username or parts.password:
            user, password = parts.username or "x-access-token", parts.password or ""
            if parts.password is None:  # https://TOKEN@host: the token is the user part
                user, password = "x-access-token", parts.username or ""
            return Remote(clean, username=unquote(user), password=unquote(password))
        try:
            token = await self.credentials.token_for(workspace_id, parts.netloc.lower())
        except ConfigError as exc:
            raise WorkspaceError(f"cannot read git credentials: {exc}") from None
        if token is None:
            return Remote(clean)
        return Remote(clean, username="x-access-token", password=token)

    @asynccontextmanager
    async def _exclusive(self, path: str) -> AsyncIterator[None]:
        """One operation at a time on a mirror, in this daemon (concurrent fetches into one
        repository fail on each other's ref locks); forgotten when nobody uses it."""
        lock, users = self._locks.setdefault(path, (trio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[path]

    # --- what the workspace side calls ---------------------------------------------------

    async def fetch(
        self,
        ctx: StepContext,
        remote: Remote,
        *,
        branches: Sequence[str] | None,
        tags: bool = False,
        history: History = "keep",
        timeout: float,
    ) -> tuple[Mirror, JSON]:
        """Bring `branches` (None: all; empty: the remote's default, whose name is returned
        in the result's `branch`) of `remote` into the workspace's mirror of it.

        `history`: "shallow" fetches new branches one commit deep (a mirror with full history
        stays full), "full" deepens a shallow mirror, "keep" fetches what connects.
        """
        deadline = trio.current_time() + timeout
        mirror = await self._open(ctx, remote)
        async with self._exclusive(mirror.path):
            found = None
            if branches is not None and not branches:
                found = await self._run(
                    ctx,
                    mirror,
                    remote,
                    ["-C", mirror.path, "ls-remote", "--symref", "--", remote.url, "HEAD"],
                    network=True,
                    timeout=max(1.0, deadline - trio.current_time()),
                )
                if "error" in found:
                    return mirror, found
                head = re.search(r"^ref: refs/heads/(\S+)\tHEAD$", found["stdout"], re.M)
                if head is None:  # an empty repository: nothing to fetch
                    return mirror, dict(found, stdout="", branch=None)
                branches = [head.group(1)]
            argv = ["-C", mirror.path, "fetch", "--quiet", "--no-write-fetch-head"]
            if history == "shallow" and mirror.shallow:
                argv += ["--depth", "1"]
            elif history == "shallow" and mirror.fresh:
                argv += ["--depth", "1"]  # a new mirror; one with history never becomes shallow
            elif history == "full" and mirror.shallow:
                argv.append("--unshallow")
            refspecs = (
                ["+refs/heads/*:refs/heads/*"]
                if branches is None
                else [f"+refs/heads/{b}:refs/heads/{b}" for b in branches]
            )
            if tags:
                refspecs.append("+refs/tags/*:refs/tags/*")
            result = await self._run(
                ctx,
                mirror,
                remote,
                [*argv, "--", remote.url, *refspecs],
                network=True,
                timeout=max(1.0, deadline - trio.current_time()),
            )
            if branches and len(branches) == 1 and "couldn't find remote ref" in result["stderr"]:
                # `git clone --branch` takes a tag too
                tag = f"+refs/tags/{branches[0]}:refs/tags/{branches[0]}"
                result = await self._run(
                    ctx,
                    mirror,
                    remote,
                    [*argv, "--", remote.url, tag],
                    network=True,
                    timeout=max(1.0, deadline - trio.current_time()),
                )
        if found is not None:
            result = combine(found, result)
            result["stdout"] = ""  # ls-remote's listing is the daemon's business
            result["branch"] = branches[0] if branches else None
        return mirror, result

    async def push(
        self,
        ctx: StepContext,
        remote: Remote,
        git_dir: str,
        objects: Sequence[str],
        refspecs: Sequence[str],
        options: Sequence[str],
        timeout: float,
    ) -> JSON:
        """Copy `objects` (ids) from the workspace's repository at `git_dir` into the mirror
        (no network), then push `refspecs` from there to `remote`; in each refspec, `{i}`
        stands for the i-th object."""
        deadline = trio.current_time() + timeout
        mirror = await self._open(ctx, remote)
        async with self._exclusive(mirror.path):
            names = [f"refs/wsrunner/push/{i}" for i in range(len(objects))]
            taken: JSON = {}
            if objects:
                wanted = [f"+{oid}:{name}" for oid, name in zip(objects, names, strict=True)]
                taken = await self._run(
                    ctx,
                    mirror,
                    remote,
                    [
                        "-C",
                        mirror.path,
                        "fetch",
                        "--quiet",
                        "--no-tags",
                        "--no-write-fetch-head",
                        "--",
                        git_dir,
                        *wanted,
                    ],
                    network=False,
                    timeout=max(1.0, deadline - trio.current_time()),
                    local=(git_dir,),
                )
                if "error" in taken:
                    return taken
            specs = [s.format(*names) for s in refspecs]
            pushed = await self._run(
                ctx,
                mirror,
                remote,
                ["-C", mirror.path, "push", *options, "--", remote.url, *specs],
                network=True,
                timeout=max(1.0, deadline - trio.current_time()),
            )
        return combine(taken, pushed) if taken else pushed

    # --- directories ------------------------------------------------------------------------

    async def _fs_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._fs)

    async def _open(self, ctx: StepContext, remote: Remote) -> Mirror:
        """The mirror of `remote` for the context's workspace (made, or repaired)."""
        mirror: Mirror = await self._fs_call(
            open_mirror, self.base, ctx.workspace_id, remote.url, ctx.env.root
        )
        return mirror

    @asynccontextmanager
    async def _operation(
        self, ctx: StepContext, *, network: bool, trust: tuple[str, ...]
    ) -> AsyncIterator[str]:
        """A fresh directory of the daemon's files for one git run; removed after it."""
        key = ctx.env.ssh_key if network else None
        made = partial(
            make_operation,
            self.base,
            ctx.workspace_id,
            ctx.env.root,
            config=gitconfig(trust),
            ssh_key=key,
        )
        op: str = await self._fs_call(made)
        try:
            yield op
        finally:
            with trio.CancelScope(shield=True):
                await self._fs_call(remove_operation, op)

    # --- one git run ------------------------------------------------------------------------

    async def _run(
        self,
        ctx: StepContext,
        mirror: Mirror,
        remote: Remote,
        args: list[str],
        *,
        network: bool,
        timeout: float,
        local: Sequence[str] = (),
    ) -> JSON:
        """Run `git <args>` in the mirror sandbox: with the policy's git network and the
        remote's credentials if `network`, else none; `local` are host paths it may read."""
        policy = ctx.policy
        visible = (*local, *([remote.local] if remote.local else []))
        quota = self.workspaces.quota(ctx.workspace_id)
        limits = replace(policy.limits, file_size_bytes=min(policy.limits.file_size_bytes, quota))
        ctx.capture = capture = Capture.capped(
            limits.stdout_bytes, limits.stderr_bytes, ctx.on_output
        )
        start = time.monotonic()
        over: list[int] = []
        try:
            async with self._operation(ctx, network=network, trust=visible) as op:
                env = self._env(
                    op, mirror, remote, network=network, key=bool(network and ctx.env.ssh_key)
                )
                async with self.sandbox.launch(
                    ["git", *_MIRROR_FLAGS, *args],
                    root=mirror.data,
                    cwd=mirror.data,
                    policy=policy.sandbox,
                    limits=limits,
                    env=env,
                    network=policy.sandbox.git_network if network else "none",
                    read_only=(op, *visible),
                    home=os.path.join(op, "home"),
                ) as launch:
                    with trio.move_on_after(timeout) as scope:
                        rc = await run_process(
                            launch.argv,
                            env=launch.env,
                            capture=capture,
                            pass_fds=launch.pass_fds,
                            kill_grace=self.settings.kill_grace_s,
                            watch=self._quota_watch(mirror.data, quota, over),
                            watch_after=_QUOTA_POLL_S,
                        )
        except IsolationUnavailableError as exc:
            return {"error": str(exc), "isolation_unavailable": exc.details}
        finally:
            ctx.capture = None
        stopped = scope.cancelled_caught or bool(over)
        result: JSON = self.describe(
            capture,
            exit_code=None if stopped else rc,
            duration_ms=int((time.monotonic() - start) * 1000),
        )
        if launch.network_failures:
            result["error"] = (
                f"the network for git could not be set up: {launch.network_failures[0]}"
            )
        elif over:
            result["limits_hit"] = ["quota"]
            result["error"] = (
                f"killed: the workspace's git mirrors grew to {over[0]} bytes, "
                f"over its storage quota of {quota} bytes"
            )
        elif scope.cancelled_caught:
            result["timed_out"] = True
            result["error"] = f"timed out after {timeout:g}s; its processes were killed"
        return result

    def _env(
        self, op: str, mirror: Mirror, remote: Remote, *, network: bool, key: bool
    ) -> dict[str, str]:
        """The whole environment of a mirror's git: nothing in it comes from the tenant."""
        ssh = [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            f"UserKnownHostsFile={os.path.join(mirror.data, 'known_hosts')}",
        ]
        if key:
            ssh += ["-i", os.path.join(op, "ssh_key")]
        env = {
            "PATH": SAFE_PATH,
            "HOME": os.path.join(op, "home"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.path.join(op, "gitconfig"),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ALLOW_PROTOCOL": self.protocols if network else "file",
            "GIT_SSH_COMMAND": shlex.join(ssh),
        }
        if network and remote.password is not None:
            env.update(
                GIT_ASKPASS=os.path.join(op, "askpass"),
                WSRUNNER_GIT_USERNAME=remote.username or "x-access-token",
                WSRUNNER_GIT_PASSWORD=remote.password,
            )
        return env

    def _quota_watch(self, data: str, quota: int, over: list[int]) -> Any:
        """Stops a mirror's git once the workspace's mirrors outgrow the workspace's quota."""

        async def watch() -> float | None:
            used = (await self._fs_call(disk_usage, data)).bytes
            if used > quota:
                over.append(used)
                return None
            return _QUOTA_POLL_S

        return watch


def combine(*parts: JSON) -> JSON:
    """One result from the results of consecutive git runs (the last failed one's error)."""
    out: JSON = dict(parts[-1])
    out["stdout"] = "".join(p.get("stdout", "") for p in parts)
    out["stderr"] = "".join(p.get("stderr", "") for p in parts)
    out["duration_ms"] = sum(int(p.get("duration_ms", 0)) for p in parts)
    out["truncated"] = any(p.get("truncated", False) for p in parts)
    return out


def _local_path(path: str) -> str:
    """The host path of a file:// URL's (percent-encoded) path."""
    return os.path.normpath(unquote(path))
