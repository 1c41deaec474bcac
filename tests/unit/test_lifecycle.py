"""Races between writers of a task's state end in exactly one terminal state, with one
terminal event, and the mirror agrees with the store.

Each race is swept across its window: the store and the queue take `LATENCY` per call, and the
second writer starts at steps of a fraction of that around the first one's moment, so every
interleaving of their calls is tried, on the mock clock, the same way each run.
"""

from __future__ import annotations

from dataclasses import replace

import trio

from tests.unit.conftest import ended, run_next, status_changes, submit, until
from wsrunner.engine.leases import Reaper, serve_cancel_watch
from wsrunner.engine.runner import TaskRunner
from wsrunner.errors import InvalidTransitionError
from wsrunner.models import TaskState
from wsrunner.service import Service
from wsrunner.settings import Settings
from wsrunner.testing import FakeExecutor, FakeWorkspaces, MemoryQueue, MemoryStore

LATENCY = 0.01
#: when the cancel is sent, relative to the end of the steps (it takes two calls to be recorded)
END_OFFSETS = [n * LATENCY / 4 for n in range(-24, 25)]
#: when the cancel is sent, relative to the daemon's first call (the claim)
START_OFFSETS = [n * LATENCY / 4 for n in range(-12, 13)]


class Daemon:
    """One daemon's runner with its cancel watch, over fakes shared with the other writers."""

    def __init__(self, settings: Settings, queue: MemoryQueue, store: MemoryStore) -> None:
        self.settings, self.executor = settings, FakeExecutor()
        self.runner = TaskRunner(settings, queue, store, FakeWorkspaces(), self.executor)  # type: ignore[arg-type]

    async def serve(self, queue: MemoryQueue, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_cancel_watch, self.settings, queue, self.runner)
            task_status.started()
            await run_next(self.runner, queue)
            await until(lambda: not self.runner.running)
            nursery.cancel_scope.cancel()


async def cancel_at(service: Service, task_id: str, when: float) -> None:
    await trio.sleep_until(when)
    await service.cancel(task_id)


async def one_ending(store: MemoryStore, queue: MemoryQueue, task_id: str) -> TaskState:
    """The task's terminal state, once the store, the mirror and the events all agree on it."""
    rec = await until(lambda: ended(store, task_id))
    assert await queue.statuses([task_id]) == {task_id: rec.status.value}
    terminal = [s for s in await status_changes(queue, task_id) if s not in ("queued", "running")]
    assert terminal == [rec.status.value]
    return rec.status


async def test_a_cancel_racing_the_end_of_the_steps(settings: Settings) -> None:
    outcomes = set()
    for offset in END_OFFSETS:
        store, queue = MemoryStore(latency=LATENCY), MemoryQueue(latency=LATENCY)
        service = Service(settings, queue, store)
        tid = await submit(service, "sleep 5; echo done")
        daemon = Daemon(settings, queue, store)
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve, queue)
            [step] = await until(lambda: daemon.executor.runs)  # noqa: B023
            await trio.sleep_until(step.started_at + 5 + offset)
            try:
                await service.cancel(tid)
                refused = False
            except InvalidTransitionError:
                refused = True
        state = await one_ending(store, queue, tid)
        assert state is (TaskState.COMPLETED if refused else TaskState.CANCELLED), offset
        assert (await store.get(tid)).result is not None  # what the steps did, either way
        assert await queue.inflight(settings.worker_id) == {}
        outcomes.add(state)
    assert outcomes == {TaskState.COMPLETED, TaskState.CANCELLED}


async def test_a_cancel_racing_the_start(settings: Settings) -> None:
    """Cancelled before the start is recorded, the task never runs; after, it is stopped."""
    ran = set()
    for offset in START_OFFSETS:
        store, queue = MemoryStore(latency=LATENCY), MemoryQueue(latency=LATENCY)
        service = Service(settings, queue, store)
        tid = await submit(service, "sleep 5")
        daemon = Daemon(settings, queue, store)
        async with trio.open_nursery() as nursery:
            began = trio.current_time() + 1
            nursery.start_soon(cancel_at, service, tid, began + offset)
            await trio.sleep_until(began)
            await nursery.start(daemon.serve, queue)
        assert await one_ending(store, queue, tid) is TaskState.CANCELLED
        assert all(r.outcome == "interrupted" for r in daemon.executor.runs), offset
        assert await queue.inflight(settings.worker_id) == {}
        ran.add(bool(daemon.executor.runs))
    assert ran == {True, False}


async def test_a_daemon_taken_for_dead_leaves_the_task_to_the_one_that_took_it_over(
    settings: Settings,
) -> None:
    """Daemon b runs the task but its heartbeat lapses; the reaper hands the task on and
    daemon a runs it too. Only one of them records an end, and only once."""
    store, queue = MemoryStore(latency=LATENCY), MemoryQueue(latency=LATENCY)
    service = Service(settings, queue, store)
    tid = await submit(service, "sleep 10; echo done")
    a = Daemon(settings, queue, store)
    b = Daemon(replace(settings, worker_id="unit-b"), queue, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, queue)
        await queue.heartbeat("unit-b", [tid], ttl_s=1)  # and never again
        await trio.sleep(2)
        assert await Reaper(settings, queue, store).reap_dead_workers() == 1
        await nursery.start(a.serve, queue)
    assert await one_ending(store, queue, tid) is TaskState.COMPLETED
    rec = await store.get(tid)
    assert rec.attempts == 2 and rec.worker_id == "unit-a"
    assert [r.outcome for r in a.executor.runs] == ["exit 0"]
    assert await queue.inflight("unit-a") == {} and await queue.inflight("unit-b") == {}
