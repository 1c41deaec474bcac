"""/metrics scraped from a served daemon's internal listener and parsed with Prometheus's own
parser."""

from __future__ import annotations

import httpx
import pytest
import redis
import trio_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    INTERNAL_TOKEN,
    Api,
    cmd,
    raw_payload,
    task_body,
    unique_seconds,
    wait_for,
    wait_terminal,
)
from wsrunner.backends.postgres.store import open_postgres_store
from wsrunner.backends.redis.keys import Keys
from wsrunner.backends.redis.queue import open_redis_queue
from wsrunner.errors import WsrunnerError
from wsrunner.models import TaskState
from wsrunner.service import Service
from wsrunner.settings import Settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(base_url: str) -> str:
    """GET /metrics without any token, as Prometheus does."""
    async with httpx.AsyncClient(base_url=base_url) as anon:
        r = await anon.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return r.text


async def test_metrics_count_what_the_daemon_did(api: Api) -> None:
    service = api.daemon.service
    ok = await service.submit(task_body(cmd("true"), priority="high"))
    await wait_terminal(api.daemon, ok.record.id)  # it prepares the workspace (in a thread)
    bad = await service.submit(task_body(cmd("exit 2")))
    denied = await service.submit(task_body(cmd("sudo true")))
    for sub in (bad, denied):
        await wait_terminal(api.daemon, sub.record.id)
    queue = service.queue
    with pytest.raises(WsrunnerError):  # a command Redis refuses counts as a backend error
        await queue._cmd("NO-SUCH-COMMAND")  # type: ignore[attr-defined]
    m = samples(await scrape(api.internal))
    assert (
        m[("wsrunner_tasks_finished_total", (("priority", "high"), ("status", "completed")))] == 1
    )
    assert m[("wsrunner_tasks_finished_total", (("priority", "normal"), ("status", "failed")))] == 2
    assert m[("wsrunner_tasks_started_total", (("priority", "high"),))] == 1
    assert m[("wsrunner_task_duration_seconds_count", (("status", "completed"),))] == 1
    assert m[("wsrunner_step_duration_seconds_count", (("action", "execute_command"),))] == 3
    assert m[("wsrunner_slots_capacity", ())] == api.daemon.settings.concurrency
    assert ("wsrunner_build_info", (("version", "0.1.0"),)) in m
    assert m[("wsrunner_backend_errors_total", (("backend", "redis"),))] == 1
    assert m[("wsrunner_policy_denials_total", (("mode", "enforce"), ("rule", "seed-sudo")))] == 1
    assert m[("wsrunner_sandbox_refusals_total", ())] == 0
    # Three task directories: the first made in a thread (it prepares the workspace too).
    assert m[("wsrunner_task_dir_operations_total", (("by", "helper"),))] == 5
    assert m[("wsrunner_task_dir_operations_total", (("by", "thread"),))] == 1
    # The first start of each task waited in its priority's queue for a while.
    assert m[("wsrunner_task_queue_wait_seconds_count", (("priority", "high"),))] == 1
    assert m[("wsrunner_task_queue_wait_seconds_count", (("priority", "normal"),))] == 2
    assert m[("wsrunner_policy_last_reload_successful", ())] == 1
    assert m[("wsrunner_policy_last_reload_success_timestamp_seconds", ())] > 1.7e9
    digest = api.daemon.policy.current.digest
    assert m[("wsrunner_policy_info", (("digest", digest),))] == 1
    assert all(ok.record.id not in str(labels) for _, labels in m)  # no ids in labels


async def test_gauges_are_read_at_scrape_time(start_daemon) -> None:
    daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token="t",
        concurrency=1,
    )
    _, token = await daemon.service.tokens.create("m", None)
    busy = await daemon.service.submit(task_body(cmd("sleep 3")))
    await wait_for(lambda: busy.record.id in daemon.runner.running)
    for _ in range(2):
        await daemon.service.submit(task_body(cmd("true"), priority="low"))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=daemon.urls[0], headers=headers) as c:
        async with c.stream("GET", f"/api/tasks/{busy.record.id}/events") as stream:
            async for _ in stream.aiter_bytes():
                break  # one stream open while we scrape
            m = samples(await scrape(daemon.urls[1]))
        await c.post(f"/api/tasks/{busy.record.id}/cancel")
    assert m[("wsrunner_queue_depth", (("priority", "low"),))] == 2
    assert m[("wsrunner_queue_depth", (("priority", "high"),))] == 0
    assert m[("wsrunner_slots_busy", ())] == 1 and m[("wsrunner_slots_capacity", ())] == 1
    assert m[("wsrunner_sse_subscribers", ())] == 1


async def test_the_exposition_follows_prometheus_conventions(api: Api) -> None:
    """No `_created` series, no gauge named like a counter, the process and platform
    collectors, and the isolation level as a state set (one state 1, the others 0)."""
    families = {f.name: f for f in text_string_to_metric_families(await scrape(api.internal))}
    names = [s.name for f in families.values() for s in f.samples]
    assert not [n for n in names if n.endswith("_created")]
    gauges = [f.name for f in families.values() if f.type == "gauge"]
    assert gauges and not [name for name in gauges if name.endswith("_total")]
    assert {
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
    } <= set(families)
    isolation = families["wsrunner_isolation"]
    states = {s.labels["wsrunner_isolation"]: s.value for s in isolation.samples}
    level = api.daemon.runner.executor.sandbox.isolation.level
    assert states == {state: float(state == level) for state in ("full", "partial", "none")}


