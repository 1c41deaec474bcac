"""Run one step of a task in its workspace and describe what happened.

A step never raises for an ordinary failure: a non-zero exit, a refused path, a missing repo, a
command the policy denies all come back as a result with an `error` key, in the reference
system's result shape. Only cancellation (the task's timeout, a cancel request, shutdown)
propagates, after the step's processes are dead; what the step printed until then stays
readable in `StepContext.capture`.

Every process, a command or git, runs in the sandbox (`wsrunner.execution.sandbox`) with the limits of the
policy the task started with (`StepContext.policy`); commands are first judged by that policy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from wsrunner.errors import IsolationUnavailableError, WorkspaceError
from wsrunner.execution.git.credentials import GitCredentialProvider, NoCredentials
from wsrunner.execution.git.remote import GitRemote
from wsrunner.execution.git.sync import GitSync
from wsrunner.execution.process import Capture, Watch
from wsrunner.execution.sandbox import EXIT_LAUNCH_FAILED, NetworkMode, Sandbox
from wsrunner.metrics import Metrics
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
from wsrunner.policy import EffectivePolicy, LivePolicy
from wsrunner.settings import Settings
from wsrunner.workspace import paths
from wsrunner.workspace.directories import TaskEnvironment, Workspaces
from wsrunner.workspace.protect import Protected, find_protected

logger = logging.getLogger(__name__)

CLONE_TIMEOUT_S: Final = 300.0
QUOTA_POLL_S: Final = 0.25  #: how often a running command's workspace is measured, at most
PULL_TIMEOUT_S: Final = 120.0
JUDGE_SHORT_TEXT: Final = 4096  #: longer commands are judged on the limiter of long ones


@dataclass(slots=True)
class StepContext:
    """Where a task's steps run, plus the live state of the step in progress."""

    env: TaskEnvironment
    workspace_id: str
    policy: EffectivePolicy  #: chosen when the task started; a reload does not change it
    on_output: Any = None  #: callable(stream, chunk) for live output events, or None
    capture: Capture | None = None  #: output of the command running now, if any
    repos_touched: list[str] = field(default_factory=list)


