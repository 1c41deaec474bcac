"""The queue: strict priority, FIFO, instant wake-up, leased claims, dead letters, recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import redis
import trio
import trio_asyncio

from tests.conftest import (
    PrivateRedis,
    cmd,
    exit_code,
    host_pids,
    raw_payload,
    task_body,
    unique_seconds,
    wait_for,
    wait_terminal,
)
from wsrunner.backends.postgres.store import open_postgres_store
from wsrunner.backends.redis.queue import open_redis_queue
from wsrunner.daemon import Daemon
from wsrunner.errors import NotFoundError
from wsrunner.models import TaskState
from wsrunner.service import Service


async def test_strict_priority_then_fifo(start_daemon, redis_client: redis.Redis, settings) -> None:
    # Queue everything before any daemon exists, then let one slot drain it.
    from wsrunner.backends.redis.keys import Keys

    keys = Keys(settings.redis_prefix)
    order = []
    for prio in ("low", "normal", "high", "critical", "low", "critical"):
        payload = raw_payload(priority=prio, steps=[cmd("true")])
        order.append((prio, json.loads(payload)["task_id"]))
        redis_client.lpush(keys.queue(prio), payload)
    daemon = await start_daemon(concurrency=1)
    ids = [tid for _, tid in order]
    await wait_for(lambda: _all_done(daemon, ids))
    recs = [await daemon.service.get(t) for t in ids]
    started = [r.id for r in sorted(recs, key=lambda r: r.started_at)]
    rank = {"critical": 0, "high": 1, "normal": 2, "low": 3}
    expected = [tid for _, tid in sorted(order, key=lambda pt: rank[pt[0]])]  # stable: FIFO
    assert started == expected


async def _all_done(daemon: Daemon, ids: list[str]) -> bool:
    try:
        return all([(await daemon.service.get(t)).status.terminal for t in ids])
    except NotFoundError:  # a legacy payload gets its row when claimed
        return False


async def test_idle_daemon_wakes_on_a_plain_lpush_without_polling(
    daemon: Daemon, redis_client: redis.Redis
) -> None:
    # The idle wait blocks in Redis for WAKE_BLOCK_S (5 s) at a time; a poller that only looked
    # again after that would miss this deadline. Behaviour, not a benchmark: the bound is loose.
    await trio.sleep(0.3)  # let the poller settle into its blocking wait
    keys = daemon.service.queue.keys  # type: ignore[attr-defined]
    payload = raw_payload(steps=[cmd("true")])
    redis_client.lpush(keys.queue("low"), payload)
    tid = json.loads(payload)["task_id"]

    async def running_or_done() -> bool:
        return redis_client.hget(keys.status(tid), "status") in ("running", "completed")

    await wait_for(running_or_done, timeout=2.0, poll=0.005)


async def test_idle_waits_keep_their_connections_and_a_backlog_does_not_spin(
    start_daemon, private_redis: PrivateRedis
) -> None:
    """Each wake-up of the idle poller reuses the watchers' connections (one per queue, opened
    once); while the only slot is busy, a queued task makes no watcher call Redis again.
    A Redis server of its own: its counters are the daemon's alone."""
    redis_client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    daemon = await start_daemon(concurrency=1, redis_url=private_redis.url)
    keys = daemon.service.queue.keys  # type: ignore[attr-defined]
    await trio.sleep(0.3)  # the watchers are connected and blocked

    def connections() -> int:
        return int(redis_client.info("stats")["total_connections_received"])

    def blmoves() -> int:
        return int(redis_client.info("commandstats").get("cmdstat_blmove", {}).get("calls", 0))

    before = connections()
    for n in range(12):  # each push wakes an idle poller: "low", "high", ... in turn
        payload = raw_payload(priority=("low", "high", "normal")[n % 3], steps=[cmd("true")])
        redis_client.lpush(keys.queue(json.loads(payload)["priority"]), payload)
        await wait_terminal(daemon, json.loads(payload)["task_id"])
    # Re-connecting watchers cancelled at every wake-up would have opened 3 per task (36).
    assert connections() - before <= 4

    blocker = raw_payload(steps=[cmd("sleep 2")])
    redis_client.lpush(keys.queue("normal"), blocker)
    await wait_for(lambda: json.loads(blocker)["task_id"] in daemon.runner.running)
    redis_client.lpush(keys.queue("normal"), raw_payload(steps=[cmd("true")]))
    calls = blmoves()
    await trio.sleep(1.0)  # the backlog waits for the slot; no watcher re-blocks meanwhile
    assert blmoves() - calls <= 3  # at most the watchers already blocked; a spin makes thousands


