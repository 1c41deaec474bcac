"""The embedded queue: priority queues, claims, status mirror and events inside the daemon.

The single-host counterpart of `queue.RedisQueue`, behind the same `Queue` protocol, for a
daemon that runs with nothing else installed. Queues, claims, heartbeats and cancel requests
live in memory, since one process owns them; events go to the SQLite store
(`wsrunner.backends.embedded.store`), so a stream can be resumed with `Last-Event-ID` after a restart. What the
queue held when the process stopped is rebuilt from the store at start-up by the reconciler,
as with Redis: queued rows are pushed again and running ones re-queued once their lease ends.
All methods run on the trio thread; nothing here blocks.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Final

import trio

from wsrunner.backends.embedded.store import SqliteStore
from wsrunner.models import (
    JSON,
    PRIORITY_ORDER,
    Claim,
    Event,
    TaskState,
    sources_of,
)
from wsrunner.turns import LocalTurns, Turns

WAKE_BLOCK_S: Final = 5.0
ENDED_KEPT: Final = 10_000  #: ended tasks whose final state still refuses a late transition


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _seq(event_id: str) -> int:
    return int(event_id.split("-", 1)[0])


class LocalQueue(LocalTurns):
    """In-process queues over a SqliteStore's event table. Create with `open_local_queue()`."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.on_error: Callable[[], None] | None = None  #: nothing here can fail remotely
        self._turns = Turns()  #: the waiting payloads, and what claims hold
        self._inflight: dict[str, dict[str, str]] = {}
        self._claims = 0
        self._status: dict[str, dict[str, str]] = {}  #: tasks not ended yet
        self._ended: OrderedDict[str, str] = OrderedDict()  #: the last ENDED_KEPT endings
        self._heartbeats: dict[str, float] = {}
        self._work = trio.Event()
        self._events: dict[str, trio.Event] = {}  # set when the task's stream grows
        self._cancel_listeners: list[trio.MemorySendChannel[str]] = []
        self.dead: list[JSON] = []  #: payloads that cannot run, with the reason (dead letters)

    async def ping(self) -> None:
        await self._store.ping()

    def _wake(self) -> None:
        self._work.set()

    # --- submit and claims --------------------------------------------------------------------

    def _push(self, payload: JSON, *, next_up: bool) -> None:
        self._turns.add(payload["priority"], json.dumps(payload), next_up=next_up)
        self._work.set()

    async def enqueue(
        self, payload: JSON, *, event_data: JSON, max_running: int | None = None
    ) -> str:
        tid = payload["task_id"]
        token = payload.get("token_id")
        if isinstance(token, str):
            if max_running is None:
                self._turns.token_limits.pop(token, None)
            else:
                self._turns.token_limits[token] = max_running
        self._status[tid] = {
            "status": TaskState.QUEUED.value,
            "workspace_id": payload["workspace_id"],
            "submitted_at": _now_iso(),
            "priority": payload["priority"],
            "task_type": payload.get("task_type", "background_job"),
        }
        event_id = await self.emit(tid, "status_changed", event_data)
        self._push(payload, next_up=False)
        return event_id

    async def requeue_payload(self, payload: JSON) -> None:
        self._status[payload["task_id"]] = {
            "status": "queued",
            "workspace_id": payload["workspace_id"],
            "priority": payload["priority"],
        }
        # Behind the rest (Redis puts it next in line): at start every queued task comes back
        # through here, oldest first, and keeps its order.
        self._push(payload, next_up=False)

    async def claim(self, worker_id: str) -> Claim | None:
        claim = self._turns.claim(self._claims + 1)
        if claim is None:
            return None
        self._claims += 1
        self._inflight.setdefault(worker_id, {})[claim.claim_id] = claim.payload
        return claim

    async def wait_for_work(self) -> bool:
        """True once a payload arrives or a settled claim frees one; False after WAKE_BLOCK_S."""
        self._work = trio.Event()
        with trio.move_on_after(WAKE_BLOCK_S):
            await self._work.wait()
        return self._work.is_set()

    def _settle(self, worker_id: str, claim_id: str) -> str | None:
        raw = self._inflight.get(worker_id, {}).pop(claim_id, None)
        if self._turns.release(claim_id):
            self._work.set()
        return raw

    async def ack(self, worker_id: str, claim_id: str) -> None:
        self._settle(worker_id, claim_id)

    async def requeue_claim(self, worker_id: str, claim_id: str, priority: str) -> bool:
        raw = self._settle(worker_id, claim_id)
        if raw is None:
            return False
        self._turns.add(priority, raw, next_up=True)  # back to the front of its line
        self._work.set()
        return True

    async def dead_letter(self, worker_id: str, claim_id: str, reason: str) -> None:
        raw = self._settle(worker_id, claim_id)
        if raw is not None:
            self.dead.append(
                {"payload": raw, "reason": reason, "worker_id": worker_id, "at": _now_iso()}
            )

    async def inflight(self, worker_id: str) -> dict[str, str]:
        return dict(self._inflight.get(worker_id, {}))

    # --- status mirror and events -------------------------------------------------------------

    async def transition(
        self,
        task_id: str,
        workspace_id: str,
        target: TaskState,
        *,
        fields: dict[str, str] | None = None,
        event: JSON | None = None,
        result: JSON | None = None,
        ack: tuple[str, str] | None = None,
        then: tuple[str, JSON] | None = None,
    ) -> tuple[bool, str]:
        """Compare-and-set the mirror; on success also emit, store the result and ack. The
        event `then` (kind, data) is emitted last, applied or not."""
        applied, out = await self._transition(task_id, workspace_id, target, fields, event, ack)
        if then is not None:
            await self.emit(task_id, *then)
        return applied, out

    async def _transition(
        self,
        task_id: str,
        workspace_id: str,
        target: TaskState,
        fields: dict[str, str] | None,
        event: JSON | None,
        ack: tuple[str, str] | None,
    ) -> tuple[bool, str]:
        current = self._status.get(task_id)
        ended = self._ended.get(task_id)
        if ended is not None:
            return False, ended
        if current is not None and current["status"] not in {s.value for s in sources_of(target)}:
            return False, current["status"]
        status = self._status.setdefault(task_id, {"workspace_id": workspace_id})
        status.update(fields or {}, status=target.value)
        if target.terminal:  # the store keeps the record and the result; memory stays bounded
            del self._status[task_id]
            self._ended[task_id] = target.value
            if len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
        if ack is not None:
            await self.ack(*ack)
        event_id = "" if event is None else await self.emit(task_id, "status_changed", event)
        return True, event_id

    async def emit(self, task_id: str, kind: str, data: JSON) -> str:
        seq = await self._store.add_event(task_id, kind, data, _now_iso())
        waiter = self._events.pop(task_id, None)
        if waiter is not None:
            waiter.set()
        return f"{seq}-0"

    async def read_events(
        self, task_id: str, after: str = "0-0", *, block_ms: int | None = None, count: int = 500
    ) -> list[Event]:
        rows = await self._store.events_after(task_id, _seq(after), count)
        if not rows and block_ms is not None:
            waiter = self._events.setdefault(task_id, trio.Event())
            with trio.move_on_after(block_ms / 1000):
                await waiter.wait()
            rows = await self._store.events_after(task_id, _seq(after), count)
        return [
            Event(id=f"{seq}-0", type=kind, task_id=task_id, data=data, timestamp=ts)
            for seq, kind, data, ts in rows
        ]

    async def depths(self) -> dict[str, int]:
        return {p.value: self._turns.depth(p.value) for p in PRIORITY_ORDER}

    async def statuses(self, task_ids: Iterable[str]) -> dict[str, str | None]:
        return {
            t: self._status[t]["status"] if t in self._status else self._ended.get(t)
            for t in task_ids
        }

    # --- daemons ------------------------------------------------------------------------------

    async def heartbeat(self, worker_id: str, running: Iterable[str], ttl_s: float) -> None:
        self._heartbeats[worker_id] = time.monotonic() + ttl_s

    async def retire(self, worker_id: str) -> None:
        self._heartbeats.pop(worker_id, None)

    async def dead_workers(self) -> list[str]:
        now = time.monotonic()
        return sorted(w for w, until in self._heartbeats.items() if until < now)

    async def is_alive(self, worker_id: str) -> bool:
        return self._heartbeats.get(worker_id, 0.0) >= time.monotonic()

    async def forget_worker(self, worker_id: str) -> None:
        if not self._inflight.get(worker_id):
            self._heartbeats.pop(worker_id, None)
            self._inflight.pop(worker_id, None)

    # --- cancellation -------------------------------------------------------------------------

    async def publish_cancel(self, task_id: str) -> None:
        for send in list(self._cancel_listeners):
            try:
                send.send_nowait(task_id)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the 1 s sweep of the cancel watch is the backstop

    async def serve_cancel_listener(
        self, send: trio.MemorySendChannel[str], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._cancel_listeners.append(send)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._cancel_listeners.remove(send)


@asynccontextmanager
async def open_local_queue(store: SqliteStore) -> AsyncIterator[LocalQueue]:
    yield LocalQueue(store)
