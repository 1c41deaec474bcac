"""FakeWorkspaces and FakeExecutor: task directories and command steps played in trio time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from wsrunner.errors import (
    QuotaExceededError,
)
from wsrunner.models import (
    JSON,
    Credentials,
    ExecuteCommand,
    Step,
)
from wsrunner.workspace.directories import TaskEnvironment

# --- task directories and steps -----------------------------------------------------------------


class FakeWorkspaces:
    """Task directories as a set of (workspace, task) pairs: what `TaskRunner` asks of
    `wsrunner.workspace.directories.Workspaces`. `full` workspaces fail the quota check."""

    def __init__(self, volume: str = "/workspaces") -> None:
        self.volume = volume
        self.open: set[tuple[str, str]] = set()  #: task directories that exist now
        self.opened = 0  #: task directories made so far
        self.full: set[str] = set()  #: workspaces at their quota

    def root(self, workspace_id: str) -> str:
        return f"{self.volume}/{workspace_id}"

    async def check_quota(self, workspace_id: str) -> None:
        await trio.lowlevel.checkpoint()
        if workspace_id in self.full:
            raise QuotaExceededError(f"workspace {workspace_id} is at its storage quota")

    async def open_task(
        self,
        workspace_id: str,
        task_id: str,
        credentials: Credentials | None,
        *,
        clear_leftovers: bool = True,
    ) -> TaskEnvironment:
        """The task's directory; one already there is replaced, or with `clear_leftovers`
        false raises FileExistsError (it may be a running duplicate's)."""
        await trio.lowlevel.checkpoint()
        if (workspace_id, task_id) in self.open and not clear_leftovers:
            raise FileExistsError(f"tasks/{task_id} exists in workspace {workspace_id}")
        self.open.add((workspace_id, task_id))
        self.opened += 1
        root = self.root(workspace_id)
        return TaskEnvironment(
            root=root,
            task_dir=f"{root}/tasks/{task_id}",
            env={"WORKSPACE_ID": workspace_id, "TASK_ID": task_id},
        )

    async def close_task(self, workspace_id: str, task_id: str, *, count: bool) -> list[str]:
        """Remove the task's directory; the cached repositories (none here)."""
        await trio.lowlevel.checkpoint()
        self.open.discard((workspace_id, task_id))
        return []


@dataclass(slots=True)
class FakeCapture:
    """What the command running now has printed."""

    stdout: str = ""
    stderr: str = ""


@dataclass(slots=True)
class FakeStepContext:
    """Where a task's steps run (the part of `StepContext` the runner reads)."""

    env: TaskEnvironment
    workspace_id: str
    on_output: Callable[[str, bytes], bool] | None = None
    capture: FakeCapture | None = None  #: set while a command runs, kept if it is interrupted


class FakePolicy:
    """The one policy every workspace gets: the runner only logs its digest."""

    digest = "fake-policy"

    def for_workspace(self, workspace_id: str) -> FakePolicy:
        return self


@dataclass(slots=True)
class StepRun:
    """One step the FakeExecutor ran: when (trio time) and how it ended."""

    task_id: str
    command: str | None  #: None for a step that is not a command
    started_at: float
    ended_at: float | None = None
    outcome: str = "running"  #: "exit <n>", "timed out" or "interrupted" (cancelled)


class FakeExecutor:
    """Runs steps as `wsrunner.execution.steps.Executor` does, without processes.

    A command is `;`-separated words played in trio time: `sleep <s>`, `echo <text>` (a line of
    output), `exit <n>` (ends the command), `true`, `false`; its exit code is the last one's.
    The step's `timeout` (or what is left of the task's, if less) stops it as a timed-out,
    failed step; a cancellation (the task's timeout, a cancel request, a shutdown) propagates
    with what was printed kept in `ctx.capture`. Any other step succeeds at once.
    `runs` lists every step started; `peak` is the most that ran at once.
    """

    def __init__(self) -> None:
        self.policy = FakePolicy()
        self.runs: list[StepRun] = []
        self.active = 0  #: steps running now
        self.peak = 0

    def context(
        self,
        env: TaskEnvironment,
        workspace_id: str,
        on_output: Callable[[str, bytes], bool] | None = None,
        policy: FakePolicy | None = None,
    ) -> FakeStepContext:
        return FakeStepContext(env, workspace_id, on_output)

    async def run_step(self, step: Step, ctx: FakeStepContext, *, budget_s: float) -> JSON:
        command = step.command if isinstance(step, ExecuteCommand) else None
        run = StepRun(ctx.env.task_dir.rsplit("/", 1)[-1], command, trio.current_time())
        self.runs.append(run)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if not isinstance(step, ExecuteCommand):
                await trio.lowlevel.checkpoint()
                run.outcome = "exit 0"
                return {"duration_ms": 0}
            return await self._command(step, ctx, min(step.timeout, budget_s), run)
        finally:
            self.active -= 1
            if run.ended_at is None:
                run.ended_at, run.outcome = trio.current_time(), "interrupted"

    async def _command(
        self, step: ExecuteCommand, ctx: FakeStepContext, limit_s: float, run: StepRun
    ) -> JSON:
        ctx.capture = capture = FakeCapture()
        exit_code = 0
        with trio.move_on_after(limit_s) as limit:
            for part in filter(None, (p.strip() for p in step.command.split(";"))):
                word, _, arg = part.partition(" ")
                if word == "sleep":
                    await trio.sleep(float(arg))
                    exit_code = 0
                elif word == "echo":
                    self._print(ctx, capture, arg + "\n")
                    exit_code = 0
                elif word in ("true", "false"):
                    exit_code = int(word == "false")
                elif word == "exit":
                    exit_code = int(arg or 0)
                    break
                else:
                    raise ValueError(
                        f"FakeExecutor plays sleep, echo, exit, true and false; not {part!r}"
                    )
        ctx.capture = None
        run.ended_at = trio.current_time()
        duration_ms = int((run.ended_at - run.started_at) * 1000)
        if limit.cancelled_caught:
            run.outcome = "timed out"
            result = self.describe(capture, exit_code=None, duration_ms=duration_ms)
            result.update(
                timed_out=True, error=f"timed out after {limit_s:g}s; its processes were killed"
            )
            return result
        run.outcome = f"exit {exit_code}"
        return self.describe(capture, exit_code=exit_code, duration_ms=duration_ms)

    @staticmethod
    def _print(ctx: FakeStepContext, capture: FakeCapture, text: str) -> None:
        capture.stdout += text
        if ctx.on_output is not None:
            ctx.on_output("stdout", text.encode())

    @staticmethod
    def describe(capture: FakeCapture, *, exit_code: int | None, duration_ms: int) -> JSON:
        """A command's result, in the real executor's shape (also for an interrupted one)."""
        result: JSON = {
            "exit_code": -1 if exit_code is None else exit_code,
            "stdout": capture.stdout,
            "stderr": capture.stderr,
            "duration_ms": duration_ms,
            "truncated": False,
        }
        if exit_code:
            result["error"] = f"exit code {exit_code}"
        return result
