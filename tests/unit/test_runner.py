"""TaskRunner: steps in order under the task's deadline, and the one state each run ends in."""

from __future__ import annotations

import json

import pytest
import trio

from tests.conftest import cmd
from tests.unit.conftest import run_next, status_changes, submit, until
from wsrunner.engine.leases import serve_cancel_watch
from wsrunner.engine.runner import StopReason, TaskRunner
from wsrunner.models import TaskState
from wsrunner.service import Service
from wsrunner.settings import Settings
from wsrunner.testing import FakeExecutor, FakeWorkspaces, MemoryQueue, MemoryStore


async def test_the_steps_run_in_order_and_the_task_completes(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
    workspaces: FakeWorkspaces,
) -> None:
    tid = await submit(service, "echo one", "sleep 2; echo two")
    await run_next(runner, queue)
    rec = await store.get(tid)
    assert rec.status is TaskState.COMPLETED and rec.attempts == 1 and rec.error_message is None
    steps = rec.result["result"]["steps"]
    assert [s["result"]["stdout"] for s in steps] == ["one\n", "two\n"]
    assert [(r.started_at, r.ended_at) for r in executor.runs] == [(0, 0), (0, 2)]
    assert await status_changes(queue, tid) == ["queued", "running", "completed"]
    assert await queue.statuses([tid]) == {tid: "completed"}
    assert queue.mirrored_result(tid) == rec.result
    assert await queue.inflight(runner.worker_id) == {} and workspaces.open == set()


@pytest.mark.parametrize(("stop_on_error", "ran"), [(True, 2), (False, 3)])
async def test_stop_on_error_stops_after_the_first_failed_step(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
    stop_on_error: bool,
    ran: int,
) -> None:
    tid = await submit(service, "true", "exit 3", "echo after", stop_on_error=stop_on_error)
    await run_next(runner, queue)
    rec = await store.get(tid)
    assert rec.status is TaskState.FAILED
    assert rec.error_message == "step 2 of 3 (execute_command) failed: exit code 3"
    assert len(executor.runs) == len(rec.result["result"]["steps"]) == ran


async def test_a_step_timeout_fails_that_step_and_the_next_one_runs(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
) -> None:
    body = {"workspace_id": "ws-1", "steps": [cmd("sleep 30", timeout=1), cmd("echo after")]}
    tid = (await service.submit(body)).record.id
    await run_next(runner, queue)
    rec = await store.get(tid)
    first, second = (s["result"] for s in rec.result["result"]["steps"])
    assert first["timed_out"] is True and first["error"].startswith("timed out after 1s")
    assert second["stdout"] == "after\n"
    assert rec.status is TaskState.FAILED  # a step's own timeout fails the step, not the task
    assert [r.outcome for r in executor.runs] == ["timed out", "exit 0"]
    assert executor.runs[0].ended_at == executor.runs[1].started_at == 1


async def test_the_task_timeout_ends_it_timed_out_and_keeps_the_interrupted_step(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
    workspaces: FakeWorkspaces,
) -> None:
    tid = await submit(service, "echo started; sleep 100", "echo never", timeout_seconds=10)
    await run_next(runner, queue)
    assert trio.current_time() == pytest.approx(10)
    rec = await store.get(tid)
    assert rec.status is TaskState.TIMED_OUT
    assert rec.error_message.startswith("timed out after")
    assert "(timeout_seconds=10)" in rec.error_message
    [step] = rec.result["result"]["steps"]
    assert step["result"]["error"] == "interrupted" and step["result"]["stdout"] == "started\n"
    assert [(r.outcome, r.ended_at) for r in executor.runs] == [("interrupted", 10)]
    assert await status_changes(queue, tid) == ["queued", "running", "timed_out"]
    assert await queue.inflight(runner.worker_id) == {} and workspaces.open == set()


