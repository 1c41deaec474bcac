"""MemoryQueue: the fast shared state in dicts, with the Redis queue's claims, mirror and events."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import trio

from wsrunner.models import (
    JSON,
    PRIORITY_ORDER,
    Claim,
    Event,
    TaskState,
    sources_of,
)
from wsrunner.testing.common import WAKE_BLOCK_S, _Clock, _copy, _round_trip
from wsrunner.turns import LocalTurns, Turns

# --- the fast shared state --------------------------------------------------------------------


def _event_seq(event_id: str) -> int:
    return int(event_id.split("-", 1)[0])


class MemoryQueue(LocalTurns):
    """The `Queue` port in memory, with the Redis queue's rules.

    Payloads wait in `wsrunner.turns.Turns`, as in the Redis claim script: a re-queued one (a
    claim given back, a payload rebuilt by the reconciler) goes to the front of its line. The
    status mirror keeps ended tasks, and a move to the state a task is
    already in applies, as the TRANSITION script does. Event ids are `<n>-0`, one count for all
    streams, so ids of one task increase like Redis stream ids. `dead` holds the dead letters.
    """

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency  #: trio seconds each call takes before it acts
        self.on_error: Callable[[], None] | None = None  #: nothing here fails
        self._turns = Turns(clock=trio.current_time)  #: the waiting payloads, and the claims
        self._released = False  #: a claim settled since the last claim
        self._inflight: dict[str, dict[str, str]] = {}
        self._claims = 0
        self._status: dict[str, dict[str, str]] = {}
        self._results: dict[str, JSON] = {}
        self._events: dict[str, list[Event]] = {}
        self._event_count = 0
        self._grown: dict[str, trio.Event] = {}  # set when that task's stream grows
        self._work = trio.Event()  # set (and replaced) when a payload is pushed
        self._workers: set[str] = set()  # registered by a heartbeat, until retired or forgotten
        self._heartbeats: dict[str, float] = {}  # worker: trio time its heartbeat expires
        self._cancel_listeners: list[trio.MemorySendChannel[str]] = []
        self._clock = _Clock()
        self.dead: list[JSON] = []  #: payloads that cannot run, with the reason

    async def ping(self) -> None:
        await _round_trip(self.latency)

    # --- submit and claims --------------------------------------------------------------------

    def _push(self, payload: JSON, *, next_up: bool) -> None:
        self._turns.add(payload["priority"], json.dumps(payload), next_up=next_up)
        self._wake_pollers()

    def _wake(self) -> None:
        self._wake_pollers()

    async def _call(self) -> None:
        await _round_trip(self.latency)

    def _wake_pollers(self) -> None:
        self._work.set()
        self._work = trio.Event()

    async def enqueue(
        self, payload: JSON, *, event_data: JSON, max_running: int | None = None
    ) -> str:
        """Queue a new task with its status and `queued` event; the event's id."""
        await _round_trip(self.latency)
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
            "submitted_at": self._clock.now().isoformat(),
            "priority": payload["priority"],
            "task_type": payload.get("task_type", "background_job"),
        }
        event_id = self._append(tid, "status_changed", event_data)
        self._push(payload, next_up=False)
        return event_id

    async def requeue_payload(self, payload: JSON) -> None:
        await _round_trip(self.latency)
        self._status.setdefault(payload["task_id"], {}).update(
            status=TaskState.QUEUED.value,
            workspace_id=payload["workspace_id"],
            priority=payload["priority"],
        )
        self._push(payload, next_up=True)

    async def claim(self, worker_id: str) -> Claim | None:
        """The next runnable payload (`wsrunner.turns`), leased to `worker_id`."""
        await _round_trip(self.latency)
        self._released = False
        claim = self._turns.claim(self._claims + 1)
        if claim is None:
            return None
        self._claims += 1
        self._inflight.setdefault(worker_id, {})[claim.claim_id] = claim.payload
        return claim

    async def wait_for_work(self) -> bool:
        """True once a payload arrives or a settled claim frees one (since the last claim);
        False after WAKE_BLOCK_S without either."""
        await _round_trip(self.latency)
        if self._released:
            return True
        with trio.move_on_after(WAKE_BLOCK_S) as waited:
            await self._work.wait()
        return not waited.cancelled_caught

    def _settle(self, worker_id: str, claim_id: str) -> str | None:
        raw = self._inflight.get(worker_id, {}).pop(claim_id, None)
        if self._turns.release(claim_id):
            self._released = True
            self._wake_pollers()
        return raw

    async def ack(self, worker_id: str, claim_id: str) -> None:
        await _round_trip(self.latency)
        self._settle(worker_id, claim_id)

    async def requeue_claim(self, worker_id: str, claim_id: str, priority: str) -> bool:
        """Move a claim back to the front of its line; False if `worker_id` does not hold it."""
        await _round_trip(self.latency)
        raw = self._settle(worker_id, claim_id)
        if raw is None:
            return False
        self._turns.add(priority, raw, next_up=True)
        self._wake_pollers()
        return True

    async def dead_letter(self, worker_id: str, claim_id: str, reason: str) -> None:
        await _round_trip(self.latency)
        raw = self._settle(worker_id, claim_id)
        if raw is not None:
            self.dead.append(
                {
                    "payload": raw,
                    "reason": reason,
                    "worker_id": worker_id,
                    "dead_lettered_at": self._clock.now().isoformat(),
                }
            )

    async def inflight(self, worker_id: str) -> dict[str, str]:
        await _round_trip(self.latency)
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
        """Compare-and-set the mirror; if applied, also emit `event`, keep `result` and ack.
        The event `then` (kind, data) follows either way. (applied, event id or current status).

        A task the mirror does not know accepts any move: the store has already decided it.
        """
        await _round_trip(self.latency)
        current = self._status.get(task_id, {}).get("status")
        allowed = {target.value, *(s.value for s in sources_of(target))}
        if current is not None and current not in allowed:
            applied, out = False, current
        else:
            self._status.setdefault(task_id, {}).update(fields or {}, status=target.value)
            out = "" if event is None else self._append(task_id, "status_changed", event)
            if result is not None:
                self._results[task_id] = _copy(result)
            if ack is not None:
                self._settle(*ack)
            applied = True
        if then is not None:
            self._append(task_id, *then)
        return applied, out

    def _append(self, task_id: str, kind: str, data: JSON) -> str:
        self._event_count += 1
        event = Event(
            id=f"{self._event_count}-0",
            type=kind,
            task_id=task_id,
            data=_copy(data),
            timestamp=self._clock.now().isoformat(),
        )
        self._events.setdefault(task_id, []).append(event)
        grown = self._grown.pop(task_id, None)
        if grown is not None:
            grown.set()
        return event.id

    async def emit(self, task_id: str, kind: str, data: JSON) -> str:
        await _round_trip(self.latency)
        return self._append(task_id, kind, data)

    async def read_events(
        self, task_id: str, after: str = "0-0", *, block_ms: int | None = None, count: int = 500
    ) -> list[Event]:
        """Events after `after`, oldest first; with `block_ms`, wait that long for one."""
        await _round_trip(self.latency)

        def newer() -> list[Event]:
            seq = _event_seq(after)
            return [e for e in self._events.get(task_id, []) if _event_seq(e.id) > seq][:count]

        found = newer()
        if not found and block_ms is not None:
            with trio.move_on_after(block_ms / 1000):
                await self._grown.setdefault(task_id, trio.Event()).wait()
            found = newer()
        return found

    async def depths(self) -> dict[str, int]:
        await _round_trip(self.latency)
        return {p.value: self._turns.depth(p.value) for p in PRIORITY_ORDER}

    async def statuses(self, task_ids: Iterable[str]) -> dict[str, str | None]:
        await _round_trip(self.latency)
        return {t: self._status.get(t, {}).get("status") for t in task_ids}

    # --- for tests: what the mirror holds, beyond what the port reads -------------------------

    def mirrored(self, task_id: str) -> dict[str, str]:
        """The task's status hash: its status and the fields written with it."""
        return dict(self._status.get(task_id, {}))

    def mirrored_result(self, task_id: str) -> JSON | None:
        """The result the mirror keeps for the reference system's readers."""
        found = self._results.get(task_id)
        return None if found is None else _copy(found)

    # --- daemons ------------------------------------------------------------------------------

    async def heartbeat(self, worker_id: str, running: Iterable[str], ttl_s: float) -> None:
        """Register `worker_id` and renew its heartbeat for `ttl_s`, in whole seconds as the
        Redis key's TTL (at least 1)."""
        await _round_trip(self.latency)
        self._workers.add(worker_id)
        self._heartbeats[worker_id] = trio.current_time() + max(1, math.ceil(ttl_s))

    def _alive(self, worker_id: str) -> bool:
        return self._heartbeats.get(worker_id, -math.inf) > trio.current_time()

    async def retire(self, worker_id: str) -> None:
        await _round_trip(self.latency)
        self._heartbeats.pop(worker_id, None)
        self._workers.discard(worker_id)

    async def dead_workers(self) -> list[str]:
        """Registered daemons whose heartbeat has expired."""
        await _round_trip(self.latency)
        return sorted(w for w in self._workers if not self._alive(w))

    async def is_alive(self, worker_id: str) -> bool:
        await _round_trip(self.latency)
        return self._alive(worker_id)

    async def forget_worker(self, worker_id: str) -> None:
        """Unregister a dead daemon once it holds no claims."""
        await _round_trip(self.latency)
        if not self._inflight.get(worker_id):
            self._workers.discard(worker_id)

    # --- cancellation -------------------------------------------------------------------------

    async def publish_cancel(self, task_id: str) -> None:
        """Tell every listener, as pub/sub does: a listener that cannot take it misses it."""
        await _round_trip(self.latency)
        for send in list(self._cancel_listeners):
            try:
                send.send_nowait(task_id)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # as with Redis pub/sub; the cancel watch's sweep is the backstop

    async def serve_cancel_listener(
        self, send: trio.MemorySendChannel[str], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._cancel_listeners.append(send)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._cancel_listeners.remove(send)
