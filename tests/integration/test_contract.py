"""One contract, two backends: Redis + PostgreSQL, and the embedded queue + SQLite.

Every test here runs against both, through the same daemon and service, so the backends cannot
drift apart: lifecycle, events and their resume, priorities, cancellation, timeouts,
idempotency, tokens, listing, and what survives a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import cmd, host_pids, task_body, unique_seconds, wait_for, wait_terminal
from wsrunner.daemon import Daemon
from wsrunner.errors import AuthenticationError, IdempotencyConflictError, InvalidTransitionError
from wsrunner.models import TaskState

BACKENDS = ("redis+postgres", "embedded")


@pytest.fixture(name="backend", params=BACKENDS)
def _backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Settings overrides selecting one backend (the test's own state directory if embedded)."""
    if request.param == "embedded":
        return {"backend": "embedded", "state_dir": tmp_path / "state", "database_url": ""}
    return {}


async def started(daemon: Daemon, task_id: str) -> bool:
    return any(e.type == "output" for e in await daemon.service.events(task_id))


async def test_a_task_runs_and_its_events_replay_from_any_point(start_daemon, backend) -> None:
    daemon = await start_daemon(**backend)
    sub = await daemon.service.submit(task_body(cmd("echo one; echo two >&2"), cmd("exit 3")))
    rec = await wait_terminal(daemon, sub.record.id)
    assert rec.status is TaskState.FAILED and rec.attempts == 1
    steps = rec.result["result"]["steps"]
    assert steps[0]["result"]["stdout"] == "one\n" and steps[1]["result"]["exit_code"] == 3

    # The record ends first; the terminal event follows it (Redis: right after PostgreSQL).
    async def ended() -> list[Any] | None:
        got = await daemon.service.events(rec.id)
        return (
            got if got[-1].type == "status_changed" and got[-1].data["status"] == "failed" else None
        )

    events = await wait_for(ended, timeout=5)
    kinds = [e.type for e in events]
    assert kinds[0] == "status_changed" and kinds[-1] == "status_changed"
    # The first step's progress rides with the start (one Redis round trip), right after it.
    assert (events[1].data["status"], events[2].type, events[2].data["step"]) == (
        "running",
        "progress_update",
        1,
    )
    assert [e.data["status"] for e in events if e.type == "status_changed"] == [
        "queued",
        "running",
        "failed",
    ]
    middle = events[len(events) // 2]
    assert await daemon.service.events(rec.id, middle.id) == events[len(events) // 2 + 1 :]
    assert await daemon.service.events(rec.id, events[-1].id) == []


async def test_a_blocking_read_wakes_on_the_next_event(start_daemon, backend) -> None:
    daemon = await start_daemon(**backend)
    sub = await daemon.service.submit(task_body(cmd("sleep 0.5; echo late")))
    first = await daemon.service.events(sub.record.id)
    seen = list(first)
    with trio.fail_after(20):
        while not any(e.type == "status_changed" and e.data["status"] == "completed" for e in seen):
            seen += await daemon.service.events(sub.record.id, seen[-1].id, block_ms=5000)
    assert any(e.type == "output" and e.data["data"] == "late\n" for e in seen)


async def test_strict_priority_and_fifo(start_daemon, backend) -> None:
    daemon = await start_daemon(concurrency=1, **backend)
    blocker = await daemon.service.submit(task_body(cmd("sleep 1")))
    await wait_for(lambda: blocker.record.id in daemon.runner.running)
    order = []
    for prio in ("low", "normal", "critical", "high", "critical"):
        order.append(
            (prio, (await daemon.service.submit(task_body(cmd("true"), priority=prio))).record.id)
        )
    recs = [await wait_terminal(daemon, tid) for _, tid in order]
    started_at = {r.id: r.started_at for r in recs}
    ranked = sorted(order, key=lambda p: started_at[p[1]])
    assert [p for p, _ in ranked] == ["critical", "critical", "high", "normal", "low"]
    assert ranked[0][1] == order[2][1]  # the first critical before the second


async def test_cancel_and_timeout(start_daemon, backend) -> None:
    daemon = await start_daemon(**backend)
    t = unique_seconds()
    running = await daemon.service.submit(
        task_body(cmd(f"echo go; sleep {t}"), timeout_seconds=600)
    )
    await wait_for(lambda: started(daemon, running.record.id))
    assert (await daemon.service.cancel(running.record.id)).status is TaskState.CANCELLED
    await wait_for(lambda: not host_pids(t), timeout=10)
    with pytest.raises(InvalidTransitionError):
        await daemon.service.cancel(running.record.id)
    slow = await daemon.service.submit(task_body(cmd("sleep 60"), timeout_seconds=10))
    rec = await wait_terminal(daemon, slow.record.id, timeout=30)
    assert rec.status is TaskState.TIMED_OUT and "timed out after" in rec.error_message
    for rid in (running.record.id, slow.record.id):

        async def ends(rid: str = rid) -> list[Any]:
            return [
                e
                for e in await daemon.service.events(rid)
                if e.type == "status_changed" and e.data["status"] not in ("queued", "running")
            ]

        await wait_for(ends, timeout=5)  # the terminal event follows the record
        assert len(await ends()) == 1


async def test_readiness_names_the_backend(start_daemon, backend) -> None:
    daemon = await start_daemon(**backend)
    checks = await daemon.service.checks()
    names = ["embedded-store"] if backend else ["redis", "postgres"]
    assert checks == dict.fromkeys([*names, "volume", "sandbox"], "ok")


async def test_idempotency_keys(start_daemon, backend) -> None:
    daemon = await start_daemon(**backend)
    body = task_body(cmd("true"), idempotency_key="k-1")
    first = await daemon.service.submit(body)
    again = await daemon.service.submit(body)
    assert again.record.id == first.record.id and not again.created
    with pytest.raises(IdempotencyConflictError):
        await daemon.service.submit(task_body(cmd("false"), idempotency_key="k-1"))


async def test_tokens_and_listing(start_daemon, backend) -> None:
    daemon = await start_daemon(**backend)
    record, secret = await daemon.service.tokens.create("ci", ["ws-a"])
    assert (await daemon.service.tokens.authenticate(secret)).workspaces == ("ws-a",)
    ids = [
        (await daemon.service.submit(task_body(cmd("true"), workspace_id=ws))).record.id
        for ws in ("ws-a", "ws-b", "ws-a")
    ]
    for tid in ids:
        await wait_terminal(daemon, tid)
    mine = await daemon.service.list(scope=record)
    assert [r.id for r in mine] == [ids[2], ids[0]]  # newest first, in scope only
    [last] = await daemon.service.list(limit=1)
    rest = await daemon.service.list(limit=10, before=(last.submitted_at, last.id))
    assert [r.id for r in rest] == [ids[1], ids[0]]
    await daemon.service.tokens.revoke(record.id)
    await trio.sleep(5.1)  # the registry caches a token for 5 s
    with pytest.raises(AuthenticationError):
        await daemon.service.tokens.authenticate(secret)


async def test_queued_and_running_tasks_survive_a_restart(start_daemon, backend) -> None:
    first = await start_daemon(concurrency=1, shutdown_grace_s=0.5, **backend)
    running = await first.service.submit(
        task_body(
            cmd("if [ -e resumed ]; then echo second; else touch resumed; echo first; sleep 30; fi")
        )
    )
    await wait_for(lambda: started(first, running.record.id))
    queued = await first.service.submit(task_body(cmd("echo waited"), workspace_id="ws-2"))
    first.stop()
    with trio.fail_after(30):
        while first.runner.running:
            await trio.sleep(0.05)
    await trio.sleep(0.5)  # the old daemon's services wind down
    second = await start_daemon(concurrency=1, **backend)
    a = await wait_terminal(second, running.record.id, timeout=60)
    b = await wait_terminal(second, queued.record.id, timeout=60)
    assert a.status is TaskState.COMPLETED and a.attempts == 2
    assert a.result["result"]["steps"][0]["result"]["stdout"] == "second\n"
    assert b.status is TaskState.COMPLETED and b.attempts == 1
