"""The lifecycle of one claimed task: start it, run its steps under its deadline, record the end.

Every state write goes to PostgreSQL first (the compare-and-set there decides) and is then
mirrored to Redis with its event. A task that a cancel request already ended keeps that state;
the runner only attaches what the steps did. On shutdown a task is put back at the head of its
queue instead of being lost.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, TypeVar

import trio

from wsrunner.engine.lifecycle import ClaimRef, Lifecycle
from wsrunner.errors import (
    QuotaExceededError,
    UnavailableError,
    ValidationError,
    WorkspaceElsewhereError,
)
from wsrunner.execution.steps import StepContext
from wsrunner.metrics import Metrics
from wsrunner.models import JSON, Claim, EncodedJSON, TaskSpec, TaskState
from wsrunner.payload import parse_task, validate_task_id
from wsrunner.ports import EventLog, Queue, StepRunner, Store, TaskDirectories
from wsrunner.settings import Settings
from wsrunner.workspace.directories import TaskEnvironment

logger = logging.getLogger(__name__)
T = TypeVar("T")
StepsDone = Callable[[], Awaitable[None]]

OUTPUT_FLUSH_S: Final = 0.1  # output events are batched over this long
OUTPUT_EVENT_BYTES: Final = 16_384  # ... or this many bytes
OUTPUT_EVENTS_CAP_BYTES: Final = 1_048_576  # streamed per task; the result keeps its own caps
FINISH_RETRY_S: Final = 120.0  # how long a terminal write is retried while a store is down


def _queued_at(payload: object) -> float | None:
    """The payload's `created_at` in epoch seconds (naive means UTC); None when it has none, or
    not a timestamp: the field is informational, and a producer may leave it out."""
    raw = payload.get("created_at") if isinstance(payload, dict) else None
    if not isinstance(raw, str):
        return None
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp()


class StopReason(enum.Enum):
    """Why a running task's cancel scope was cancelled."""

    CANCEL = "cancel"  #: a cancel request already wrote the `cancelled` state
    SHUTDOWN = "shutdown"  #: the daemon is stopping: re-queue the task
    LOST = "lost"  #: another daemon took the task over: write nothing


@dataclass(slots=True)
class RunningTask:
    spec: TaskSpec
    claim: Claim
    attempt: int  #: its start's number (1 for the first)
    queued_at: float | None = None  #: when it was queued (epoch s, the payload's created_at)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reason: StopReason | None = None
    recording: bool = False  #: its steps are over; only its end is being written
    #: set once Redis mirrors the start (or failed to): the task's events wait for it
    mirrored: trio.Event = field(default_factory=trio.Event)


async def retrying(
    what: str, fn: Callable[[], Awaitable[T]], *, budget_s: float = FINISH_RETRY_S
) -> T:
    """Call `fn` until it does not raise UnavailableError, backing off, for up to `budget_s`."""
    delay, deadline = 0.1, trio.current_time() + budget_s
    while True:
        try:
            return await fn()
        except UnavailableError as exc:
            if trio.current_time() + delay > deadline:
                raise
            logger.warning("%s failed, retrying in %.1fs: %s", what, delay, exc)
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _progress(spec: TaskSpec, step: int) -> JSON:
    """The `progress_update` event's data for the start of step `step` (1-based)."""
    action = spec.steps[step - 1]
    return {
        "step": step,
        "total_steps": len(spec.steps),
        "description": action.description or f"Step {step}: {action.action}",
    }