async def test_malformed_payloads_are_dead_lettered_not_dropped(
    daemon: Daemon, redis_client: redis.Redis
) -> None:
    keys = daemon.service.queue.keys  # type: ignore[attr-defined]
    good_id = str(uuid.uuid4())
    bad = [
        "{not json",
        json.dumps([1, 2]),
        raw_payload(workspace_id="../etc"),
        raw_payload(task_id=good_id, steps=[]),  # a reference AgentTask has no steps
        raw_payload(steps=[{"action": "rm_rf"}]),
    ]
    for p in bad:
        redis_client.lpush(keys.queue("high"), p)
    await wait_for(lambda: redis_client.llen(keys.dead) == len(bad))
    dead = [json.loads(x) for x in redis_client.lrange(keys.dead, 0, -1)]
    reasons = " | ".join(d["reason"] for d in dead)
    assert "invalid JSON" in reasons and "workspace_id" in reasons and "steps" in reasons
    assert "steps[0].action" in reasons
    assert {d["payload"] for d in dead} == set(bad)
    assert redis_client.hlen(keys.inflight(daemon.settings.worker_id)) == 0
    # The daemon goes on working.
    sub = await daemon.service.submit(task_body(cmd("true")))
    assert (await wait_terminal(daemon, sub.record.id)).status is TaskState.COMPLETED


async def test_redis_wiped_while_tasks_are_queued(
    start_daemon, redis_client: redis.Redis, settings
) -> None:
    daemon = await start_daemon(concurrency=1)
    blocker = await daemon.service.submit(task_body(cmd("sleep 1.5")))
    queued = [await daemon.service.submit(task_body(cmd(f"echo {i}"))) for i in range(3)]
    await wait_for(lambda: blocker.record.id in daemon.runner.running)
    keys = [k for k in redis_client.scan_iter(match=f"{settings.redis_prefix}:*")]
    redis_client.unlink(*keys)  # everything this deployment had in Redis is gone
    for sub in [blocker, *queued]:
        rec = await wait_terminal(daemon, sub.record.id, timeout=30)
        assert rec.status is TaskState.COMPLETED, rec.error_message


def _spawn_daemon(settings, worker_id: str) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        REDIS_URL=settings.redis_url,
        WSRUNNER_REDIS_PREFIX=settings.redis_prefix,
        DATABASE_URL=settings.database_url,
        WSRUNNER_DATABASE_SCHEMA=settings.database_schema,
        WORKSPACE_VOLUME_PATH=str(settings.volume_path),
        WSRUNNER_FRONTEND="none",
        WORKER_ID=worker_id,
        WSRUNNER_HEARTBEAT_INTERVAL="0.5",
        WSRUNNER_LEASE_TTL="2",
        WSRUNNER_GIT_SCHEMES="https,file",
        WSRUNNER_SHUTDOWN_GRACE="1",
        WSRUNNER_KILL_GRACE="0.5",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "wsrunner", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


async def test_daemon_killed_with_sigkill_loses_nothing(start_daemon, settings) -> None:
    marker = settings.volume_path / "ws-1" / "first-attempt"
    t = unique_seconds()
    # The first attempt marks itself (in the workspace) and hangs; a second one finishes at once.
    script = f"if [ -e first-attempt ]; then echo second; else touch first-attempt; sleep {t}; fi"
    victim = _spawn_daemon(settings, "victim")
    try:
        async with (
            trio_asyncio.open_loop(),
            open_redis_queue(settings.redis_url, settings.redis_prefix) as queue,
            open_postgres_store(settings.database_url, schema=settings.database_schema) as store,
        ):
            sub = await Service(settings, queue, store).submit(
                task_body(cmd(script), timeout_seconds=600)
            )
            await wait_for(lambda: marker.exists() and host_pids(t), timeout=30)
            assert (await store.get(sub.record.id)).worker_id == "victim"
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            # The sandbox dies with its daemon: nothing of the step outlives it.
            await wait_for(lambda: not host_pids(t), timeout=5)
        survivor = await start_daemon(worker_id="survivor")
        rec = await wait_terminal(survivor, sub.record.id, timeout=30)
        assert rec.status is TaskState.COMPLETED, rec.error_message
        assert rec.attempts == 2 and rec.worker_id == "survivor"
        assert rec.result["result"]["steps"][0]["result"]["stdout"] == "second\n"
        events = [e.data.get("status") for e in await survivor.service.events(sub.record.id)]
        assert events.count("running") == 2 and "queued" in events[2:]
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


