"""Leases: the heartbeat that keeps this daemon's claims, and the reaper that frees a dead one's.

A daemon's lease is its heartbeat key in Redis (TTL `lease_ttl_s`) and, for each running task,
`lease_expires_at` in PostgreSQL; both are renewed every `heartbeat_interval_s`. The reaper:

1. Redis path: for every registered daemon whose heartbeat expired, each claim in its in-flight
   hash is re-queued (head of its queue), or failed after `max_attempts` starts.
2. PostgreSQL path (the source of truth, for when Redis lost data): running tasks whose lease
   expired and whose daemon has no heartbeat are re-queued or failed; queued tasks that Redis
   does not know at all are pushed again. A duplicate payload is harmless: starting a task is a
   compare-and-set from `queued`, so only one copy ever runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import trio

from wsrunner.engine.lifecycle import ClaimRef, Lifecycle
from wsrunner.engine.runner import StopReason, TaskRunner
from wsrunner.errors import NotFoundError, UnavailableError
from wsrunner.models import JSON, Held, TaskRecord, TaskState, TurnsConfig
from wsrunner.payload import validate_task_id
from wsrunner.ports import CancelBus, Queue, RecordLeases, Store
from wsrunner.settings import Settings

logger = logging.getLogger(__name__)


async def serve_heartbeat(
    settings: Settings,
    queue: Queue,
    store: RecordLeases,
    runner: TaskRunner,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Renew this daemon's leases every `heartbeat_interval_s`, forever."""
    first = True
    while True:
        ids = list(runner.running)
        held = [  # what their claims hold, should Redis have lost it
            Held(rt.claim.claim_id, rt.spec.workspace_id, rt.spec.token_id, tid)
            for tid, rt in runner.running.items()
            if not rt.recording
        ]
        try:
            await queue.heartbeat(settings.worker_id, ids, settings.lease_ttl_s)
            await queue.reassert(held)
            await store.renew_leases(settings.worker_id, ids)
        except UnavailableError as exc:
            logger.warning("heartbeat failed: %s", exc)
        if first:
            task_status.started()
            first = False
        await trio.sleep(settings.heartbeat_interval_s)


