"""Issue 22 with real daemons on Redis and PostgreSQL: one writer per workspace, tenants taking
turns, per-token limits, and what a queued task says about why it waits.

Overlaps are judged on the durable record's stamps. A task frees its workspace when its steps
end, before its end is recorded; `execution_time_ms` runs from just after its `started_at` to
that moment, and the next task's `started_at` is written after it is claimed. So two tasks of
one workspace overlapped if one started before `started_at + execution_time_ms` of the other
(which, if anything, comes a little before the steps' real end).
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta

import httpx
import pytest
import redis
import trio

from tests.conftest import (
    Api,
    cmd,
    raw_payload,
    start_api,
    task_body,
    wait_for,
    wait_terminal,
)
from wsrunner.backends.redis.keys import Keys
from wsrunner.daemon import Daemon
from wsrunner.errors import NotFoundError
from wsrunner.models import Priority, TaskState, TokenLimits


async def spans(daemon: Daemon, ids: list[str]) -> list[tuple[datetime, datetime]]:
    """(started_at, end of its steps) of each task once every one has ended, in start order."""
    out = []
    for tid in ids:
        rec = await wait_terminal(daemon, tid, timeout=120)
        assert rec.status is TaskState.COMPLETED, (rec.status, rec.error_message)
        out.append((rec.started_at, rec.started_at + timedelta(milliseconds=rec.execution_time_ms)))
    return sorted(out)


def overlapping(spans: list[tuple[datetime, datetime]]) -> bool:
    return any(b[0] < a[1] for a, b in itertools.pairwise(spans))


async def known(daemon: Daemon, task_id: str) -> bool:
    try:
        await daemon.service.get(task_id)
    except NotFoundError:  # a producer's payload gets its row when it is claimed
        return False
    return True


async def test_tasks_of_one_workspace_never_overlap_and_of_three_workspaces_do(
    start_daemon, redis_client: redis.Redis, settings
) -> None:
    """Three slots: three tasks of one workspace (two pushed by a reference producer with a
    plain LPUSH, one submitted) run one after another; three tasks of three workspaces run
    together. On the old code the first three overlapped."""
    keys = Keys(settings.redis_prefix)
    pushed = [raw_payload(workspace_id="ws-one", steps=[cmd("sleep 0.5")]) for _ in range(2)]
    for payload in pushed:
        redis_client.lpush(keys.queue("normal"), payload)
    daemon = await start_daemon(concurrency=3)
    one = [json.loads(p)["task_id"] for p in pushed]
    one.append(
        (await daemon.service.submit(task_body(cmd("sleep 0.5"), workspace_id="ws-one"))).record.id
    )
    for tid in one[:2]:
        await wait_for(lambda tid=tid: known(daemon, tid), timeout=30)
    assert not overlapping(await spans(daemon, one))

    three = [
        (await daemon.service.submit(task_body(cmd("sleep 3"), workspace_id=f"ws-{i}"))).record.id
        for i in range(3)
    ]
    together = await spans(daemon, three)
    assert max(start for start, _ in together) < min(end for _, end in together)


async def test_a_workspace_may_allow_more_than_one_writer(start_daemon) -> None:
    daemon = await start_daemon(concurrency=2, workspace_concurrencies={"ws-two": 2})
    ids = [
        (await daemon.service.submit(task_body(cmd("sleep 3"), workspace_id="ws-two"))).record.id
        for _ in range(2)
    ]
    assert overlapping(await spans(daemon, ids))


async def test_a_flood_from_one_tenant_delays_another_by_at_most_a_task_per_slot(
    start_daemon,
) -> None:
    """Tenant A queues 16 tasks over 8 workspaces, then tenant B one. With 2 slots, at most 2
    of A's tasks may start between B's submit and B's start (FIFO started about 14)."""
    daemon = await start_daemon(concurrency=2)
    a, _ = await daemon.service.tokens.create("tenant a", None)
    b, _ = await daemon.service.tokens.create("tenant b", None)
    flood = []
    for i in range(16):
        body = task_body(cmd("sleep 0.3"), workspace_id=f"a-{i % 8}")
        flood.append((await daemon.service.submit(body, scope=a)).record.id)
    mine = (await daemon.service.submit(task_body(cmd("true"), workspace_id="b-1"), scope=b)).record
    ended = await wait_terminal(daemon, mine.id, timeout=120)
    assert ended.status is TaskState.COMPLETED
    starts = [(await daemon.service.get(t)).started_at for t in flood]
    cut_in = [s for s in starts if s is not None and mine.submitted_at < s < ended.started_at]
    assert len(cut_in) <= 2, f"{len(cut_in)} of A's tasks started before B's"
    for tid in flood:
        await wait_terminal(daemon, tid, timeout=60)


