"""The fakes keep the rules of the real adapters where the engine depends on them.

tests/integration/test_contract.py runs the real backends through a served daemon; the fakes cannot join it
there, so their rules are checked here: the lifecycle table of `models.TRANSITIONS` for every
pair of states, ownership, attempts, idempotency, leases and heartbeats on the mock clock.
"""

from __future__ import annotations

import itertools
import json
import uuid

import pytest
import trio

from tests.conftest import cmd
from wsrunner.errors import (
    DuplicateTaskError,
    IdempotencyConflictError,
    InvalidTransitionError,
    NotFoundError,
)
from wsrunner.models import TRANSITIONS, TaskSpec, TaskState
from wsrunner.payload import parse_task, to_payload
from wsrunner.testing import MemoryQueue, MemoryStore

WORKER = "unit-a"
PAIRS = list(itertools.product(TaskState, TaskState))


def spec(**extra: object) -> TaskSpec:
    body = {"workspace_id": "ws-1", "steps": [cmd("echo hi")], **extra}
    return parse_task(body, task_id=str(uuid.uuid4()))


async def task_in(store: MemoryStore, state: TaskState) -> str:
    """A task brought to `state` by legal moves only; its id."""
    s = spec()
    await store.create(s)
    if state is TaskState.QUEUED:
        return s.task_id
    if state is TaskState.CANCELLED:
        await store.transition(s.task_id, state)
        return s.task_id
    await store.start(s, worker_id=WORKER, workspace_path="/w")
    if state is not TaskState.RUNNING:
        await store.finish(
            s.task_id, state, worker_id=WORKER, result={}, error=None, execution_time_ms=1
        )
    return s.task_id


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
async def test_the_store_moves_exactly_as_the_transition_table_says(
    source: TaskState, target: TaskState
) -> None:
    store = MemoryStore()
    tid = await task_in(store, source)
    if target in TRANSITIONS[source]:
        rec = await store.transition(tid, target)
        assert rec.status is target and (await store.get(tid)).status is target
        assert (rec.completed_at is not None) == target.terminal
    else:
        with pytest.raises(InvalidTransitionError) as refused:
            await store.transition(tid, target)
        assert (refused.value.current, refused.value.target) == (source.value, target.value)
        assert (await store.get(tid)).status is source


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
async def test_the_mirror_moves_as_the_table_says_or_stays_where_it_is(
    source: TaskState, target: TaskState
) -> None:
    queue = MemoryQueue()
    await queue.transition("t", "ws-1", source)  # an unknown task takes any state
    applied, said = await queue.transition("t", "ws-1", target, event={"status": target.value})
    assert applied == (target in TRANSITIONS[source] or target is source)
    assert await queue.statuses(["t"]) == {"t": (target if applied else source).value}
    assert said == (source.value if not applied else (await queue.read_events("t"))[-1].id)


async def test_unknown_tasks_and_other_daemons_are_refused() -> None:
    store = MemoryStore()
    with pytest.raises(NotFoundError):
        await store.transition(str(uuid.uuid4()), TaskState.CANCELLED)
    tid = await task_in(store, TaskState.RUNNING)
    with pytest.raises(InvalidTransitionError):
        await store.finish(
            tid, TaskState.COMPLETED, worker_id="unit-b", result={}, error=None, execution_time_ms=1
        )
    with pytest.raises(InvalidTransitionError):
        await store.transition(tid, TaskState.QUEUED, expect_worker="unit-b")
    await store.transition(tid, TaskState.QUEUED, expect_worker=WORKER)


async def test_each_start_is_an_attempt_and_a_result_is_attached_once() -> None:
    store, s = MemoryStore(), spec()
    assert await store.start(s, worker_id=WORKER, workspace_path="/w") == 1  # no record yet
    with pytest.raises(InvalidTransitionError, match="is running"):
        await store.start(s, worker_id="unit-b", workspace_path="/w")
    await store.transition(s.task_id, TaskState.QUEUED)
    assert await store.start(s, worker_id="unit-b", workspace_path="/w") == 2
    await store.transition(s.task_id, TaskState.CANCELLED)
    await store.attach_result(s.task_id, {"n": 1}, 5)
    await store.attach_result(s.task_id, {"n": 2}, 6)
    rec = await store.get(s.task_id)
    assert (rec.result, rec.execution_time_ms, rec.cancel_requested) == ({"n": 1}, 5, True)