async def serve_cancel_watch(
    settings: Settings,
    queue: Queue,
    runner: TaskRunner,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Stop local tasks that were cancelled elsewhere: pub/sub for speed, a 1 s sweep as backstop.

    The sweep also catches tasks a reaper handed to another daemon while we looked dead.
    """
    send, recv = trio.open_memory_channel[str](100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_listen, queue, send)

        async def sweep() -> None:
            while True:
                await trio.sleep(1.0)
                # Only tasks whose start Redis has already taken: before that it still says
                # `queued`, which would read as "handed to another daemon".
                mirrored = [tid for tid, rt in runner.running.items() if rt.mirrored.is_set()]
                try:
                    states = await queue.statuses(mirrored)
                except UnavailableError:
                    continue
                for tid, status in states.items():
                    rt = runner.running.get(tid)
                    if rt is None or status is None:
                        continue
                    if status in ("cancelled", "failed", "completed", "timed_out"):
                        runner.stop_task(tid, StopReason.CANCEL)
                    elif status == "queued":
                        runner.stop_task(tid, StopReason.LOST)

        nursery.start_soon(sweep)
        task_status.started()
        async for task_id in recv:
            if runner.stop_task(task_id, StopReason.CANCEL):
                logger.info("cancel request received", extra={"task_id": task_id})


async def _listen(queue: CancelBus, send: trio.MemorySendChannel[str]) -> None:
    while True:
        try:
            await queue.serve_cancel_listener(send)
        except UnavailableError as exc:
            logger.warning("cancel channel lost, resubscribing in 1s: %s", exc)
        await trio.sleep(1.0)


def payload_from_record(rec: TaskRecord) -> JSON:
    """A queue payload rebuilt from the durable record (credentials are never stored)."""
    cfg = rec.configuration
    return {
        "task_id": rec.id,
        "task_type": rec.task_type,
        "workspace_id": rec.workspace_id,
        "agent_id": None,
        "priority": rec.priority.value,
        "timeout_seconds": cfg.get("timeout_seconds", 300),
        "stop_on_error": cfg.get("stop_on_error", False),
        "steps": cfg.get("steps", []),
        "created_at": rec.submitted_at.isoformat(),
        **({"idempotency_key": rec.idempotency_key} if rec.idempotency_key else {}),
        **({"token_id": cfg["token_id"]} if cfg.get("token_id") else {}),
    }


Hook = Callable[[str], None]


class Reaper:
    """Frees the work of dead daemons. Safe to run on every daemon at once.

    The hooks (metrics) hear what it did, each with a fixed label: `on_reap` a dead daemon's
    task recovered ("requeued", or "failed" at max_attempts), `on_requeue` a task put back on
    the queue ("dead_daemon", "missing_from_queue"), `on_dead_letter` a payload it could not
    read ("invalid_json", "invalid_payload").
    """

    def __init__(self, settings: Settings, queue: Queue, store: Store) -> None:
        self.settings, self.queue, self.store = settings, queue, store
        self.lifecycle = Lifecycle(queue, store)
        self.on_reap: Hook | None = None
        self.on_requeue: Hook | None = None
        self.on_dead_letter: Hook | None = None

    @staticmethod
    def _tell(hook: Hook | None, label: str) -> None:
        if hook is not None:
            hook(label)

    def _recovered(self, target: TaskState | None, via: str) -> None:
        if target is not None:
            self._tell(self.on_reap, "requeued" if target is TaskState.QUEUED else "failed")
        if target is TaskState.QUEUED:
            self._tell(self.on_requeue, via)

    async def reap_dead_workers(self) -> int:
        """Redis path; returns how many claims were handled."""
        handled = 0
        for worker in await self.queue.dead_workers():
            if worker == self.settings.worker_id:
                continue
            for claim_id, payload in (await self.queue.inflight(worker)).items():
                handled += 1
                await self._reap_claim(worker, claim_id, payload)
            await self.queue.forget_worker(worker)
        return handled

    async def _reap_claim(self, worker: str, claim_id: str, payload: str) -> None:
        prio = claim_id.split(":", 1)[0]
        kind = "invalid_json"
        try:
            obj = json.loads(payload)
            kind = "invalid_payload"
            task_id = validate_task_id(obj.get("task_id") if isinstance(obj, dict) else None)
        except Exception:
            await self.queue.dead_letter(
                worker, claim_id, "unreadable payload left by a dead daemon"
            )
            self._tell(self.on_dead_letter, kind)
            return
        try:
            rec = await self.store.get(task_id)
        except NotFoundError:  # claimed but never started: just hand it on
            await self._hand_on(worker, claim_id, prio)
            return
        if rec.status is TaskState.RUNNING and rec.worker_id == worker:
            claim = ClaimRef(worker, claim_id, prio)
            target = await self.lifecycle.recovered(
                rec, worker, self.settings.max_attempts, claim=claim
            )
            self._recovered(target, "dead_daemon")
        elif rec.status is TaskState.QUEUED:
            await self._hand_on(worker, claim_id, prio)
        else:  # ended (its ack was lost), or running elsewhere: this copy is spent
            await self.queue.ack(worker, claim_id)

    async def _hand_on(self, worker: str, claim_id: str, prio: str) -> None:
        """Put back a claim the dead daemon had not started."""
        if await self.queue.requeue_claim(worker, claim_id, prio):
            self._tell(self.on_reap, "requeued")
            self._tell(self.on_requeue, "dead_daemon")

    async def configure_turns(self) -> None:
        """Give the queue the claim rules' settings, this host's placement and the tokens'
        running limits: at start, and at each reconcile pass, so that what Redis lost comes
        back and a token's new `max_running` reaches its queued tasks. The workspaces' homes
        (a row per workspace) are read only when Redis has lost them."""
        s = self.settings
        tokens = await self.store.list_tokens()
        config = TurnsConfig(
            workspace_limit=s.workspace_concurrency,
            workspace_limits=dict(s.workspace_concurrencies),
            host=s.host_id,
            volume_shared=s.volume_shared,
            home_unavailable=s.home_unavailable,
            token_limits={t.id: t.limits.max_running for t in tokens if not t.revoked_at},
        )
        if await self.queue.configure(config):
            await self.queue.configure(dataclasses.replace(config, homes=await self.store.homes()))

    async def reconcile(self, min_age_s: float | None = None) -> int:
        """Repair the queue from the durable store; returns how many tasks were re-queued or
        failed. Queued rows younger than `min_age_s` (default: a heartbeat, at least 5 s) are
        left alone, as their submit may still be on its way to the queue."""
        await self.configure_turns()
        n = 0
        for rec in await self.store.expired_running():
            if rec.worker_id and await self.queue.is_alive(rec.worker_id):
                continue  # alive, its PostgreSQL renewals failed for a while: let it finish
            target = await self.lifecycle.recovered(
                rec,
                rec.worker_id or "unknown",
                self.settings.max_attempts,
                payload=payload_from_record(rec),
            )
            self._recovered(target, "dead_daemon")
            n += target is not None
        age = max(5.0, self.settings.heartbeat_interval_s) if min_age_s is None else min_age_s
        stale = await self.store.stale_queued(age_s=age)
        known = await self.queue.statuses(r.id for r in stale)
        for rec in stale:
            if known.get(rec.id) is None:
                logger.warning(
                    "queued task missing from Redis; pushing it again",
                    extra={"task_id": rec.id, "workspace_id": rec.workspace_id},
                )
                await self.queue.requeue_payload(payload_from_record(rec))
                self._tell(self.on_requeue, "missing_from_queue")
                n += 1
        return n

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Reap every half lease, reconcile every `reconcile_interval_s`; first pass at once."""
        task_status.started()
        period = self.settings.lease_ttl_s / 2
        next_reconcile = trio.current_time()
        while True:
            try:
                await self.reap_dead_workers()
                if trio.current_time() >= next_reconcile:
                    await self.reconcile()
                    next_reconcile = trio.current_time() + self.settings.reconcile_interval_s
            except UnavailableError as exc:
                logger.warning("reaper pass failed: %s", exc)
            await trio.sleep(min(period, self.settings.reconcile_interval_s))