async def test_task_whose_daemons_keep_dying_is_failed_after_max_attempts(
    start_daemon, settings, redis_client
) -> None:
    from wsrunner.backends.redis.keys import Keys

    keys = Keys(settings.redis_prefix)
    async with (
        trio_asyncio.open_loop(),
        open_redis_queue(settings.redis_url, settings.redis_prefix) as queue,
        open_postgres_store(
            settings.database_url, schema=settings.database_schema, lease_s=settings.lease_ttl_s
        ) as store,
    ):
        sub = await Service(settings, queue, store).submit(task_body(cmd("true")))
        # Simulate max_attempts daemons that each claimed and started it, then died.
        for n in range(settings.max_attempts):
            claim = await queue.claim(f"ghost-{n}")
            assert claim is not None
            await store.transition(sub.record.id, TaskState.RUNNING, worker_id=f"ghost-{n}")
            redis_client.sadd(keys.workers, f"ghost-{n}")
            if n < settings.max_attempts - 1:
                await store.transition(sub.record.id, TaskState.QUEUED, expect_worker=f"ghost-{n}")
                await queue.requeue_claim(f"ghost-{n}", claim.claim_id, claim.priority)
    daemon = await start_daemon()
    rec = await wait_terminal(daemon, sub.record.id)
    assert rec.status is TaskState.FAILED and rec.attempts == settings.max_attempts
    assert "gave up after 3 attempts" in rec.error_message


async def test_sigterm_requeues_running_tasks_and_exits_zero(
    start_daemon, settings, tmp_path
) -> None:
    victim = _spawn_daemon(settings, "graceful")
    pidfile = settings.volume_path / "ws-1" / "pid"
    try:
        async with (
            trio_asyncio.open_loop(),
            open_redis_queue(settings.redis_url, settings.redis_prefix) as queue,
            open_postgres_store(settings.database_url, schema=settings.database_schema) as store,
        ):
            script = "if [ -e pid ]; then echo resumed; else echo $$ > pid; sleep 300; fi"
            sub = await Service(settings, queue, store).submit(
                task_body(cmd(script), timeout_seconds=600)
            )
            await wait_for(pidfile.exists, timeout=30)
            victim.send_signal(signal.SIGTERM)  # grace is 30 s by default: set a short one below
            status = await exit_code(victim, timeout=60)
            assert status == 0, victim.stderr.read().decode() if victim.stderr else ""
            rec = await store.get(sub.record.id)
            assert rec.status is TaskState.QUEUED  # given back, not lost and not failed
        survivor = await start_daemon()
        rec = await wait_terminal(survivor, sub.record.id)
        assert rec.status is TaskState.COMPLETED and rec.attempts == 2
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


async def test_event_waiters_share_one_redis_read(
    start_daemon, private_redis: PrivateRedis
) -> None:
    # A Redis server of its own: the connections listed are the daemon's and this test's alone.
    redis_client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    daemon = await start_daemon(redis_url=private_redis.url)
    queue = daemon.service.queue
    tasks = [f"tail-{uuid.uuid4()}" for _ in range(3)]
    firsts = [await queue.emit(t, "progress_update", {"step": 0}) for t in tasks]

    def connections() -> list[str]:
        """The commands last sent on each connection to Redis, but the daemon's idle-wait
        watchers (a BLMOVE per queue, open or not depending on when the poller last went idle)."""
        return [c["cmd"] for c in redis_client.client_list() if c["cmd"] != "blmove"]

    before = len(connections())
    got: dict[int, list[str]] = {}

    async def waiter(n: int) -> None:
        events = await queue.read_events(tasks[n % 3], firsts[n % 3], block_ms=10_000)
        got[n] = [e.data["step"] for e in events]

    async with trio.open_nursery() as nursery:
        for n in range(30):
            nursery.start_soon(waiter, n)
        await trio.sleep(0.3)
        # Thirty blocked readers of three streams: one more connection, not thirty.
        now = connections()
        assert len(now) <= before + 1 and now.count("xread") == 1, now
        for step, t in enumerate(tasks, start=1):
            await queue.emit(t, "progress_update", {"step": step})
    assert got == {n: [n % 3 + 1] for n in range(30)}


