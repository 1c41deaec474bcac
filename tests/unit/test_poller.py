"""The poller: claims only for an idle slot, stops on its event, and hands back a late claim."""

from __future__ import annotations

import json

import pytest
import trio

from tests.unit.conftest import ended, submit, until
from wsrunner.engine.poller import serve_poller
from wsrunner.engine.runner import TaskRunner
from wsrunner.engine.slots import Slots
from wsrunner.models import TaskState
from wsrunner.service import Service
from wsrunner.testing import FakeExecutor, MemoryQueue, MemoryStore


async def test_it_claims_only_when_a_slot_is_idle(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
) -> None:
    first = await submit(service, "sleep 10")
    second = await submit(service, "sleep 10")
    slots, stopping = Slots(1, runner), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(slots.serve)
        await nursery.start(serve_poller, queue, slots, runner.worker_id, stopping)
        await trio.sleep(9)
        [payload] = (await queue.inflight(runner.worker_id)).values()
        assert json.loads(payload)["task_id"] == first
        assert (await queue.depths())["normal"] == 1
        await until(lambda: ended(store, first))
        await until(lambda: second in runner.running)
        assert (await queue.depths())["normal"] == 0
        stopping.set()
    assert (await store.get(second)).status is TaskState.COMPLETED


async def test_it_stops_on_its_event_without_waiting_out_the_idle_block(
    runner: TaskRunner, queue: MemoryQueue
) -> None:
    slots, stopping = Slots(2, runner), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(slots.serve)
        await nursery.start(serve_poller, queue, slots, runner.worker_id, stopping)
        await trio.sleep(1)
        stopping.set()
    # The poller returned and closed the slots, whose loops then ended: the nursery is done.
    assert trio.current_time() == pytest.approx(1)  # not WAKE_BLOCK_S, the idle wait's bound


async def test_a_claim_taken_while_stopping_is_handed_back(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
) -> None:
    tid = await submit(service, "echo never")
    queue.latency = 1.0  # the claim is on its way while the stop begins
    handed_back: list[None] = []
    slots, stopping = Slots(1, runner), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(slots.serve)
        await nursery.start(
            serve_poller, queue, slots, runner.worker_id, stopping, lambda: handed_back.append(None)
        )
        await trio.sleep(0.5)
        stopping.set()
    assert handed_back == [None] and executor.runs == []
    assert await queue.inflight(runner.worker_id) == {}
    assert (await queue.depths())["normal"] == 1
    assert (await store.get(tid)).status is TaskState.QUEUED
