"""Run one step of a task in its workspace and describe what happened.

A step never raises for an ordinary failure: a non-zero exit, a refused path, a missing repo all
come back as a result with an `error` key, in the reference system's result shape. Only
cancellation (the task's timeout, a cancel request, shutdown) propagates, after the step's
processes are dead; what the step printed until then stays readable in `StepContext.capture`.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import trio

from wsrunner import paths
from wsrunner.credentials import GitCredentialProvider, NoCredentials
from wsrunner.errors import ConfigError, WorkspaceError
from wsrunner.models import (
    JSON,
    CreateDirectory,
    ExecuteCommand,
    GitClone,
    GitPull,
    ListDirectory,
    ReadFile,
    Step,
    WriteFile,
)
from wsrunner.payload import redact_url
from wsrunner.process import Capture, run_process
from wsrunner.settings import Settings
from wsrunner.workspace import TaskEnvironment, Workspaces

CLONE_TIMEOUT_S: Final = 300.0
PULL_TIMEOUT_S: Final = 120.0
_SCP_LIKE: Final = re.compile(r"[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/].*")
_ASKPASS: Final = """#!/bin/sh
case "$1" in
  Username*) printf '%s\\n' "$WSRUNNER_GIT_USERNAME" ;;
  *) printf '%s\\n' "$WSRUNNER_GIT_PASSWORD" ;;
esac
"""


@dataclass(slots=True)
class StepContext:
    """Where a task's steps run, plus the live state of the step in progress."""

    env: TaskEnvironment
    workspace_id: str
    on_output: Any = None  #: callable(stream, chunk) for live output events, or None
    capture: Capture | None = None  #: output of the command running now, if any
    repos_touched: list[str] = field(default_factory=list)