class _OutputForwarder:
    """Turns a command's output chunks into batched `output` events, within a byte budget."""

    def __init__(
        self, queue: EventLog, task_id: str, ready: trio.Event, nursery: trio.Nursery
    ) -> None:
        self._queue, self._task_id, self._ready = queue, task_id, ready
        self._pending: list[tuple[str, bytes]] = []
        self._size = self._sent = 0
        self._step = 0
        self._wake = trio.Event()
        self._lock = trio.Lock()
        #: where `_serve` starts with the first output (a silent task never needs it); then None
        self._nursery: trio.Nursery | None = nursery

    def start_step(self, step: int) -> None:
        self._step = step

    def feed(self, stream: str, chunk: bytes) -> bool:
        """Queue `chunk` for the next event; False once the task's event budget is spent."""
        if self._sent + self._size >= OUTPUT_EVENTS_CAP_BYTES:
            return False
        self._pending.append((stream, chunk))
        self._size += len(chunk)
        self._wake.set()
        if self._nursery is not None:
            self._nursery.start_soon(self._serve)
            self._nursery = None
        return True

    async def flush(self) -> None:
        """Send what is pending; without Redis it is lost (and logged), the task goes on.
        Returns once the output so far is sent (by this call or by one already sending)."""
        if not self._pending and not self._lock.locked():
            return  # nothing to send or being sent (a silent step): not even a checkpoint
        try:
            await self._flush()
        except UnavailableError as exc:
            logger.warning("output event lost: %s", exc, extra={"task_id": self._task_id})

    async def _flush(self) -> None:
        await self._ready.wait()  # the start's event goes first
        async with self._lock:
            pending, self._pending, self._size = self._pending, [], 0
            self._wake = trio.Event()
            for stream in ("stdout", "stderr"):
                data = b"".join(c for s, c in pending if s == stream)
                if data:
                    self._sent += len(data)
                    text = data.decode("utf-8", errors="replace")
                    await self._queue.emit(
                        self._task_id,
                        "output",
                        {"step": self._step, "stream": stream, "data": text},
                    )

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            with trio.move_on_after(OUTPUT_FLUSH_S):
                # A batching window, bounded above by OUTPUT_FLUSH_S.
                while self._size < OUTPUT_EVENT_BYTES:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            await self.flush()


