"""The HTTP-agnostic facade of the core: submit, get, list, cancel, events, health.

Frontends (and the CLI) call only this. It validates input, talks to the store and the queue
through their Protocols, and raises `wsrunner.errors` exceptions that a frontend maps to its
protocol's errors in one place.
"""

from __future__ import annotations

import builtins
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wsrunner.errors import NotFoundError, UnavailableError, ValidationError
from wsrunner.models import JSON, Event, TaskRecord, TaskState
from wsrunner.payload import parse_task, to_payload, validate_task_id, validate_workspace_id
from wsrunner.ports import Queue, Store
from wsrunner.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Submitted:
    record: TaskRecord
    created: bool  #: False when an idempotent retry returned the first task


class Service:
    """What a client of wsrunner can ask of it."""

    def __init__(self, settings: Settings, queue: Queue, store: Store,
                 stats: Any = None) -> None:  # fmt: skip
        self.settings = settings
        self.queue = queue
        self.store = store
        self._stats = stats  # callable returning the slot statistics, when a daemon runs

    async def submit(self, body: object) -> Submitted:
        """Validate `body`, record the task durably, then queue it.

        The durable row is written first. If Redis fails after that, the task is still accepted:
        the reconciler pushes queued rows that Redis does not know.

        Raises:
            ValidationError: naming the offending field.
            IdempotencyConflictError: the key was used with a different body.
        """
        if isinstance(body, dict) and "task_id" in body:
            raise ValidationError("task_id", "is assigned by wsrunner; remove it from the request")
        spec = parse_task(body, task_id=str(uuid.uuid4()))
        record, created = await self.store.create(spec, workspace_path=str(
            self.settings.volume_path / spec.workspace_id))  # fmt: skip
        if created:
            try:
                await self.queue.enqueue(to_payload(spec), event_data={"status": "queued"})
            except UnavailableError as exc:
                logger.error("task recorded but not queued yet (the reconciler will): %s", exc,
                             extra={"task_id": spec.task_id, "workspace_id": spec.workspace_id})  # fmt: skip
        return Submitted(record, created)

    async def get(self, task_id: str) -> TaskRecord:
        """The durable record. Raises NotFoundError (also for a malformed id)."""
        return await self.store.get(_task_id(task_id))

    async def list(
        self,
        *,
        workspace_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
    ) -> builtins.list[TaskRecord]:
        if workspace_id is not None:
            validate_workspace_id(workspace_id)
        state = None
        if status is not None:
            try:
                state = TaskState(status)
            except ValueError:
                raise ValidationError(
                    "status",
                    f"expected one of {', '.join(s.value for s in TaskState)}, got {status!r}",
                ) from None
        if not 1 <= limit <= 500:
            raise ValidationError("limit", f"expected an integer from 1 to 500, got {limit}")
        return await self.store.list(
            workspace_id=workspace_id, status=state, limit=limit, before=before
        )

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a queued or running task; it ends `cancelled` and a running command is killed.

        Raises:
            NotFoundError: no such task.
            InvalidTransitionError: it already ended (the message names its state).
        """
        tid = _task_id(task_id)
        record = await self.store.transition(tid, TaskState.CANCELLED, error="cancelled on request")
        await self.queue.transition(tid, record.workspace_id, TaskState.CANCELLED,
                                    fields={"error": "cancelled on request"},
                                    event={"status": "cancelled"},
                                    result={"status": "cancelled", "error": "cancelled on request"})  # fmt: skip
        await self.queue.publish_cancel(tid)
        logger.info("task cancelled", extra={"task_id": tid, "workspace_id": record.workspace_id})
        return record

    async def events(self, task_id: str, after: str = "0-0", *,
                     block_ms: int | None = None) -> builtins.list[Event]:  # fmt: skip
        """Events after `after` (a stream id), oldest first; `block_ms` waits for new ones."""
        return await self.queue.read_events(_task_id(task_id), after, block_ms=block_ms)

    async def health(self) -> JSON:
        """The reference system's /health shape, plus whether Redis and PostgreSQL answer."""
        checks = {}
        for name, ping in (("redis", self.queue.ping), ("postgres", self.store.ping)):
            try:
                await ping()
                checks[name] = "ok"
            except UnavailableError as exc:
                checks[name] = f"unavailable: {exc}"
        stats = self._stats() if self._stats is not None else None
        return {
            "status": "healthy" if all(v == "ok" for v in checks.values()) else "degraded",
            "worker_id": self.settings.worker_id,
            "active_tasks": stats.running if stats is not None else 0,
            "concurrency": self.settings.concurrency,
            "volume_path": str(self.settings.volume_path),
            "checks": checks,
        }


def _task_id(task_id: str) -> str:

    try:
        return validate_task_id(task_id)
    except ValidationError:
        raise NotFoundError(f"no task with id {task_id!r}") from None