async def test_a_queued_task_says_where_it_stands_and_why(api: Api) -> None:
    """Two slots (the API fixture's daemon), both taken: a busy workspace, a token at its
    running limit, and no free slot, each named with the place in line; the CLI shows it."""
    daemon = api.daemon
    _limited, limited_token = await daemon.service.tokens.create(
        "one at a time", None, TokenLimits(max_running=1)
    )
    async with api.client() as c, api.client(limited_token) as lim:

        async def submit(client: httpx.AsyncClient, ws: str, command: str = "sleep 60") -> str:
            r = await client.post(
                "/api/tasks/submit", json=task_body(cmd(command), workspace_id=ws)
            )
            assert r.status_code == 202, r.text
            return str(r.json()["task_id"])

        async def running(tid: str) -> bool:
            return (await c.get(f"/api/tasks/{tid}")).json()["status"] == "running"

        holder = await submit(c, "ws-busy")
        await wait_for(lambda: running(holder))
        behind = await submit(c, "ws-busy")
        first_limited = await submit(lim, "ws-l1")
        await wait_for(lambda: running(first_limited))
        over_limit = await submit(lim, "ws-l2")
        no_slot = await submit(c, "ws-free")

        says = {}
        for tid in (behind, over_limit, no_slot):
            body = (await c.get(f"/api/tasks/{tid}")).json()
            assert body["status"] == "queued"
            says[tid] = body["waiting"]
        assert says[behind]["reason"] == f"workspace busy: task {holder}"
        assert says[over_limit]["reason"] == "token limit: 1 running"
        assert says[no_slot]["reason"] == "no free slot"
        # The API token joined the line first, with two workspaces taking turns; the limited
        # token joined second: its task goes between the two.
        assert [says[t]["position"] for t in (behind, over_limit, no_slot)] == [1, 2, 3]
        running_body = (await c.get(f"/api/tasks/{holder}")).json()
        assert "waiting" not in running_body

        from wsrunner.client import Task
        from wsrunner.client.console import _describe

        shown = _describe(Task.from_json((await c.get(f"/api/tasks/{behind}")).json()))
        assert (
            f"waiting    #{says[behind]['position']} in line; workspace busy: task {holder}"
            in shown
        )

        metrics = await daemon.service.metrics_text()
        assert b'wsrunner_tasks_waiting{reason="workspace_busy"} 1.0' in metrics
        assert b'wsrunner_tasks_waiting{reason="token_limit"} 1.0' in metrics
        assert b'wsrunner_tasks_waiting{reason="no_free_slot"} 1.0' in metrics

        for tid in (holder, behind, first_limited, over_limit, no_slot):
            await c.post(f"/api/tasks/{tid}/cancel")


async def test_token_limits_refuse_priorities_and_waiting_past_the_limit(api: Api) -> None:
    daemon = api.daemon
    _, plain = await daemon.service.tokens.create("plain", None)
    _, granted = await daemon.service.tokens.create(
        "granted", None, TokenLimits(max_priority=Priority.CRITICAL)
    )
    _, capped = await daemon.service.tokens.create("capped", None, TokenLimits(max_queued=2))
    body = task_body(cmd("true"), priority="critical")
    async with api.client(plain) as p, api.client(granted) as g, api.client(capped) as q:
        r = await p.post("/api/tasks/submit", json=body)
        assert r.status_code == 403, r.text
        problem = r.json()
        assert problem["type"].endswith("/priority-refused")
        assert problem["errors"][0]["field"] == "priority" and problem["max_priority"] == "high"
        assert (
            await p.post("/api/tasks/submit", json=task_body(cmd("true"), priority="high"))
        ).status_code == 202
        assert (await g.post("/api/tasks/submit", json=body)).status_code == 202

        first = (
            await q.post("/api/tasks/submit", json=task_body(cmd("sleep 60"), workspace_id="ws-q"))
        ).json()["task_id"]
        await wait_for(lambda: _status_is(daemon, first, TaskState.RUNNING))
        queued = []
        for _ in range(2):
            r = await q.post("/api/tasks/submit", json=task_body(cmd("true"), workspace_id="ws-q"))
            assert r.status_code == 202, r.text
            queued.append(r.json()["task_id"])
        r = await q.post("/api/tasks/submit", json=task_body(cmd("true"), workspace_id="ws-q"))
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) > 0
        assert r.json()["limit"] == "max_queued" and r.json()["value"] == 2
        assert "2 tasks waiting" in r.json()["detail"]
        await q.post(f"/api/tasks/{first}/cancel")


async def _status_is(daemon: Daemon, task_id: str, state: TaskState) -> bool:
    return (await daemon.service.get(task_id)).status is state


async def test_the_running_limit_holds_across_two_daemons(start_daemon) -> None:
    """Two daemons on one Redis, two slots each: a token with max_running 1 never has two
    tasks running, and one workspace never two tasks, whichever daemon took them."""
    first = await start_daemon(concurrency=2, worker_id="turns-first")
    second = await start_daemon(concurrency=2, worker_id="turns-second")
    token, _ = await first.service.tokens.create("one", None, TokenLimits(max_running=1))
    ids = []
    for i in range(4):
        body = task_body(cmd("sleep 0.4"), workspace_id=f"two-{i}")
        ids.append((await first.service.submit(body, scope=token)).record.id)
    assert not overlapping(await spans(first, ids))
    workers = {(await second.service.get(t)).worker_id for t in ids}
    assert workers <= {"turns-first", "turns-second"}


