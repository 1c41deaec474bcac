"""Every change of a task's state, in one place.

The rule, written once: the durable store decides (its compare-and-set, one statement per
backend), the status event is built here, Redis mirrors the state and the event, and then the
claim is settled (acknowledged, or handed back to its queue). When the store refuses a change,
the state that won stands and the claim is still settled. Callers say what happened:

    what happened                  method        the store's decision
    a client asked to cancel       cancelled     -> cancelled (refusal raised to the client)
    a payload could not be read    unreadable    -> failed
    a daemon starts it             started       -> running, attempt + 1 (mirrored by mirror_start)
    its steps are over             ended         -> completed | failed | timed_out | cancelled
    this daemon stops              handed_back   -> queued, if this daemon still holds it
    its daemon died                recovered     -> queued, or failed after max_attempts
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import trio

from wsrunner.errors import InvalidTransitionError, NotFoundError, UnavailableError
from wsrunner.models import JSON, TaskRecord, TaskSpec, TaskState
from wsrunner.ports import Queue, Store

logger = logging.getLogger(__name__)
T = TypeVar("T")

CANCELLED_ON_REQUEST: Final = "cancelled on request"


@dataclass(frozen=True, slots=True)
class ClaimRef:
    """A claim to settle: whose it is, its id, and the queue it came from."""

    worker_id: str
    claim_id: str
    priority: str


def status_event(target: TaskState, **data: Any) -> JSON:
    """The status event of a change: `{"status": ..., **data}`, without the None values."""
    return {"status": target.value, **{k: v for k, v in data.items() if v is not None}}


Retry = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


async def _once(_what: str, call: Callable[[], Awaitable[T]]) -> T:
    return await call()


class Lifecycle:
    """The state changes of tasks over a queue (the mirror) and a store (the arbiter).

    `retry(what, call)` wraps the writes that must not be lost at a task's end (the runner
    passes its backoff; by default a call is made once).
    """

    def __init__(self, queue: Queue, store: Store, *, retry: Retry = _once) -> None:
        self.queue, self.store, self.retry = queue, store, retry

    async def cancelled(self, task_id: str) -> TaskRecord:
        """A client cancelled the task. Raises NotFoundError, or InvalidTransitionError if it
        already ended; else the running daemon is told to stop it."""
        record = await self.store.transition(
            task_id, TaskState.CANCELLED, error=CANCELLED_ON_REQUEST
        )
        await self.queue.transition(
            task_id,
            record.workspace_id,
            TaskState.CANCELLED,
            fields={"error": CANCELLED_ON_REQUEST},
            event=status_event(TaskState.CANCELLED),
            result={"status": "cancelled", "error": CANCELLED_ON_REQUEST},
        )
        await self.queue.publish_cancel(task_id)
        return record

    async def unreadable(self, task_id: str, workspace_id: str, error: str) -> None:
        """A payload naming `task_id` was dead-lettered: whoever watches that id gets `failed`,
        not silence. Its producer may have written no record: then the mirror alone says so."""
        try:
            await self.store.transition(task_id, TaskState.FAILED, error=error)
        except NotFoundError:
            pass
        except InvalidTransitionError:
            return  # already ended: that state stands
        await self.queue.transition(
            task_id,
            workspace_id,
            TaskState.FAILED,
            fields={"error": error},
            event=status_event(TaskState.FAILED, error=error),
        )

    async def started(self, spec: TaskSpec, claim: ClaimRef, workspace_path: str) -> int | None:
        """A daemon starts the task: its attempt number, or None (the claim acknowledged) when
        it must not run. Redis is told by `mirror_start`, once the first step is under way."""
        try:
            return await self.store.start(
                spec, worker_id=claim.worker_id, workspace_path=workspace_path
            )
        except InvalidTransitionError as exc:
            logger.info(
                "not starting task: it is %s",
                exc.current,
                extra={"task_id": spec.task_id, "workspace_id": spec.workspace_id},
            )
            await self.queue.ack(claim.worker_id, claim.claim_id)
            return None

    async def mirror_start(
        self, spec: TaskSpec, worker_id: str, attempt: int, then: tuple[str, JSON]
    ) -> None:
        """Mirror a start the store recorded, with `then` (the first progress event) after it.
        Shielded, so a task's end is never mirrored before its start; without Redis the store
        has it and the end catches the mirror up."""
        try:
            with trio.CancelScope(shield=True):
                await self.queue.transition(
                    spec.task_id,
                    spec.workspace_id,
                    TaskState.RUNNING,
                    fields={
                        "worker_id": worker_id,
                        "started_at": datetime.now(UTC).isoformat(),
                        "attempts": str(attempt),
                    },
                    event=status_event(TaskState.RUNNING, worker_id=worker_id, attempt=attempt),
                    then=then,
                )
        except UnavailableError as exc:
            logger.warning(
                "Redis did not take the start of the task: %s",
                exc,
                extra={"task_id": spec.task_id, "workspace_id": spec.workspace_id},
            )

    async def ended(
        self,
        spec: TaskSpec,
        claim: ClaimRef,
        target: TaskState,
        result: JSON,
        error: str | None,
        elapsed_ms: int,
    ) -> bool:
        """The task's steps are over and it ends `target`. False if something else ended it
        first (a cancel, a reaper): that state stands and `result` is attached to it."""
        tid, ws = spec.task_id, spec.workspace_id
        log = {"task_id": tid, "workspace_id": ws}
        try:
            await self.retry(
                "recording the end of a task",
                lambda: self.store.finish(
                    tid,
                    target,
                    worker_id=claim.worker_id,
                    result=result,
                    error=error,
                    execution_time_ms=elapsed_ms,
                ),
            )
            applied = True
        except InvalidTransitionError as exc:
            applied = False
            logger.info("task already %s; attaching the result only", exc.current, extra=log)
            await self.retry(
                "attaching a result", lambda: self.store.attach_result(tid, result, elapsed_ms)
            )
        except (NotFoundError, UnavailableError) as exc:
            logger.error("could not record the end of the task: %s", exc, extra=log)
            return False
        try:
            if applied:
                fields = {
                    "completed_at": result["completed_at"],
                    **({"error": error} if error else {}),
                }
                event = status_event(target, execution_time_ms=elapsed_ms, error=error)
                await self.retry(
                    "mirroring the end of a task",
                    lambda: self.queue.transition(
                        tid,
                        ws,
                        target,
                        fields=fields,
                        event=event,
                        result=result,
                        ack=(claim.worker_id, claim.claim_id),
                    ),
                )
            else:
                await self.retry(
                    "acknowledging a claim", lambda: self.queue.ack(claim.worker_id, claim.claim_id)
                )
        except UnavailableError as exc:
            logger.error("Redis did not take the end of the task: %s", exc, extra=log)
        return applied

    async def handed_back(self, spec: TaskSpec, claim: ClaimRef) -> bool:
        """This daemon stops before the task ends: `queued` again, its payload at the head of
        its queue. False if it ended meanwhile (a cancel): the claim is acknowledged."""
        log = {"task_id": spec.task_id, "workspace_id": spec.workspace_id}
        try:
            await self.store.transition(
                spec.task_id, TaskState.QUEUED, expect_worker=claim.worker_id
            )
        except InvalidTransitionError as exc:
            logger.info("not re-queueing: task is %s", exc.current, extra=log)
            await self.queue.ack(claim.worker_id, claim.claim_id)
            return False
        # Status first, payload second: once the payload is visible another daemon may start it.
        await self.queue.transition(
            spec.task_id,
            spec.workspace_id,
            TaskState.QUEUED,
            event=status_event(TaskState.QUEUED, reason="daemon shutting down"),
        )
        await self.queue.requeue_claim(claim.worker_id, claim.claim_id, claim.priority)
        return True

    async def recovered(
        self,
        record: TaskRecord,
        dead_worker: str,
        max_attempts: int,
        *,
        claim: ClaimRef | None = None,
        payload: JSON | None = None,
    ) -> TaskState | None:
        """A dead daemon's running task: `queued` again, or `failed` after `max_attempts`
        starts; None if the store refused (it ended, or another daemon has it).

        Then the claim the dead daemon held is handed back (queued) or acknowledged; without
        one, `payload` is pushed to the queue again (the reconciler's case).
        """
        if record.attempts >= max_attempts:
            target, error = (
                TaskState.FAILED,
                (
                    f"gave up after {record.attempts} attempts: daemon {dead_worker} stopped "
                    "renewing its lease while running the task"
                ),
            )
        else:
            target, error = TaskState.QUEUED, None
        try:
            await self.store.transition(record.id, target, expect_worker=dead_worker, error=error)
        except (InvalidTransitionError, NotFoundError):
            if claim is not None:
                await self.queue.ack(claim.worker_id, claim.claim_id)
            return None
        await self.queue.transition(
            record.id,
            record.workspace_id,
            target,
            fields={"error": error} if error else None,
            event=status_event(target, reason=f"daemon {dead_worker} died", error=error),
        )
        logger.warning(
            "task of dead daemon %s is now %s",
            dead_worker,
            target.value,
            extra={"task_id": record.id, "workspace_id": record.workspace_id},
        )
        if claim is not None and target is TaskState.QUEUED:
            await self.queue.requeue_claim(claim.worker_id, claim.claim_id, claim.priority)
        elif claim is not None:
            await self.queue.ack(claim.worker_id, claim.claim_id)
        elif payload is not None and target is TaskState.QUEUED:
            await self.queue.requeue_payload(payload)
        return target