async def test_a_cancel_mid_step_ends_it_cancelled_at_once(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
    settings: Settings,
) -> None:
    tid = await submit(service, "echo started; sleep 100", timeout_seconds=600)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_cancel_watch, settings, queue, runner)
        nursery.start_soon(run_next, runner, queue)
        await trio.sleep(2)
        assert (await service.cancel(tid)).status is TaskState.CANCELLED
        await until(lambda: not runner.running)
        nursery.cancel_scope.cancel()
    assert [(r.outcome, r.ended_at) for r in executor.runs] == [("interrupted", 2)]
    rec = await store.get(tid)
    assert rec.status is TaskState.CANCELLED and rec.error_message == "cancelled on request"
    assert rec.result["result"]["steps"][0]["result"]["stdout"] == "started\n"  # attached
    assert await status_changes(queue, tid) == ["queued", "running", "cancelled"]
    assert await queue.inflight(runner.worker_id) == {}


async def test_a_task_ended_elsewhere_keeps_that_state_and_gets_the_result(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
) -> None:
    """The cancel request's message never reaches this daemon (no cancel watch runs): the
    steps run to their end, and the runner's `completed` loses to the recorded `cancelled`."""
    tid = await submit(service, "sleep 5; echo done")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_next, runner, queue)
        await trio.sleep(1)
        await service.cancel(tid)
    assert trio.current_time() == pytest.approx(5)  # the step was not stopped
    rec = await store.get(tid)
    assert rec.status is TaskState.CANCELLED
    assert rec.result["status"] == "completed"  # what the steps did, attached
    assert rec.result["result"]["steps"][0]["result"]["stdout"] == "done\n"
    assert await queue.statuses([tid]) == {tid: "cancelled"}
    assert await status_changes(queue, tid) == ["queued", "running", "cancelled"]
    assert await queue.inflight(runner.worker_id) == {}


async def test_a_task_cancelled_while_queued_never_runs(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
    workspaces: FakeWorkspaces,
) -> None:
    tid = await submit(service, "echo never")
    await service.cancel(tid)
    await run_next(runner, queue)
    assert executor.runs == [] and workspaces.open == set() and workspaces.opened == 1
    rec = await store.get(tid)
    assert rec.status is TaskState.CANCELLED and rec.attempts == 0
    assert await queue.inflight(runner.worker_id) == {}
    assert await status_changes(queue, tid) == ["queued", "cancelled"]


async def test_a_shutdown_puts_the_task_back_at_the_head_of_its_queue(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
) -> None:
    tid = await submit(service, "sleep 100")
    later = await submit(service, "echo later")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_next, runner, queue)
        await until(lambda: tid in runner.running)
        assert runner.stop_task(tid, StopReason.SHUTDOWN)
    rec = await store.get(tid)
    assert rec.status is TaskState.QUEUED and rec.attempts == 1
    assert await status_changes(queue, tid) == ["queued", "running", "queued"]
    assert await queue.inflight(runner.worker_id) == {}
    first = await queue.claim("unit-b")
    assert first is not None and json.loads(first.payload)["task_id"] == tid != later


async def test_a_payload_that_is_not_a_task_is_dead_lettered_and_its_task_failed(
    runner: TaskRunner,
    queue: MemoryQueue,
    executor: FakeExecutor,
) -> None:
    tid = "0b6a6d52-3a43-4c8e-9a3c-0d1b7f7e3a11"
    await queue.requeue_payload({"task_id": tid, "workspace_id": "ws-1", "priority": "normal"})
    await run_next(runner, queue)
    assert executor.runs == [] and len(queue.dead) == 1
    assert await queue.inflight(runner.worker_id) == {}
    assert await queue.statuses([tid]) == {tid: "failed"}


async def test_a_step_that_ended_is_kept_when_a_cancel_stops_the_task_just_after(
    service: Service,
    runner: TaskRunner,
    store: MemoryStore,
    queue: MemoryQueue,
    executor: FakeExecutor,
) -> None:
    tid = await submit(service, "sleep 5; echo done", "sleep 100")
    queue.latency = 0.01  # the output event of the first step takes this long to send
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_next, runner, queue)
        [first] = await until(lambda: executor.runs)
        # The step is over and its output on its way when the cancel comes.
        await trio.sleep_until(first.started_at + 5.005)
        await store.transition(tid, TaskState.CANCELLED, error="cancelled on request")
        assert runner.stop_task(tid, StopReason.CANCEL)
    assert executor.runs[0].outcome == "exit 0"
    rec = await store.get(tid)
    assert rec.status is TaskState.CANCELLED
    assert [s["result"].get("stdout") for s in rec.result["result"]["steps"]] == ["done\n"]