@pytest.fixture(name="quick_api")
async def _quick_api(start_daemon) -> Api:
    """The API fixture's daemon, waiting 1 s for a busy workspace instead of 10."""
    return await start_api(start_daemon, workspace_wait_s=1.0)


async def test_calls_that_write_wait_for_the_workspace_and_reads_do_not(quick_api: Api) -> None:
    api = quick_api
    async with api.client() as c, api.internal_client() as i:
        r = await c.post(
            "/api/tasks/submit", json=task_body(cmd("sleep 60"), workspace_id="ws-lock")
        )
        holder = r.json()["task_id"]
        await wait_for(lambda: _status_is(api.daemon, holder, TaskState.RUNNING))
        # Reads never wait.
        assert (await i.get("/workspaces/ws-lock/files?path=.")).status_code == 200
        r = await i.post("/workspaces/ws-lock/git", json={"operation": "status"})
        assert r.status_code == 200, r.text
        # Writes wait (1 s here), then 423 naming the task that holds it.
        for path, body in (
            ("files/write", {"path": "a.txt", "content": "x"}),
            ("exec", {"command": "true"}),
            ("git", {"operation": "add", "args": ["."]}),
        ):
            r = await i.post(f"/workspaces/ws-lock/{path}", json=body)
            assert r.status_code == 423, (path, r.text)
            assert r.json()["holder"] == holder and int(r.headers["Retry-After"]) > 0
            assert "concurrent" in r.json()["detail"]
        r = await c.post(
            "/api/tools/call",
            json={
                "workspace_id": "ws-lock",
                "tool": "workspace_write_file",
                "arguments": {"path": "t.txt", "content": "x"},
            },
        )
        assert r.status_code == 423, r.text
        r = await c.post(
            "/api/tools/call",
            json={
                "workspace_id": "ws-lock",
                "tool": "workspace_read_file",
                "arguments": {"path": "t.txt"},
            },
        )
        assert r.status_code != 423, r.text
        # ... unless they say they may run beside it.
        r = await i.post(
            "/workspaces/ws-lock/files/write",
            json={"path": "a.txt", "content": "x", "concurrent": True},
        )
        assert r.status_code == 200, r.text
        r = await i.post("/workspaces/ws-lock/exec", json={"command": "true", "concurrent": 1})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "concurrent"
        # Once the task ends, the workspace is free again.
        await c.post(f"/api/tasks/{holder}/cancel")
        await wait_for(lambda: _status_is(api.daemon, holder, TaskState.CANCELLED))

        async def write_ok() -> bool:
            r = await i.post("/workspaces/ws-lock/files/write", json={"path": "b", "content": ""})
            return r.status_code == 200

        await wait_for(write_ok, timeout=10)


async def test_a_task_waits_for_a_call_that_writes(quick_api: Api) -> None:
    api = quick_api
    async with api.client() as c, api.internal_client() as i, trio.open_nursery() as nursery:
        done = trio.Event()

        async def long_exec() -> None:
            r = await i.post("/workspaces/ws-call/exec", json={"command": "sleep 3"})
            assert r.status_code == 200, r.text
            done.set()

        nursery.start_soon(long_exec)
        await trio.sleep(1)  # the exec holds the workspace
        r = await c.post("/api/tasks/submit", json=task_body(cmd("true"), workspace_id="ws-call"))
        tid = r.json()["task_id"]
        body = (await c.get(f"/api/tasks/{tid}")).json()
        assert body["status"] == "queued", body
        assert body["waiting"]["reason"] == "workspace busy: an API call that writes"
        metrics = await api.daemon.service.metrics_text()
        assert b'wsrunner_tasks_waiting{reason="workspace_busy"} 1.0' in metrics
        ended = await wait_terminal(api.daemon, tid, timeout=30)
        assert done.is_set() and ended.status is TaskState.COMPLETED


async def test_homes_come_back_after_redis_loses_its_data(
    start_daemon, redis_client: redis.Redis, settings
) -> None:
    """A workspace's home is read back from PostgreSQL by the next reconcile pass (1 s here)
    once Redis lost it, and only then: the pass reads no home while Redis has them."""
    daemon = await start_daemon(concurrency=1)
    first = await daemon.service.submit(task_body(cmd("true"), workspace_id="ws-home"))
    await wait_terminal(daemon, first.record.id)
    homes = f"{settings.redis_prefix}:turns:homes"
    assert redis_client.hget(homes, "ws-home") == settings.host_id
    keys = list(redis_client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
    redis_client.delete(*keys)
    await wait_for(lambda: redis_client.hget(homes, "ws-home") == settings.host_id, timeout=10)