async def test_an_idempotency_key_returns_the_first_task_or_refuses_another_body() -> None:
    store = MemoryStore()
    first, created = await store.create(spec(idempotency_key="k"))
    again, created_again = await store.create(spec(idempotency_key="k"))
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflictError):
        await store.create(spec(idempotency_key="k", priority="high"))
    with pytest.raises(DuplicateTaskError) as duplicate:
        await store.start(spec(idempotency_key="k"), worker_id=WORKER, workspace_path="/w")
    assert duplicate.value.original_id == first.id


async def test_leases_expire_on_the_mock_clock_unless_renewed() -> None:
    store = MemoryStore(lease_s=10)
    tid = await task_in(store, TaskState.RUNNING)
    await trio.sleep(9)
    assert await store.expired_running() == []
    await store.renew_leases(WORKER, [tid])
    await store.renew_leases("unit-b", [tid])  # not its task: no renewal
    await trio.sleep(9.5)
    assert await store.expired_running() == []
    await store.renew_leases("unit-b", [tid])
    await trio.sleep(1)
    assert [r.id for r in await store.expired_running()] == [tid]


async def test_claims_are_strict_priority_then_fifo_and_a_requeued_one_comes_first() -> None:
    queue = MemoryQueue()
    specs = [
        spec(priority=p, workspace_id=f"ws-{i}")
        for i, p in enumerate(("low", "normal", "critical", "normal"))
    ]
    for s in specs:
        await queue.enqueue(to_payload(s), event_data={"status": "queued"})
    order = []
    while (claim := await queue.claim(WORKER)) is not None:
        order.append(json.loads(claim.payload)["task_id"])
    assert order == [specs[i].task_id for i in (2, 1, 3, 0)]
    assert len(await queue.inflight(WORKER)) == 4
    await queue.enqueue(to_payload(spec(workspace_id="ws-9")), event_data={})
    [(claim_id, _)] = [c for c in (await queue.inflight(WORKER)).items() if "normal:2" in c[0]]
    assert await queue.requeue_claim(WORKER, claim_id, "normal")
    assert not await queue.requeue_claim(WORKER, claim_id, "normal")  # not held any more
    again = await queue.claim(WORKER)
    assert again is not None and json.loads(again.payload)["task_id"] == specs[1].task_id


async def test_a_blocking_read_waits_for_the_next_event_and_ids_increase() -> None:
    queue = MemoryQueue()
    first = await queue.emit("t", "output", {"n": 1})
    assert await queue.read_events("t", first, block_ms=60_000) == []
    assert trio.current_time() == pytest.approx(60)  # nothing came: it waited block_ms

    async def emit_later() -> None:
        await trio.sleep(1)
        await queue.emit("t", "output", {"n": 2})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(emit_later)
        [event] = await queue.read_events("t", first, block_ms=60_000)
    assert trio.current_time() == pytest.approx(61)
    assert event.data == {"n": 2} and int(event.id.split("-")[0]) > int(first.split("-")[0])


async def test_heartbeats_expire_and_a_daemon_is_forgotten_once_it_holds_no_claims() -> None:
    queue = MemoryQueue()
    await queue.heartbeat(WORKER, [], ttl_s=2.5)  # a whole-second TTL, as Redis keeps it: 3 s
    await queue.enqueue(to_payload(spec()), event_data={})
    claim = await queue.claim(WORKER)
    await trio.sleep(2.9)
    assert await queue.is_alive(WORKER) and await queue.dead_workers() == []
    await trio.sleep(0.2)
    assert not await queue.is_alive(WORKER) and await queue.dead_workers() == [WORKER]
    await queue.forget_worker(WORKER)
    assert await queue.dead_workers() == [WORKER]  # it still holds a claim
    assert claim is not None
    await queue.ack(WORKER, claim.claim_id)
    await queue.forget_worker(WORKER)
    assert await queue.dead_workers() == []