def _ms(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


class Executor:
    """Runs steps; stateless between steps apart from the settings it was built with."""

    def __init__(self, settings: Settings, workspaces: Workspaces,
                 credentials: GitCredentialProvider | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.workspaces = workspaces
        self.credentials = credentials or NoCredentials()
        self._fs = trio.CapacityLimiter(8)

    async def run_step(self, step: Step, ctx: StepContext, *, budget_s: float) -> JSON:
        """Run `step`; returns its result dict (`error` set when it failed).

        `budget_s` bounds a command step on top of its own `timeout` (what is left of the task).
        Cancellation: propagates after the step's processes are terminated and reaped.
        """
        start = time.monotonic()
        try:
            match step:
                case ExecuteCommand():
                    result = await self._command(step, ctx, min(step.timeout, budget_s))
                case GitClone():
                    result = await self._clone(step, ctx, min(CLONE_TIMEOUT_S, budget_s))
                case GitPull():
                    result = await self._pull(step, ctx, min(PULL_TIMEOUT_S, budget_s))
                case ReadFile():
                    result = await self._read(step, ctx)
                case WriteFile():
                    result = await self._write(step, ctx)
                case ListDirectory():
                    result = await self._list(step, ctx)
                case CreateDirectory():
                    await self._fs_call(paths.make_dirs, ctx.env.root, step.path)
                    result = {"created": True, "path": paths.clean_relative(step.path)}
        except WorkspaceError as exc:
            result = {"error": str(exc)}
        result.setdefault("duration_ms", _ms(start))
        return result

    async def _fs_call(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._fs)

    # --- processes ----------------------------------------------------------------------------

    async def spawn(self, argv: list[str], ctx: StepContext, *, cwd: str, timeout: float,
                     extra_env: dict[str, str] | None = None) -> JSON:  # fmt: skip
        s = self.settings
        ctx.capture = capture = Capture.capped(
            s.stdout_cap_bytes, s.stderr_cap_bytes, ctx.on_output
        )
        start = time.monotonic()
        env = dict(ctx.env.env, **(extra_env or {}))
        with trio.move_on_after(timeout) as scope:
            rc = await run_process(
                argv, cwd=cwd, env=env, capture=capture, kill_grace=s.kill_grace_s
            )
        ctx.capture = None
        result = self.describe(capture, exit_code=None if scope.cancelled_caught else rc,
                               duration_ms=_ms(start))  # fmt: skip
        if scope.cancelled_caught:
            result["timed_out"] = True
            result["error"] = f"timed out after {timeout:g}s; its process group was killed"
        return result

    @staticmethod
    def describe(capture: Capture, *, exit_code: int | None, duration_ms: int) -> JSON:
        """The result dict of a command from its capture (also used for interrupted steps)."""
        result: JSON = {
            "exit_code": -1 if exit_code is None else exit_code,
            "stdout": capture.stdout.text(),
            "stderr": capture.stderr.text(),
            "duration_ms": duration_ms,
            "truncated": capture.stdout.truncated or capture.stderr.truncated,
        }
        if capture.stdout.truncated or capture.stderr.truncated:
            result["stdout_bytes"] = capture.stdout.total
            result["stderr_bytes"] = capture.stderr.total
        if exit_code is not None and exit_code < 0:
            name = signal.Signals(-exit_code).name
            result["signal"] = name
            result["error"] = f"killed by {name}"
        elif exit_code:
            result["error"] = f"exit code {exit_code}"
        if capture.pipes_held_open:
            result["warning"] = "a process that left the step's process group kept its output open"
        return result

    async def _command(self, step: ExecuteCommand, ctx: StepContext, timeout: float) -> JSON:
        cwd = await self._fs_call(paths.real_dir, ctx.env.root, step.cwd)
        return await self.spawn(["/bin/sh", "-c", step.command], ctx, cwd=cwd, timeout=timeout)

    # --- git ----------------------------------------------------------------------------------

    def _check_repo_url(self, url: str) -> str:
        """The URL's scheme if the settings allow it, else a WorkspaceError."""
        if _SCP_LIKE.fullmatch(url):
            scheme = "ssh"
        else:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if not scheme or "::" in url.split("/", 1)[0]:
                raise WorkspaceError(
                    f"repo: expected a URL like https://host/owner/name.git, got {redact_url(url)!r}"
                )
        if scheme not in self.settings.git_schemes:
            raise WorkspaceError(
                f"repo: URL scheme {scheme!r} is not allowed; expected one of "
                f"{', '.join(self.settings.git_schemes)}"
            )
        return scheme

    @staticmethod
    def repo_name(url: str) -> str:
        """Directory name under repos/ for `url`: its last path segment without `.git`."""
        tail = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", tail.removesuffix(".git")).lstrip(".-")
        if not name:
            raise WorkspaceError(f"repo: cannot derive a directory name from {redact_url(url)!r}")
        return name

    async def _clone(self, step: GitClone, ctx: StepContext, timeout: float) -> JSON:
        self._check_repo_url(step.repo)
        name = self.repo_name(step.repo)
        dest = os.path.join(ctx.env.root, "repos", name)
        clean_url, extra_env = await self._clone_auth(step.repo, ctx)
        if await self._fs_call(os.path.isdir, dest):
            origin = await self.spawn(["git", "-C", dest, "remote", "get-url", "origin"], ctx,
                                       cwd=ctx.env.root, timeout=30)  # fmt: skip
            if origin["stdout"].strip() != clean_url:
                return {"error": f"repos/{name} already holds another repository "
                                 f"({origin['stdout'].strip() or 'unknown remote'}); "
                                 "refusing to reuse it", "repo_path": f"repos/{name}"}  # fmt: skip
            result = await self._git_pull(dest, step.branch, ctx, timeout, extra_env)
            result.update(repo_path=f"repos/{name}", cached=True)
            return result
        argv = ["git", "clone", "--no-recurse-submodules"]
        if step.shallow:
            argv += ["--depth", "1"]
        if step.branch:
            argv += ["--branch", step.branch]
        argv += ["--", clean_url, dest]
        result = await self.spawn(argv, ctx, cwd=ctx.env.root, timeout=timeout, extra_env=extra_env)
        result.update(repo_path=f"repos/{name}", cached=False)
        if "error" not in result:
            ctx.repos_touched.append(name)
        return result

    async def _clone_auth(self, url: str, ctx: StepContext) -> tuple[str, dict[str, str]]:
        """The URL to give git and the environment that answers its password prompt.

        Keeps a token off the command line (ps), out of .git/config and of any output: git
        asks our askpass helper, which reads it from the child's environment. The token is
        the URL's own (a producer of the reference system) or the workspace's credential.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return url, {}
        if parts.username or parts.password:
            user, password = parts.username or "x-access-token", parts.password or ""
            if parts.password is None:  # https://TOKEN@host: the token is the user part
                user, password = "x-access-token", parts.username or ""
            url = redact_url(url)
        else:
            try:
                token = await self.credentials.token_for(ctx.workspace_id, parts.netloc.lower())
            except ConfigError as exc:
                raise WorkspaceError(f"cannot read git credentials: {exc}") from None
            if token is None:
                return url, {}
            user, password = "x-access-token", token
        askpass = os.path.join(ctx.env.task_dir, "askpass")
        await self._fs_call(_write_executable, askpass, _ASKPASS)
        return url, {"GIT_ASKPASS": askpass, "WSRUNNER_GIT_USERNAME": user,
                     "WSRUNNER_GIT_PASSWORD": password}  # fmt: skip

    async def _git_pull(self, repo: str, branch: str | None, ctx: StepContext, timeout: float,
                        extra_env: dict[str, str] | None = None) -> JSON:  # fmt: skip
        deadline = trio.current_time() + timeout
        if branch:
            checkout = await self.spawn(["git", "-C", repo, "checkout", branch, "--"], ctx,
                                         cwd=ctx.env.root, timeout=timeout)  # fmt: skip
            if "error" in checkout:
                return checkout
        left = max(1.0, deadline - trio.current_time())
        return await self.spawn(["git", "-C", repo, "pull", "--no-rebase"], ctx,
                                 cwd=ctx.env.root, timeout=left, extra_env=extra_env)  # fmt: skip

    async def _pull(self, step: GitPull, ctx: StepContext, timeout: float) -> JSON:
        dest = os.path.join(ctx.env.root, "repos", step.repo_name)
        if not await self._fs_call(os.path.isdir, os.path.join(dest, ".git")):
            return {"error": f"Repo not cached: {step.repo_name}. Clone it first."}
        origin = await self.spawn(["git", "-C", dest, "remote", "get-url", "origin"], ctx,
                                  cwd=ctx.env.root, timeout=30)  # fmt: skip
        # The workspace's token for the origin's host, as for the clone.
        _, extra_env = await self._clone_auth(origin["stdout"].strip(), ctx)
        result = await self._git_pull(dest, step.branch, ctx, timeout, extra_env)
        result.update(repo_path=f"repos/{step.repo_name}", cached=True)
        return result

    # --- files --------------------------------------------------------------------------------

    async def _read(self, step: ReadFile, ctx: StepContext) -> JSON:
        got = await self._fs_call(
            paths.read_text, ctx.env.root, step.path, self.settings.read_cap_bytes
        )
        return {"path": paths.clean_relative(step.path), "content": got.content,
                "size_bytes": got.size_bytes, "truncated": got.truncated, "binary": got.binary}  # fmt: skip

    async def _write(self, step: WriteFile, ctx: StepContext) -> JSON:
        size = len(step.content.encode("utf-8"))
        used = await self.workspaces.usage(ctx.workspace_id, fresh=True)
        quota = self.workspaces.quota(ctx.workspace_id)
        if used + size > quota:
            return {"error": f"writing {size} bytes would exceed the workspace's storage quota "
                             f"({used} of {quota} bytes used)"}  # fmt: skip
        written = await self._fs_call(paths.write_text, ctx.env.root, step.path, step.content)
        return {"written": True, "path": paths.clean_relative(step.path), "size_bytes": written}

    async def _list(self, step: ListDirectory, ctx: StepContext) -> JSON:
        entries, truncated = await self._fs_call(
            paths.list_dir, ctx.env.root, step.path, self.settings.list_cap_entries
        )
        return {
            "path": paths.clean_relative(step.path),
            "entries": [
                {"name": e.name, "type": e.type, "size": e.size, "modified_at": e.modified_at}
                for e in entries
            ],
            "count": len(entries),
            "truncated": truncated,
        }


def _write_executable(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o700)
    with os.fdopen(fd, "w") as f:
        f.write(text)