class TaskRunner:
    """Runs claimed tasks; `running` maps task id to what is running on this daemon."""

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        store: Store,
        workspaces: TaskDirectories,
        executor: StepRunner,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.queue = queue
        self.store = store
        self.workspaces = workspaces
        self.executor = executor
        self.running: dict[str, RunningTask] = {}
        self.worker_id = settings.worker_id
        self.lifecycle = Lifecycle(queue, store, retry=retrying)

    def _claim(self, claim: Claim) -> ClaimRef:
        return ClaimRef(self.worker_id, claim.claim_id, claim.priority)

    def stop_task(self, task_id: str, reason: StopReason) -> bool:
        """Cancel a task running here; False if it is not running on this daemon, or its steps
        are over (its end is being written: a shutdown must not re-queue it)."""
        rt = self.running.get(task_id)
        if rt is None or rt.recording:
            return False
        if rt.reason is None:
            rt.reason = reason
        rt.scope.cancel()
        return True

    # --- claim to start -----------------------------------------------------------------------

    async def run_claim(self, claim: Claim, steps_done: StepsDone | None = None) -> None:
        """Run one claimed payload to its end. Never raises for a task-level problem.

        `steps_done` is awaited once the steps have ended, before the directory is removed and
        the end is recorded: the slot that ran them can take the next claim meanwhile.
        """
        if claim.workspace_wait_s is not None:
            self.metrics.workspace_wait.observe(claim.workspace_wait_s)
        parsed = await self._parse(claim)
        if parsed is None:
            return
        spec, queued_at = parsed
        log = {"task_id": spec.task_id, "workspace_id": spec.workspace_id}
        # The task directory is made while the start is being recorded (it needs nothing from
        # it); a task that may not start has it removed again.
        prepared: list[TaskEnvironment | Exception] = []
        unavailable: UnavailableError | None = None
        attempt: int | None = None
        await self._place(spec, claim)
        async with trio.open_nursery() as nursery:
            if claim.placement.startswith("gone:"):  # nothing of it is made on this host
                home = claim.placement.removeprefix("gone:")
                prepared.append(
                    WorkspaceElsewhereError(spec.workspace_id, home, self.settings.host_id)
                )
            else:
                nursery.start_soon(self._prepare, spec, prepared)
            try:  # caught in here: the nursery would wrap it in an exception group
                attempt = await self._start(spec, claim)
            except UnavailableError as exc:
                unavailable = exc
        if unavailable is not None:
            # Leave the claim in place: the reaper re-queues it once we are gone, and the
            # reconciler finds the row; put it back now so another daemon can try.
            logger.error("cannot start task: %s; re-queueing it", unavailable, extra=log)
            with trio.CancelScope(shield=True):
                await self._unprepare(spec, prepared)
                await self.queue.requeue_claim(self.worker_id, claim.claim_id, claim.priority)
                self.metrics.requeue("start_failed").inc()
            return
        if attempt is None:
            await self._unprepare(spec, prepared)
            return
        rt = RunningTask(spec, claim, attempt=attempt, queued_at=queued_at)
        self.running[spec.task_id] = rt
        try:
            await self._execute(rt, prepared[0], steps_done)
        finally:
            del self.running[spec.task_id]

    async def _place(self, spec: TaskSpec, claim: Claim) -> None:
        """Record durably that this host is now the workspace's home, when the claim made it
        so (its first use, or a take-over from a host that is gone)."""
        if claim.placement != "new" and not claim.placement.startswith("moved:"):
            return
        if claim.placement.startswith("moved:"):
            logger.warning(
                "workspace taken over from host %s, which is gone",
                claim.placement.removeprefix("moved:"),
                extra={"workspace_id": spec.workspace_id},
            )
        try:
            await self.store.record_home(spec.workspace_id, self.settings.host_id)
        except UnavailableError as exc:  # Redis has it; the next start records it again
            logger.warning("workspace home not recorded: %s", exc, extra={"task_id": spec.task_id})

    async def _prepare(self, spec: TaskSpec, out: list[TaskEnvironment | Exception]) -> None:
        """Check the quota and make the task directory, into `out`; errors are the task's.

        A directory already there is left alone (FileExistsError): it may be a running
        duplicate's, until the start says this claim owns the task.
        """
        ws = spec.workspace_id
        try:
            await self.workspaces.check_quota(ws)
            env = await self.workspaces.open_task(
                ws, spec.task_id, spec.credentials, clear_leftovers=False
            )
            out.append(env)
        except Exception as exc:
            out.append(exc)

    async def _unprepare(self, spec: TaskSpec, prepared: list[TaskEnvironment | Exception]) -> None:
        if prepared and isinstance(prepared[0], TaskEnvironment):
            await self.workspaces.close_task(spec.workspace_id, spec.task_id, count=False)

    async def _parse(self, claim: Claim) -> tuple[TaskSpec, float | None] | None:
        """The claim's TaskSpec and when it was queued (`_queued_at`), or None after
        dead-lettering (and failing) a bad payload."""
        obj: object = None
        try:
            obj = json.loads(claim.payload)
            spec = parse_task(obj)
        except ValidationError as exc:
            reason, kind = str(exc), "invalid_payload"
        except (ValueError, RecursionError) as exc:  # not JSON, or nested past Python's stack
            reason, kind = f"invalid JSON: {str(exc)[:200]}", "invalid_json"
        else:
            if claim.workspace_id is not None and claim.workspace_id == spec.workspace_id:
                return spec, _queued_at(obj)
            # The queue read another workspace (or none) from it: the task would run without
            # holding its own workspace. Never run what the two read differently (Redis's JSON
            # reader refuses a lone UTF-16 surrogate, which Python's accepts).
            read = (
                "could not read it"
                if claim.workspace_id is None
                else f"read workspace {claim.workspace_id!r} from it"
            )
            reason = (
                f"invalid payload: the queue's JSON reader {read} (a lone UTF-16 surrogate, "
                f"for one), the daemon's read workspace {spec.workspace_id!r}"
            )
            kind = "invalid_payload"
        task_id = None
        if isinstance(obj, dict):
            try:
                task_id = validate_task_id(obj.get("task_id"))
            except ValidationError:
                pass
        logger.error(
            "malformed payload moved to the dead-letter list: %s",
            reason,
            extra={"task_id": task_id, "claim_id": claim.claim_id},
        )
        await self.queue.dead_letter(self.worker_id, claim.claim_id, reason)
        self.metrics.dead_letter(kind).inc()
        if task_id is not None:  # whoever watches this id gets an answer, not silence
            ws = obj.get("workspace_id") if isinstance(obj, dict) else None
            await self.lifecycle.unreadable(
                task_id, ws if isinstance(ws, str) else "-", f"invalid payload: {reason}"
            )
        return None

    async def _start(self, spec: TaskSpec, claim: Claim) -> int | None:
        """Record the start: the attempt number, or None (claim acknowledged) if the task must
        not run. Redis mirrors it while the first step starts (`_mirror_start`)."""
        workspace_path = self.workspaces.root(spec.workspace_id)
        return await self.lifecycle.started(spec, self._claim(claim), workspace_path)

    async def _mirror_start(self, rt: RunningTask) -> None:
        """Mirror the start with the first progress event; then let the task's events out."""
        try:
            await self.lifecycle.mirror_start(
                rt.spec, self.worker_id, rt.attempt, then=("progress_update", _progress(rt.spec, 1))
            )
        finally:
            rt.mirrored.set()

    async def _steps_over(self, rt: RunningTask) -> None:
        """Free the task's workspace and tenant for the next task (its claim stays in flight
        until its end is recorded). Without Redis, its end frees them."""
        try:
            await self.queue.steps_over(rt.claim.claim_id)
        except UnavailableError as exc:
            logger.warning("workspace not freed early: %s", exc, extra={"task_id": rt.spec.task_id})

    async def _event(self, rt: RunningTask, kind: str, data: JSON) -> None:
        """Emit an event after the start's. Without Redis it is lost (and logged); the task
        goes on."""
        await rt.mirrored.wait()
        try:
            await self.queue.emit(rt.spec.task_id, kind, data)
        except UnavailableError as exc:
            logger.warning("%s event lost: %s", kind, exc, extra={"task_id": rt.spec.task_id})

    # --- steps --------------------------------------------------------------------------------

    async def _execute(
        self, rt: RunningTask, prepared: TaskEnvironment | Exception, steps_done: StepsDone | None
    ) -> None:
        spec = rt.spec
        tid, ws = spec.task_id, spec.workspace_id
        log = {"task_id": tid, "workspace_id": ws}
        t0 = trio.current_time()  # trio's clock: a MockClock drives it in unit tests
        rt.scope.deadline = trio.current_time() + spec.timeout_seconds
        steps: list[JSON] = []
        failed_steps: list[int] = []
        error: str | None = None
        ctx: StepContext | None = None
        policy = self.executor.policy.for_workspace(ws)  # the task keeps it, whatever reloads
        logger.info("task started", extra={**log, "policy": policy.digest})
        self.metrics.started(spec.priority.value).inc()
        if rt.attempt == 1 and rt.queued_at is not None:  # a retry's payload has no later time
            self.metrics.waited(spec.priority.value).observe(max(0.0, time.time() - rt.queued_at))
        try:
            with rt.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._mirror_start, rt)
                    forwarder = _OutputForwarder(self.queue, tid, rt.mirrored, nursery)
                    try:
                        if isinstance(prepared, FileExistsError):  # an earlier run's leftovers
                            prepared = await self.workspaces.open_task(ws, tid, spec.credentials)
                        if isinstance(prepared, Exception):
                            raise prepared
                        env = prepared
                        ctx = self.executor.context(env, ws, forwarder.feed, policy)
                        for i, step in enumerate(spec.steps, start=1):
                            forwarder.start_step(i)
                            if i > 1:  # the first went out with the start
                                await self._event(rt, "progress_update", _progress(spec, i))
                            budget = rt.scope.deadline - trio.current_time()
                            res = await self.executor.run_step(step, ctx, budget_s=budget)
                            # Kept before the next checkpoint: a cancel landing while the
                            # step's last output is sent must not lose a step that ended.
                            steps.append({"step": i, "action": step.action, "result": res})
                            self.metrics.step_time(step.action).observe(
                                res.get("duration_ms", 0) / 1000
                            )
                            await forwarder.flush()
                            if "error" in res:
                                failed_steps.append(i)
                                await self._event(rt, "error", {"step": i, "error": res["error"]})
                                if spec.stop_on_error:
                                    break
                    except (QuotaExceededError, WorkspaceElsewhereError) as exc:
                        error = str(exc)
                        await self._event(rt, "error", {"error": error})
                    except Exception as exc:  # a bug, or a store gone mid-task: fail it, loudly
                        logger.exception("task aborted by an internal error", extra=log)
                        error = f"internal error: {exc}"
                    nursery.cancel_scope.cancel()
        finally:
            elapsed_ms = int((trio.current_time() - t0) * 1000)
            if rt.scope.cancelled_caught and ctx is not None and ctx.capture is not None:
                # The step that was running when the task stopped: keep what it printed.
                part = self.executor.describe(ctx.capture, exit_code=None, duration_ms=0)
                part["error"] = "interrupted"
                steps.append(
                    {
                        "step": len(steps) + 1,
                        "action": spec.steps[len(steps)].action,
                        "result": part,
                    }
                )
            with trio.CancelScope(shield=True):
                rt.recording = True
                await self._steps_over(rt)
                if steps_done is not None:
                    await steps_done()
                repos: list[str] = []
                if ctx is not None:
                    repos = await self.workspaces.close_task(ws, tid, count=True)
                await self._finish(rt, steps, failed_steps, error, elapsed_ms, repos)

    # --- the end ------------------------------------------------------------------------------

    async def _finish(
        self,
        rt: RunningTask,
        steps: list[JSON],
        failed: list[int],
        error: str | None,
        elapsed_ms: int,
        repos: list[str],
    ) -> None:
        spec, claim = rt.spec, rt.claim
        tid, ws = spec.task_id, spec.workspace_id
        log = {"task_id": tid, "workspace_id": ws}
        if rt.reason is StopReason.SHUTDOWN:
            await self._requeue(rt)
            return
        if rt.reason is StopReason.LOST:
            logger.warning("task was taken over by another daemon; dropping our run", extra=log)
            return
        if rt.reason is StopReason.CANCEL:
            state = TaskState.CANCELLED
            error = "cancelled on request"
        elif rt.scope.cancelled_caught:
            state = TaskState.TIMED_OUT
            error = (
                f"timed out after {elapsed_ms / 1000:.1f}s (timeout_seconds={spec.timeout_seconds})"
            )
        elif error is not None or failed:
            state = TaskState.FAILED
            if error is None:
                first = steps[[s["step"] for s in steps].index(failed[0])]
                error = (
                    f"step {failed[0]} of {len(spec.steps)} ({first['action']}) failed: "
                    f"{first['result']['error']}"
                )
                if len(failed) > 1:
                    error += f" (steps failed: {', '.join(map(str, failed))})"
        else:
            state = TaskState.COMPLETED
        body: JSON = {
            "status": state.value,
            "result": {"steps": steps, "workspace_id": ws, "repos_cached": repos},
            "execution_time_ms": elapsed_ms,
            "completed_at": datetime.now(UTC).isoformat(),
        }
        if error is not None:
            body["error"] = error
        result = EncodedJSON(body)  # PostgreSQL and Redis both write it
        applied = await self.lifecycle.ended(
            spec, self._claim(claim), state, result, error, elapsed_ms
        )
        logger.info("task %s in %d ms", state.value if applied else "ended", elapsed_ms, extra=log)
        if applied:
            self.metrics.finished(state.value, spec.priority.value).inc()
            self.metrics.task_time(state.value).observe(elapsed_ms / 1000)

    async def _requeue(self, rt: RunningTask) -> None:
        """Give the task back: `queued` again, its payload at the head of its queue."""
        if await self.lifecycle.handed_back(rt.spec, self._claim(rt.claim)):
            self.metrics.requeue("shutdown").inc()
            logger.info(
                "task re-queued for another daemon",
                extra={"task_id": rt.spec.task_id, "workspace_id": rt.spec.workspace_id},
            )