def _ms(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


class Executor:
    """Runs steps; stateless between steps apart from the settings it was built with."""

    def __init__(
        self,
        settings: Settings,
        workspaces: Workspaces,
        policy: LivePolicy,
        sandbox: Sandbox,
        credentials: GitCredentialProvider | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.workspaces = workspaces
        self.policy = policy
        self.sandbox = sandbox
        self.credentials = credentials or NoCredentials()
        self.metrics = metrics or Metrics()
        self._fs = trio.CapacityLimiter(8)
        #: Policy evaluation threads: short texts, and long ones on their own so that a flood of
        #: long commands queues behind itself, not in front of everyone's short ones.
        self._judging = (trio.CapacityLimiter(4), trio.CapacityLimiter(1))
        #: git that reaches a remote: the network half on the daemon's mirrors
        self.git = GitSync(
            GitRemote(settings, workspaces, sandbox, self.credentials, self.describe), self.spawn
        )

    def context(
        self,
        env: TaskEnvironment,
        workspace_id: str,
        on_output: Any = None,
        policy: EffectivePolicy | None = None,
    ) -> StepContext:
        """A step context under `policy` (default: the one in force now), kept for the task."""
        policy = policy or self.policy.for_workspace(workspace_id)
        return StepContext(env, workspace_id, policy, on_output)

    async def judge(
        self, policy: EffectivePolicy, command: str, *, task_id: str | None = None
    ) -> JSON | None:
        """None if `command` may run; else the failed step's result naming the deciding rule.

        In audit mode a denied command runs: the denial is logged and counted, and None returned.
        The policy reads the command in a worker thread (CPU work on tenant text: up to about
        0.2 s for 64 KB), unless it decided the same text before.

        Cancellation: waits for an evaluation under way (bounded by the reader's caps).
        """
        decision = policy.decided(command)
        if decision is None:
            limiter = self._judging[len(command) > JUDGE_SHORT_TEXT]
            decision = await trio.to_thread.run_sync(policy.evaluate, command, limiter=limiter)
        if decision.allowed:
            return None
        denial = decision.as_error()
        self.metrics.policy_denials.labels(mode=decision.mode, rule=str(denial["rule"])).inc()
        log = {
            "task_id": task_id,
            "workspace_id": policy.workspace,
            "rule": denial["rule"],
            "rule_source": denial["source"],
        }
        if decision.runs:
            logger.warning("policy audit: would deny: %s", denial["message"], extra=log)
            return None
        logger.info("policy denied: %s", denial["message"], extra=log)
        return {"error": f"denied by policy: {denial['message']}", "policy_denied": denial}

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
                    globs = ctx.policy.sandbox.protect
                    await self._fs_call(
                        lambda: paths.make_dirs(ctx.env.root, step.path, protect=globs)
                    )
                    result = {"created": True, "path": paths.clean_relative(step.path)}
        except WorkspaceError as exc:
            result = {"error": str(exc)}
        result.setdefault("duration_ms", _ms(start))
        return result

    async def _fs_call(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._fs)

    # --- processes ----------------------------------------------------------------------------

    async def spawn(
        self,
        argv: list[str],
        ctx: StepContext,
        *,
        cwd: str,
        timeout: float,
        extra_env: dict[str, str] | None = None,
        git: bool = False,
        network: bool | None = None,
        read_only: tuple[str, ...] = (),
        protect: Protected | None = None,
        warm: bool = False,
    ) -> JSON:
        """Run `argv` in the workspace's sandbox; its result dict (`error` set if it failed).

        A command (`git` False) sees the policy's protected paths read-only and pinned
        (`wsrunner.workspace.protect`; `protect`, if the caller found them already) and its network
        setting; the daemon's own git operations (`git` True) get `gitNetwork` when `network`.
        `warm`: it may start in the workspace's warm sandbox (`Sandbox.launch`).
        """
        policy = ctx.policy
        limits = policy.limits
        ctx.capture = capture = Capture.capped(
            limits.stdout_bytes, limits.stderr_bytes, ctx.on_output
        )
        start = time.monotonic()
        env = dict(ctx.env.env, **(extra_env or {}))
        used = await self.workspaces.usage(ctx.workspace_id)
        quota = self.workspaces.quota(ctx.workspace_id)
        room = quota - used.bytes
        if (full := self.workspaces.full(ctx.workspace_id, used)) is not None:
            ctx.capture = None
            return {"error": f"{full}; nothing runs until files are deleted"}
        # No single file may outgrow what is left of the workspace's quota.
        limits = dataclasses.replace(
            limits, file_size_bytes=max(4096, min(limits.file_size_bytes, room))
        )
        net: NetworkMode
        if git:
            net = policy.sandbox.git_network if network else "none"
            protect = Protected()
        else:
            net = policy.sandbox.network
            if protect is None:
                protect = await self._fs_call(find_protected, ctx.env.root, policy.sandbox.protect)
        timeout = min(timeout, limits.timeout_s)
        try:
            async with self.sandbox.launch(
                argv,
                root=ctx.env.root,
                cwd=cwd,
                policy=policy.sandbox,
                limits=limits,
                network=net,
                env=env,
                protect=protect.read_only,
                read_only=read_only,
                home=env.get("HOME", "/"),
                pinned=protect.pinned,
                warm=warm and not git,
            ) as launch:
                over: list[str] = []
                with trio.move_on_after(timeout) as scope:
                    rc = await launch.run(
                        capture=capture,
                        kill_grace=self.settings.kill_grace_s,
                        watch=self._quota_watch(ctx.workspace_id, over),
                        watch_after=QUOTA_POLL_S,
                    )
        except IsolationUnavailableError as exc:
            ctx.capture = None
            self.metrics.sandbox_refusals.inc()
            return {"error": str(exc), "isolation_unavailable": exc.details}
        ctx.capture = None
        stopped = scope.cancelled_caught or bool(over)
        result = self.describe(capture, exit_code=None if stopped else rc, duration_ms=_ms(start))
        if launch.network_failures:
            result["error"] = (
                "the sandbox's network could not be set up, so the command did "
                f"not run: {launch.network_failures[0]}"
            )
        elif launch.sandbox_failures:
            result["error"] = f"the workspace's sandbox failed: {launch.sandbox_failures[0]}"
        elif over:
            result["limits_hit"] = ["quota" if "storage" in over[0] else "inode_quota"]
            result["error"] = f"killed: {over[0]}"
        elif scope.cancelled_caught:
            result["timed_out"] = True
            result["error"] = f"timed out after {timeout:g}s; its processes were killed"
        else:
            _explain_limits(result, rc, launch.limits_hit, limits)
        return result

    def _quota_watch(self, workspace_id: str, over: list[str]) -> Watch:
        """A `run_process` watch that stops a command once its workspace exceeds its storage
        or inode quota (what it exceeds, as a sentence, goes into `over`).

        The disk is walked at most every QUOTA_POLL_S, and never more than a fifth of the time:
        a command writing fast overshoots by what it writes in one interval.
        """

        async def watch() -> float | None:
            began = trio.current_time()
            used = await self.workspaces.usage(workspace_id, fresh=True)
            if (exceeded := self.workspaces.exceeded(workspace_id, used)) is not None:
                over.append(exceeded)
                return None
            return max(QUOTA_POLL_S, 4 * (trio.current_time() - began))

        return watch

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
        task_id = os.path.basename(ctx.env.task_dir)
        if (denied := await self.judge(ctx.policy, step.command, task_id=task_id)) is not None:
            return denied
        root, globs = ctx.env.root, ctx.policy.sandbox.protect
        if self.sandbox.isolation.level != "full":
            globs = ()  # nothing binds protected paths read-only without bubblewrap
        if paths.clean_relative(step.cwd) == "." and not globs:
            cwd, protect = root, Protected()  # nothing to look up on disk: no worker thread
        else:
            cwd, protect = await self._fs_call(
                lambda: (paths.real_dir(root, step.cwd), find_protected(root, globs))
            )
        return await self.spawn(
            ["/bin/sh", "-c", step.command],
            ctx,
            cwd=cwd,
            timeout=timeout,
            protect=protect,
            warm=True,
        )

    # --- git ----------------------------------------------------------------------------------
    # The network half runs on the daemon's mirror, the rest with no network (`gitsync`).

    @staticmethod
    def repo_name(url: str) -> str:
        """Directory name under repos/ for `url`: its last path segment without `.git`."""
        tail = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", tail.removesuffix(".git")).lstrip(".-")
        if not name:
            raise WorkspaceError(f"repo: cannot derive a directory name from {redact_url(url)!r}")
        return name

    async def _clone(self, step: GitClone, ctx: StepContext, timeout: float) -> JSON:
        remote = await self.git.remote.remote(step.repo, ctx.workspace_id)
        name = self.repo_name(step.repo)
        dest = os.path.join(ctx.env.root, "repos", name)
        if await self._fs_call(paths.is_dir, ctx.env.root, f"repos/{name}"):
            origin, _ = await self.git.origin(ctx, dest)
            if origin != remote.url:
                return {
                    "error": f"repos/{name} already holds another repository "
                    f"({origin or 'unknown remote'}); "
                    "refusing to reuse it",
                    "repo_path": f"repos/{name}",
                }
            result = await self.git.pull(
                ctx, dest, branch=step.branch, timeout=timeout, remote=remote
            )
            result.update(repo_path=f"repos/{name}", cached=True)
            return result
        result = await self.git.clone(
            ctx, remote, dest, branch=step.branch, shallow=step.shallow, timeout=timeout
        )
        result.update(repo_path=f"repos/{name}", cached=False)
        if "error" not in result:
            ctx.repos_touched.append(name)
        return result

    async def _pull(self, step: GitPull, ctx: StepContext, timeout: float) -> JSON:
        dest = os.path.join(ctx.env.root, "repos", step.repo_name)
        if not await self._fs_call(paths.is_dir, ctx.env.root, f"repos/{step.repo_name}/.git"):
            return {"error": f"Repo not cached: {step.repo_name}. Clone it first."}
        result = await self.git.pull(ctx, dest, branch=step.branch, timeout=timeout)
        result.update(repo_path=f"repos/{step.repo_name}", cached=True)
        return result

    # --- files --------------------------------------------------------------------------------

    async def _read(self, step: ReadFile, ctx: StepContext) -> JSON:
        got = await self._fs_call(
            paths.read_text, ctx.env.root, step.path, self.settings.read_cap_bytes
        )
        return {
            "path": paths.clean_relative(step.path),
            "content": got.content,
            "size_bytes": got.size_bytes,
            "truncated": got.truncated,
            "binary": got.binary,
        }

    async def _write(self, step: WriteFile, ctx: StepContext) -> JSON:
        """Write the file, unless that would pass a quota or the path is protected."""
        size = len(step.content.encode("utf-8"))
        used = await self.workspaces.usage(ctx.workspace_id, fresh=True)
        if (refusal := self.workspaces.refuse_write(ctx.workspace_id, used, size)) is not None:
            return {"error": refusal}
        globs = ctx.policy.sandbox.protect
        written = await self._fs_call(
            lambda: paths.write_text(ctx.env.root, step.path, step.content, protect=globs)
        )
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


_LIMIT_SIGNALS: Final = {signal.SIGXCPU: "cpu", signal.SIGXFSZ: "file_size"}


def _explain_limits(result: JSON, rc: int, hit: list[str], limits: Any) -> None:
    """Say which limit ended the command, instead of a bare exit status such as 137."""
    signum = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    reason = _LIMIT_SIGNALS.get(signum)  # type: ignore[call-overload]
    hit = list(hit) + ([reason] if reason and reason not in hit else [])
    if rc == EXIT_LAUNCH_FAILED and not result["stdout"]:
        result["error"] = (
            "the sandbox could not start the command: "
            + (result["stderr"].strip().splitlines() or ["unknown reason"])[-1]
        )
    if not hit:
        return
    result["limits_hit"] = hit
    words = {
        "memory": f"killed: the memory limit of {limits.memory_bytes // 2**20} MiB was reached",
        "pids": f"the limit of {limits.pids} processes was reached",
        "cpu": f"killed: the CPU time limit of {limits.cpu_s}s was reached",
        "file_size": f"killed: a file reached the size limit of {limits.file_size_bytes} bytes "
        "(the policy's fileSize, or what is left of the storage quota)",
    }
    if rc != 0:
        result["error"] = "; ".join(words[h] for h in hit) + f" (exit status {rc})"
    else:
        result["warning"] = "; ".join(words[h] for h in hit)