@asynccontextmanager
async def row_locked(settings: Any, task_id: str) -> AsyncIterator[None]:
    """The task's PostgreSQL row locked (SELECT ... FOR UPDATE, in another connection's open
    transaction) for the body of the block: the daemon's writes to it wait."""
    locked, release = trio.Event(), trio.Event()
    token = trio.lowlevel.current_trio_token()

    def hold() -> None:
        with psycopg.connect(settings.database_url) as conn:  # one transaction, until released
            conn.execute(
                f'SELECT 1 FROM "{settings.database_schema}".task_executions '
                "WHERE id = %s FOR UPDATE",
                (task_id,),
            )
            token.run_sync_soon(locked.set)
            trio.from_thread.run(release.wait, trio_token=token)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, hold)
        await locked.wait()
        try:
            yield
        finally:
            release.set()


async def test_a_slot_runs_the_next_task_while_the_last_end_is_recorded(
    start_daemon, settings
) -> None:
    """With one slot, a task whose end cannot be written yet (its row is locked here) does not
    hold up the next one's steps (in another workspace: its own is held until that end is
    written); both are recorded once the lock goes. (The next one's end then
    waits: one slot allows one task being recorded.)"""
    daemon = await start_daemon(concurrency=1)
    first = await daemon.service.submit(task_body(cmd("echo first; sleep 0.5")))
    await wait_for(lambda: first.record.id in daemon.runner.running)
    async with row_locked(settings, first.record.id):
        second = await daemon.service.submit(task_body(cmd("echo second"), workspace_id="ws-2"))
        await wait_for(lambda: output_of(daemon, second.record.id), timeout=10)
        assert await output_of(daemon, second.record.id) == "second\n"
        assert (await daemon.service.get(first.record.id)).status is TaskState.RUNNING
        assert first.record.id in daemon.runner.running  # being recorded, outside the slot
    for sub, out in ((first, "first\n"), (second, "second\n")):
        rec = await wait_terminal(daemon, sub.record.id, timeout=10)
        assert rec.status is TaskState.COMPLETED and rec.attempts == 1
        assert rec.result["result"]["steps"][0]["result"]["stdout"] == out
    await wait_for(lambda: daemon.slots.statistics().running == 0)
    assert not daemon.runner.running


async def output_of(daemon: Daemon, task_id: str) -> str:
    events = await daemon.service.events(task_id)
    return "".join(e.data["data"] for e in events if e.type == "output")


async def test_a_duplicate_claim_leaves_the_running_task_alone(
    start_daemon, redis_client: redis.Redis
) -> None:
    """The same payload claimed again while its task runs here: the duplicate is refused by the
    store, and the running task keeps its directory (made while its start was recorded, a
    duplicate's must not clear it). An earlier attempt's leftovers are cleared."""
    daemon = await start_daemon(concurrency=2)
    keys = daemon.service.queue.keys  # type: ignore[attr-defined]
    root = daemon.settings.volume_path / "ws-raw"
    task_id = str(uuid.uuid4())
    (root / "tasks" / task_id / "home").mkdir(parents=True)  # a crashed attempt's leftovers
    (root / "tasks" / task_id / "home" / "stale").write_text("from before")
    payload = raw_payload(
        task_id=task_id, steps=[cmd("ls $HOME; echo mine > $HOME/mark; sleep 1; cat $HOME/mark")]
    )
    redis_client.lpush(keys.queue("normal"), payload)
    await wait_for(lambda: task_id in daemon.runner.running)
    await wait_for(lambda: (root / "tasks" / task_id / "home" / "mark").exists())
    redis_client.lpush(keys.queue("normal"), payload)
    await wait_for(lambda: redis_client.llen(keys.queue("normal")) == 0)
    rec = await wait_terminal(daemon, task_id, timeout=10)
    assert rec.status is TaskState.COMPLETED and rec.attempts == 1
    assert rec.result["result"]["steps"][0]["result"]["stdout"] == "mine\n"
    await wait_for(lambda: redis_client.hlen(keys.inflight(daemon.settings.worker_id)) == 0)
    assert not (root / "tasks" / task_id).exists()


