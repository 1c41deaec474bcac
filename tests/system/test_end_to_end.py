"""A task from submit to its terminal state, against real Redis, PostgreSQL and processes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
import trio

from tests.conftest import cmd, raw_payload, task_body, wait_for, wait_terminal
from wsrunner.daemon import Daemon
from wsrunner.models import TaskState


async def test_submitted_task_completes_with_durable_result(
    daemon: Daemon, redis_client: redis.Redis
) -> None:
    sub = await daemon.service.submit(
        task_body(cmd("echo out; echo err >&2"), cmd("printf second"))
    )
    assert sub.created and sub.record.status is TaskState.QUEUED
    rec = await wait_terminal(daemon, sub.record.id)
    assert rec.status is TaskState.COMPLETED
    steps = rec.result["result"]["steps"]
    assert [s["result"]["exit_code"] for s in steps] == [0, 0]
    assert steps[0]["result"]["stdout"] == "out\n" and steps[0]["result"]["stderr"] == "err\n"
    assert steps[1]["result"]["stdout"] == "second"
    assert rec.worker_id == daemon.settings.worker_id and rec.attempts == 1
    assert rec.execution_time_ms is not None and rec.started_at and rec.completed_at
    # The Redis mirror agrees, with the reference system's keys.
    keys = daemon.service.queue.keys  # type: ignore[attr-defined]
    assert redis_client.hget(keys.status(rec.id), "status") == "completed"
    assert 0 < redis_client.ttl(keys.status(rec.id)) <= 7200
    assert json.loads(redis_client.get(keys.result(rec.id)))["status"] == "completed"
    assert not redis_client.sismember(keys.active("ws-1"), rec.id)
    assert redis_client.hlen(keys.inflight(daemon.settings.worker_id)) == 0


async def test_events_are_stored_in_order_and_end_with_status(daemon: Daemon) -> None:
    sub = await daemon.service.submit(task_body(cmd("echo hi"), cmd("exit 3")))
    await wait_terminal(daemon, sub.record.id)
    events = await daemon.service.events(sub.record.id)
    kinds = [(e.type, e.data.get("status") or e.data.get("step")) for e in events]
    assert kinds[0] == ("status_changed", "queued")
    assert kinds[1] == ("status_changed", "running")
    assert ("progress_update", 1) in kinds and ("progress_update", 2) in kinds
    assert ("output", 1) in kinds
    assert ("error", 2) in kinds
    assert kinds[-1] == ("status_changed", "failed")
    ids = [tuple(map(int, e.id.split("-"))) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # Replay from an event id returns only what came after it.
    later = await daemon.service.events(sub.record.id, after=events[2].id)
    assert [e.id for e in later] == [e.id for e in events[3:]]


async def test_the_start_is_mirrored_while_the_command_runs_and_its_event_comes_first(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first command starts once PostgreSQL has the start, while Redis takes it; the
    task's own events wait for it, and its end is mirrored after it."""
    queue = daemon.runner.queue
    real = queue.transition
    mirrored: list[float] = []

    async def slow(task_id: str, workspace_id: str, target: TaskState, **kw: Any) -> Any:
        if target is TaskState.RUNNING:
            await trio.sleep(0.5)
            mirrored.append(time.time())
        return await real(task_id, workspace_id, target, **kw)

    monkeypatch.setattr(queue, "transition", slow)
    sub = await daemon.service.submit(task_body(cmd("date +%s.%N; echo hi"), cmd("exit 3")))
    rec = await wait_terminal(daemon, sub.record.id)
    assert rec.status is TaskState.FAILED
    began = float(rec.result["result"]["steps"][0]["result"]["stdout"].split()[0])
    assert began < mirrored[0] - 0.2  # the command did not wait for Redis
    events = await daemon.service.events(sub.record.id)
    kinds = [(e.type, e.data.get("status") or e.data.get("step")) for e in events]
    assert kinds == [
        ("status_changed", "queued"),
        ("status_changed", "running"),
        ("progress_update", 1),
        ("output", 1),
        ("progress_update", 2),
        ("error", 2),
        ("status_changed", "failed"),
    ]


async def test_a_task_whose_start_redis_has_not_taken_yet_is_not_taken_for_lost(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel watch's sweep (every second) reads each running task's Redis status; until
    the start is mirrored that is still `queued`, which must not read as a takeover."""
    queue = daemon.runner.queue
    real = queue.transition

    async def slow(task_id: str, workspace_id: str, target: TaskState, **kw: Any) -> Any:
        if target is TaskState.RUNNING:
            await trio.sleep(2.5)  # two sweeps go by
        return await real(task_id, workspace_id, target, **kw)

    monkeypatch.setattr(queue, "transition", slow)
    sub = await daemon.service.submit(task_body(cmd("sleep 3; echo done")))
    rec = await wait_terminal(daemon, sub.record.id, timeout=20)
    assert rec.status is TaskState.COMPLETED and rec.attempts == 1
    assert rec.result["result"]["steps"][0]["result"]["stdout"] == "done\n"


async def test_nonzero_exit_is_a_step_error_and_fails_the_task(daemon: Daemon) -> None:
    sub = await daemon.service.submit(task_body(cmd("exit 7"), cmd("echo still runs")))
    rec = await wait_terminal(daemon, sub.record.id)
    assert rec.status is TaskState.FAILED
    steps = rec.result["result"]["steps"]
    assert steps[0]["result"]["exit_code"] == 7 and steps[0]["result"]["error"] == "exit code 7"
    assert steps[1]["result"]["stdout"] == "still runs\n"  # stop_on_error defaults to false
    assert "step 1 of 2" in rec.error_message


async def test_stop_on_error_skips_the_remaining_steps(daemon: Daemon) -> None:
    sub = await daemon.service.submit(
        task_body(cmd("false"), cmd("echo never"), stop_on_error=True)
    )
    rec = await wait_terminal(daemon, sub.record.id)
    assert rec.status is TaskState.FAILED and len(rec.result["result"]["steps"]) == 1


async def test_payload_pushed_by_a_legacy_producer_runs_and_gets_a_row(
    daemon: Daemon, redis_client: redis.Redis
) -> None:
    keys = daemon.service.queue.keys  # type: ignore[attr-defined]
    payload = raw_payload()
    redis_client.lpush(keys.queue("normal"), payload)
    task_id = json.loads(payload)["task_id"]

    async def recorded() -> bool:
        try:
            return (await daemon.service.get(task_id)).status.terminal
        except Exception:
            return False

    await wait_for(recorded)
    rec = await daemon.service.get(task_id)
    assert rec.status is TaskState.COMPLETED
    assert rec.result["result"]["steps"][0]["result"]["stdout"] == "hello\n"
