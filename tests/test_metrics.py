"""/metrics scraped from a served daemon and parsed with Prometheus's own parser."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Api, cmd, task_body, wait_for, wait_terminal
from wsrunner.errors import WsrunnerError


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


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
    async with httpx.AsyncClient(base_url=api.public) as anon:
        r = await anon.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    assert (
        m[("wsrunner_tasks_finished_total", (("priority", "high"), ("status", "completed")))] == 1
    )
    assert m[("wsrunner_tasks_finished_total", (("priority", "normal"), ("status", "failed")))] == 2
    assert m[("wsrunner_tasks_started_total", (("priority", "high"),))] == 1
    assert m[("wsrunner_task_duration_seconds_count", (("status", "completed"),))] == 1
    assert m[("wsrunner_step_duration_seconds_count", (("action", "execute_command"),))] == 3
    assert m[("wsrunner_slots_total", ())] == api.daemon.settings.concurrency
    assert ("wsrunner_build_info", (("version", "0.1.0"),)) in m
    assert m[("wsrunner_backend_errors_total", (("backend", "redis"),))] == 1
    assert m[("wsrunner_policy_denials_total", (("mode", "enforce"), ("rule", "seed-sudo")))] == 1
    assert m[("wsrunner_sandbox_refusals_total", ())] == 0
    # Three task directories: the first made in a thread (it prepares the workspace too).
    assert m[("wsrunner_task_dir_operations_total", (("by", "helper"),))] == 5
    assert m[("wsrunner_task_dir_operations_total", (("by", "thread"),))] == 1
    assert m[("wsrunner_isolation_level", ())] == 2  # full, here
    assert m[("wsrunner_policy_last_reload_successful", ())] == 1
    assert m[("wsrunner_policy_last_reload_success_timestamp_seconds", ())] > 1.7e9
    digest = api.daemon.policy.current.digest
    assert m[("wsrunner_policy_info", (("digest", digest),))] == 1
    assert all(ok.record.id not in str(labels) for _, labels in m)  # no ids in labels


async def test_gauges_are_read_at_scrape_time(start_daemon) -> None:
    daemon = await start_daemon(frontend="frontend", public_host="127.0.0.1", public_port=0,
                                health_port=0, internal_token="t", concurrency=1)  # fmt: skip
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
            m = samples((await c.get("/metrics")).text)
        await c.post(f"/api/tasks/{busy.record.id}/cancel")
    assert m[("wsrunner_queue_depth", (("priority", "low"),))] == 2
    assert m[("wsrunner_queue_depth", (("priority", "high"),))] == 0
    assert m[("wsrunner_slots_busy", ())] == 1 and m[("wsrunner_slots_total", ())] == 1
    assert m[("wsrunner_sse_subscribers", ())] == 1