async def test_an_event_rides_with_a_transition_applied_or_not(
    daemon: Daemon, redis_client: redis.Redis
) -> None:
    queue = daemon.service.queue
    task_id = f"ride-{uuid.uuid4()}"
    step = {"step": 1, "total_steps": 1, "description": "x"}
    channel = redis_client.pubsub(ignore_subscribe_messages=True)
    channel.subscribe(queue.keys.events(task_id))  # type: ignore[attr-defined]
    assert (
        await queue.transition(
            task_id,
            "ws",
            TaskState.RUNNING,
            event={"status": "running"},
            then=("progress_update", step),
        )
    )[0]
    assert (await queue.transition(task_id, "ws", TaskState.COMPLETED)) == (True, "")
    assert await queue.transition(
        task_id, "ws", TaskState.RUNNING, then=("output", {"data": "late"})
    ) == (False, "completed")
    events = await queue.read_events(task_id)
    assert [(e.type, e.data) for e in events] == [
        ("status_changed", {"status": "running"}),
        ("progress_update", step),
        ("output", {"data": "late"}),
    ]
    assert redis_client.ttl(queue.keys.events(task_id)) > 0  # type: ignore[attr-defined]
    # The reference system's subscribers get the same events, in its envelope.
    published: list[dict[str, Any]] = []
    for _ in range(50):  # all were published already; None: the subscription's confirmation
        if len(published) == 3:
            break
        if (message := channel.get_message(timeout=0.1)) is not None:
            published.append(json.loads(message["data"]))
    channel.close()
    assert [(m["event_type"], m["task_id"], m["data"]) for m in published] == [
        ("status_changed", task_id, {"status": "running"}),
        ("progress_update", task_id, step),
        ("output", task_id, {"data": "late"}),
    ]
    assert all(m["timestamp"] for m in published)


async def test_a_task_being_recorded_when_the_grace_period_ends_is_recorded_not_requeued(
    start_daemon, settings
) -> None:
    """SIGTERM's grace period puts back the tasks still running their steps, not those whose
    steps are over. Here the second task's steps are over, and its end waits for the first's
    (one slot: one task being recorded), which waits on a row lock held here. (Another
    workspace: the first's holds it until its end is recorded.)"""
    daemon = await start_daemon(concurrency=1, shutdown_grace_s=0.2)
    first = await daemon.service.submit(task_body(cmd("sleep 0.3; echo first")))
    await wait_for(lambda: first.record.id in daemon.runner.running)
    async with row_locked(settings, first.record.id):
        second = await daemon.service.submit(task_body(cmd("echo second"), workspace_id="ws-2"))
        await wait_for(
            lambda: (rt := daemon.runner.running.get(second.record.id)) is not None and rt.recording
        )
        daemon.stop()
        await trio.sleep(0.6)  # past the grace period, both ends still waiting
    with trio.fail_after(30):
        while daemon.runner.running:
            await trio.sleep(0.05)
    with psycopg.connect(settings.database_url) as conn:  # the daemon has stopped
        rows = conn.execute(
            f"SELECT id::text, status, attempts, result FROM "
            f'"{settings.database_schema}".task_executions'
        ).fetchall()
    got = {
        r[0]: (r[1], r[2], r[3] and r[3]["result"]["steps"][0]["result"]["stdout"]) for r in rows
    }
    assert got == {
        first.record.id: ("completed", 1, "first\n"),
        second.record.id: ("completed", 1, "second\n"),
    }


def test_the_legacy_envelope_is_the_text_json_dumps_would_give() -> None:
    """Built around the event's data already in JSON (not encoded twice), byte for byte."""
    from wsrunner.backends.redis.queue import _envelope
    from wsrunner.models import Event

    data = {"stream": "stdout", "data": 'é "quoted" \\ \n\u2028 \ud800', "step": 2}
    event = Event(
        id="0-1",
        type="output",
        task_id='task "é"',
        data=data,
        timestamp="2026-11-25T00:00:00+00:00",
    )
    assert _envelope(event.type, event.task_id, json.dumps(data), event.timestamp) == json.dumps(
        event.envelope()
    )