async def test_metrics_are_served_on_the_internal_listener_only(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.public) as anon:
        assert (await anon.get("/metrics")).status_code == 404
    async with api.client() as c:
        assert (await c.get("/metrics")).status_code == 404
    async with api.internal_client() as c:  # the token is not needed, and does no harm
        assert (await c.get("/metrics")).status_code == 200


async def test_http_requests_are_timed_by_route_template(api: Api) -> None:
    async with api.client() as c:
        r = await c.post("/api/tasks/submit", json=task_body(cmd("true")))
        task_id = r.json()["task_id"]
        await wait_terminal(api.daemon, task_id)  # its workspace exists, to be listed below
        assert (await c.get(f"/api/tasks/{task_id}")).status_code == 200
        assert (await c.get(f"/api/nothing/{task_id}")).status_code == 404
    async with httpx.AsyncClient(base_url=api.public) as anon:
        assert (await anon.get("/api/tasks")).status_code == 401
    async with api.internal_client() as c:
        assert (await c.get("/workspaces/ws-1/files")).status_code == 200
    m = samples(await scrape(api.internal))
    timed = {
        labels: v
        for (name, labels), v in m.items()
        if name == "wsrunner_http_request_duration_seconds_count"
    }

    def count(api_: str, method: str, route: str, status: str) -> float:
        key = (("api", api_), ("method", method), ("route", route), ("status", status))
        return timed.get(key, 0)

    assert count("public", "POST", "/api/tasks/submit", "202") == 1
    assert count("public", "GET", "/api/tasks/<task_id>", "200") == 1
    assert count("public", "GET", "unmatched", "404") == 1
    assert count("public", "GET", "/api/tasks", "401") == 1
    assert count("internal", "GET", "/workspaces/<workspace_id>/files", "200") == 1
    assert all(task_id not in str(labels) for labels in timed)
    assert all(task_id not in str(labels) for _, labels in m)


async def test_requeues_reaps_and_dead_letters_are_counted(
    start_daemon, settings: Settings, redis_client: redis.Redis
) -> None:
    """A dead daemon's running task and an unreadable payload it left are reaped; malformed
    payloads are dead-lettered; a task still running when the daemon stops is handed back."""
    keys = Keys(settings.redis_prefix)
    async with (
        trio_asyncio.open_loop(),
        open_redis_queue(settings.redis_url, settings.redis_prefix) as queue,
        open_postgres_store(
            settings.database_url, schema=settings.database_schema, lease_s=settings.lease_ttl_s
        ) as store,
    ):
        orphan = await Service(settings, queue, store).submit(task_body(cmd("true")))
        claim = await queue.claim("ghost")  # a daemon that claimed and started it, then died
        assert claim is not None
        await store.transition(orphan.record.id, TaskState.RUNNING, worker_id="ghost")
    redis_client.hset(keys.inflight("ghost"), "normal:999999", "{left half-written")
    redis_client.sadd(keys.workers, "ghost")
    for bad in ("{not json", raw_payload(workspace_id="../etc")):
        redis_client.lpush(keys.queue("normal"), bad)
    daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
    )
    rec = await wait_terminal(daemon, orphan.record.id)
    assert rec.status is TaskState.COMPLETED and rec.attempts == 2
    await wait_for(lambda: redis_client.llen(keys.dead) == 3)

    def counted(name: str, **labels: str) -> float | None:
        return daemon.metrics.registry.get_sample_value(name, labels)

    def all_counted() -> bool:  # counted just after the queue call each follows
        dead = [
            counted("wsrunner_task_dead_letters_total", reason=r)
            for r in ("invalid_json", "invalid_payload")
        ]
        return counted("wsrunner_task_requeues_total", reason="dead_daemon") == 1 and (
            sum(n or 0 for n in dead) == 3
        )

    await wait_for(all_counted)
    m = samples(await scrape(daemon.urls[1]))
    assert m[("wsrunner_task_reaps_total", (("outcome", "requeued"),))] == 1
    assert m[("wsrunner_task_reaps_total", (("outcome", "failed"),))] == 0
    assert m[("wsrunner_task_requeues_total", (("reason", "dead_daemon"),))] == 1
    # One unreadable claim of the dead daemon, one malformed payload from the queue; one invalid.
    assert m[("wsrunner_task_dead_letters_total", (("reason", "invalid_json"),))] == 2
    assert m[("wsrunner_task_dead_letters_total", (("reason", "invalid_payload"),))] == 1
    assert m[("wsrunner_task_requeues_total", (("reason", "shutdown"),))] == 0

    running = await daemon.service.submit(task_body(cmd(f"sleep {unique_seconds()}")))
    await wait_for(lambda: running.record.id in daemon.runner.running)
    daemon.stop()  # the task outlives the grace period: it goes back to the queue
    await wait_for(lambda: counted("wsrunner_task_requeues_total", reason="shutdown") == 1)
    assert redis_client.hget(keys.status(running.record.id), "status") == "queued"
