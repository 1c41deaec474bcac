"""Slots: at most N tasks run at once, and a slot that frees up takes the next claim."""

from __future__ import annotations

import pytest
import trio

from tests.unit.conftest import ended, submit, until
from wsrunner.engine.poller import serve_poller
from wsrunner.engine.runner import TaskRunner
from wsrunner.engine.slots import Slots, SlotStatistics
from wsrunner.models import TaskState
from wsrunner.service import Service
from wsrunner.testing import FakeExecutor, MemoryQueue, MemoryStore


async def test_at_most_n_run_at_once_and_a_free_slot_takes_the_next(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
) -> None:
    ids = [await submit(service, "sleep 10", workspace_id=f"ws-{i}") for i in range(5)]
    slots, stopping = Slots(2, runner), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(slots.serve)
        await nursery.start(serve_poller, queue, slots, runner.worker_id, stopping)
        await trio.sleep(5)
        assert slots.statistics() == SlotStatistics(total=2, idle=0, running=2)
        assert (await queue.depths())["normal"] == 3  # nothing claimed without a free slot
        for tid in ids:
            await until(lambda tid=tid: ended(store, tid))
        stopping.set()
    assert executor.peak == 2
    # Each slot takes the next claim as soon as its task's steps are over.
    assert [r.started_at for r in executor.runs] == pytest.approx([0, 0, 10, 10, 20])
    assert [(await store.get(t)).status for t in ids] == [TaskState.COMPLETED] * 5
    assert slots.statistics() == SlotStatistics(total=2, idle=2, running=0)


async def test_a_slot_is_freed_by_a_task_that_never_starts(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
) -> None:
    """A claim whose task was cancelled meanwhile gives its slot straight back."""
    cancelled = [await submit(service, "echo never") for _ in range(3)]
    for tid in cancelled:
        await service.cancel(tid)
    last = await submit(service, "echo ran")
    slots, stopping = Slots(1, runner), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(slots.serve)
        await nursery.start(serve_poller, queue, slots, runner.worker_id, stopping)
        await until(lambda: ended(store, last))
        stopping.set()
    assert [r.task_id for r in executor.runs] == [last]
    assert await queue.inflight(runner.worker_id) == {}
