"""Leases and the reaper: a dead daemon's tasks go back to the queue (or fail after
max_attempts), a live one's are left alone; every expiry is measured on the mock clock."""

from __future__ import annotations

import json
from dataclasses import replace

import trio

from tests.unit.conftest import ended, run_next, status_changes, submit, until
from wsrunner.engine.leases import Reaper, serve_heartbeat
from wsrunner.engine.runner import TaskRunner
from wsrunner.models import TaskState
from wsrunner.payload import parse_task
from wsrunner.service import Service
from wsrunner.settings import Settings
from wsrunner.testing import FakeExecutor, FakeWorkspaces, MemoryQueue, MemoryStore

OTHER = "unit-b"  #: another daemon, which dies in these tests (the reaper runs as unit-a)


async def started_by(worker: str, queue: MemoryQueue, store: MemoryStore) -> str:
    """Daemon `worker` claims the next task, records its start and heartbeats once (a lease of
    lease_ttl_s = 3 s); then, unless the test says otherwise, it is gone. The task's id."""
    claim = await queue.claim(worker)
    assert claim is not None
    spec = parse_task(json.loads(claim.payload))
    await store.start(spec, worker_id=worker, workspace_path="/workspaces/ws-1")
    await queue.heartbeat(worker, [spec.task_id], ttl_s=3)
    return spec.task_id


async def test_a_dead_daemons_task_is_requeued_once_its_heartbeat_expires(
    service: Service,
    settings: Settings,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
) -> None:
    tid = await submit(service, "echo again")
    await started_by(OTHER, queue, store)
    reaper = Reaper(settings, queue, store)
    await trio.sleep(2.9)
    assert await reaper.reap_dead_workers() == 0
    assert (await store.get(tid)).status is TaskState.RUNNING
    await trio.sleep(0.2)
    assert await reaper.reap_dead_workers() == 1
    rec = await store.get(tid)
    assert rec.status is TaskState.QUEUED and rec.attempts == 1
    assert await queue.statuses([tid]) == {tid: "queued"}
    assert await queue.inflight(OTHER) == {} and await queue.dead_workers() == []
    await run_next(runner, queue)  # the next daemon runs it
    rec = await store.get(tid)
    assert rec.status is TaskState.COMPLETED and rec.attempts == 2
    assert rec.worker_id == runner.worker_id


async def test_a_claim_the_dead_daemon_never_started_is_handed_on(
    service: Service,
    settings: Settings,
    store: MemoryStore,
    queue: MemoryQueue,
) -> None:
    tid = await submit(service, "echo hi")
    assert await queue.claim(OTHER) is not None
    await queue.heartbeat(OTHER, [], ttl_s=3)
    await trio.sleep(3.1)
    assert await Reaper(settings, queue, store).reap_dead_workers() == 1
    assert (await queue.depths())["normal"] == 1 and await queue.inflight(OTHER) == {}
    rec = await store.get(tid)
    assert rec.status is TaskState.QUEUED and rec.attempts == 0


async def test_after_max_attempts_the_task_is_failed(
    service: Service,
    settings: Settings,
    store: MemoryStore,
    queue: MemoryQueue,
) -> None:
    tid = await submit(service, "echo never")
    reaper = Reaper(settings, queue, store)
    for attempt in range(1, settings.max_attempts + 1):
        assert await started_by(OTHER, queue, store) == tid
        await trio.sleep(3.1)
        assert await reaper.reap_dead_workers() == 1
        rec = await store.get(tid)
        assert rec.attempts == attempt
        if attempt < settings.max_attempts:
            assert rec.status is TaskState.QUEUED
    assert rec.status is TaskState.FAILED
    assert rec.error_message.startswith(f"gave up after {settings.max_attempts} attempts")
    assert (await queue.depths())["normal"] == 0 and await queue.inflight(OTHER) == {}
    assert (await status_changes(queue, tid))[-2:] == ["queued", "failed"]


async def test_a_live_daemons_tasks_are_left_alone(
    service: Service,
    settings: Settings,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
    workspaces: FakeWorkspaces,
) -> None:
    """Daemon b runs a task for ten leases, heartbeating; the reaper on a passes all along."""
    tid = await submit(service, "sleep 30")
    other = replace(settings, worker_id=OTHER)
    runner_b = TaskRunner(other, queue, store, workspaces, executor)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_heartbeat, other, queue, store, runner_b)
        await nursery.start(Reaper(settings, queue, store).serve)
        nursery.start_soon(run_next, runner_b, queue)
        await until(lambda: ended(store, tid))
        nursery.cancel_scope.cancel()
    rec = await store.get(tid)
    assert rec.status is TaskState.COMPLETED and rec.attempts == 1 and rec.worker_id == OTHER
    assert len(executor.runs) == 1 and executor.runs[0].ended_at == 30


async def test_the_reaper_loop_frees_a_dead_daemons_task_within_half_a_lease(
    service: Service,
    settings: Settings,
    store: MemoryStore,
    queue: MemoryQueue,
) -> None:
    tid = await submit(service, "echo hi")

    async def requeued() -> bool:
        return (await store.get(tid)).status is TaskState.QUEUED

    async with trio.open_nursery() as nursery:
        await nursery.start(Reaper(settings, queue, store).serve)  # passes at 0, 1.5, 3, 4.5 s
        await trio.sleep(0.5)
        await started_by(OTHER, queue, store)  # its heartbeat runs out at 3.5 s
        await until(requeued)
        nursery.cancel_scope.cancel()
    assert 3.5 < trio.current_time() <= 3.5 + settings.lease_ttl_s / 2 + 0.05
    assert (await queue.depths())["normal"] == 1


async def test_reconcile_requeues_a_running_task_once_its_lease_expires(
    service: Service,
    settings: Settings,
    store: MemoryStore,
    queue: MemoryQueue,
) -> None:
    """The PostgreSQL path, for when Redis lost everything: an empty queue and the store."""
    tid = await submit(service, "echo hi")
    await started_by(OTHER, queue, store)  # its lease: 3 s
    wiped = MemoryQueue()
    reaper = Reaper(settings, wiped, store)
    await trio.sleep(2)
    await store.renew_leases(OTHER, [tid])  # until 5 s
    await trio.sleep(2.9)
    assert await reaper.reconcile(min_age_s=60) == 0
    assert (await store.get(tid)).status is TaskState.RUNNING
    await trio.sleep(0.2)
    assert await reaper.reconcile(min_age_s=60) == 1
    assert (await store.get(tid)).status is TaskState.QUEUED
    claim = await wiped.claim("unit-a")
    assert claim is not None and json.loads(claim.payload)["task_id"] == tid


async def test_reconcile_pushes_a_queued_task_the_queue_lost_once_it_is_old_enough(
    settings: Settings,
    store: MemoryStore,
    queue: MemoryQueue,
) -> None:
    spec = parse_task(
        {"workspace_id": "ws-1", "steps": [{"action": "execute_command", "command": "echo hi"}]},
        task_id="0b6a6d52-3a43-4c8e-9a3c-0d1b7f7e3a11",
    )
    await store.create(spec)  # written, never queued (Redis failed after the insert)
    reaper = Reaper(settings, queue, store)
    await trio.sleep(4.9)
    assert await reaper.reconcile(min_age_s=5) == 0
    await trio.sleep(0.2)
    assert await reaper.reconcile(min_age_s=5) == 1
    assert await reaper.reconcile(min_age_s=5) == 0  # the queue knows it now
    assert (await queue.depths())["normal"] == 1
