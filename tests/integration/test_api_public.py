"""The public REST + SSE API, served by a real daemon on a free port, through httpx."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from httpx_sse import aconnect_sse

from tests.conftest import (
    INTERNAL_TOKEN,
    Api,
    cmd,
    git_http_server,
    git_repo,
    host_pids,
    task_body,
    unique_seconds,
    wait_for,
)
from wsrunner.policy import bundled_policy

PROBLEM = "application/problem+json"


def problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["type"].startswith("https://") and body["title"]
    return body


async def submitted(api: Api, c: httpx.AsyncClient, *steps: dict, **extra) -> str:
    r = await c.post("/api/tasks/submit", json=task_body(*steps, **extra))
    assert r.status_code == 202, r.text
    return str(r.json()["task_id"])


async def final(c: httpx.AsyncClient, task_id: str) -> dict:
    async def done() -> dict | None:
        body = (await c.get(f"/api/tasks/{task_id}")).json()
        return body if body["status"] in ("completed", "failed", "cancelled", "timed_out") else None

    result: dict = await wait_for(done, timeout=30)
    return result


async def test_submit_runs_the_task_and_get_returns_its_result(api: Api) -> None:
    async with api.client() as c:
        r = await c.post("/api/tasks/submit", json=task_body(cmd("echo hello"), priority="high"))
        assert r.status_code == 202
        body = r.json()
        tid = body["task_id"]
        assert body == {
            "task_id": tid,
            "status": "queued",
            "events_url": f"/api/tasks/{tid}/events",
        }
        assert r.headers["location"] == f"/api/tasks/{tid}"
        rec = await final(c, tid)
    assert rec["status"] == "completed" and rec["priority"] == "high"
    assert rec["result"]["result"]["steps"][0]["result"]["stdout"] == "hello\n"
    assert rec["configuration"]["steps"][0]["command"] == "echo hello"
    assert rec["attempts"] == 1 and rec["started_at"] and rec["completed_at"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"workspace_id": "ws-1"}, "steps"),
        ({"workspace_id": "ws-1", "steps": []}, "steps"),
        ({"workspace_id": "../x", "steps": [cmd("true")]}, "workspace_id"),
        ({"workspace_id": "ws-1", "steps": [cmd("true", timeout=0)]}, "steps[0].timeout"),
        ({"workspace_id": "ws-1", "steps": [{"action": "rm_rf"}]}, "steps[0].action"),
        ({"workspace_id": "ws-1", "steps": [cmd("true")], "priority": "urgent"}, "priority"),
        ({"workspace_id": "ws-1", "steps": [cmd("true")], "timeout_seconds": 5}, "timeout_seconds"),
        ({"workspace_id": "ws-1", "steps": [cmd("true")], "credentials": {}}, "credentials"),
        (
            {
                "workspace_id": "ws-1",
                "steps": [{"action": "git_clone", "repo": "https://user:tok@github.com/a/b.git"}],
            },
            "steps[0].repo",
        ),
        ([1, 2], ""),
    ],
)
async def test_invalid_submissions_are_422_naming_the_field(api: Api, body, field) -> None:
    async with api.client() as c:
        r = await c.post("/api/tasks/submit", json=body)
    p = problem(r, 422)
    assert p["errors"][0]["field"] == field
    assert p["detail"].startswith(f"{field}: " if field else "expected")


async def test_malformed_json_is_400_and_unknown_routes_are_problems(api: Api) -> None:
    async with api.client() as c:
        r = await c.post("/api/tasks/submit", content=b"{not json")
        assert "not valid JSON" in problem(r, 400)["detail"]
        problem(await c.get("/api/nothing-here"), 404)
        r = await c.delete("/api/tasks/submit")
        problem(r, 405)
        assert "POST" in r.headers["allow"]
        big = {"workspace_id": "ws-1", "steps": [cmd("x" * 100)] * 1, "pad": "x" * (11 << 20)}
        problem(await c.post("/api/tasks/submit", json=big), 413)


async def test_a_body_over_the_limit_is_read_before_its_413(api: Api) -> None:
    """The whole body is read (and dropped) before the 413, so a client still sending is not
    cut off by a reset that can swallow its answer, and the connection stays usable."""
    for base, headers in (
        (api.public, f"Authorization: Bearer {api.token}"),
        (api.internal, f"X-Internal-Token: {INTERNAL_TOKEN}"),
    ):
        host, port = base.removeprefix("http://").split(":")
        path = "/api/tasks/submit" if base == api.public else "/workspaces/ws-1/files/write"
        body = b'{"pad": "' + b"x" * (11 << 20) + b'"}'
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            await stream.send_all(head.encode() + body)
            first = await read_response(stream)
            assert first.startswith(b"HTTP/1.1 413 "), first[:100]
            # The same connection answers the next request: nothing of the body was left unread.
            await stream.send_all(f"GET /openapi.json HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert (await read_response(stream)).startswith(b"HTTP/1.1 200 ")


async def read_response(stream: trio.SocketStream) -> bytes:
    """One HTTP/1.1 response with a Content-Length body, read off a raw connection."""
    data = b""
    with trio.fail_after(20):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed after {data[:200]!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            rest += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + rest


async def test_idempotency_key_returns_the_first_task_or_409(api: Api) -> None:
    async with api.client() as c:
        body = task_body(cmd("true"), idempotency_key="k-1")
        first = await c.post("/api/tasks/submit", json=body)
        again = await c.post("/api/tasks/submit", json=body)
        assert first.status_code == again.status_code == 202
        assert again.json()["task_id"] == first.json()["task_id"]
        assert again.headers["idempotent-replayed"] == "true"
        other = await c.post(
            "/api/tasks/submit", json=task_body(cmd("false"), idempotency_key="k-1")
        )
        assert "k-1" in problem(other, 409)["detail"]
        # The header of draft-ietf-httpapi-idempotency-key-header works the same way.
        h = {"Idempotency-Key": '"k-2"'}
        a = await c.post("/api/tasks/submit", json=task_body(cmd("true")), headers=h)
        b = await c.post("/api/tasks/submit", json=task_body(cmd("true")), headers=h)
        assert a.json()["task_id"] == b.json()["task_id"]
        mismatch = task_body(cmd("true"), idempotency_key="k-3")
        r = await c.post("/api/tasks/submit", json=mismatch, headers=h)
        assert problem(r, 422)["errors"][0]["field"] == "idempotency_key"


async def test_unknown_or_malformed_task_ids_are_404(api: Api) -> None:
    async with api.client() as c:
        for tid in ("8f8b2c2e-5b3c-4c3e-9d7e-000000000000", "not-a-uuid", "%2e%2e", "1' OR '1'='1"):
            for r in (
                await c.get(f"/api/tasks/{tid}"),
                await c.post(f"/api/tasks/{tid}/cancel"),
                await c.get(f"/api/tasks/{tid}/events"),
            ):
                problem(r, 404)


async def test_list_is_newest_first_with_cursor_pages(api: Api) -> None:
    async with api.client() as c:
        ids = [await submitted(api, c, cmd("true"), workspace_id="ws-list") for _ in range(5)]
        seen, cursor, pages = [], None, 0
        while True:
            params = {"workspace_id": "ws-list", "limit": "2"}
            if cursor:
                params["cursor"] = cursor
            r = await c.get("/api/tasks", params=params)
            assert r.status_code == 200
            page = r.json()
            seen += [t["id"] for t in page["tasks"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
            link = httpx.URL(r.headers["link"].split(";")[0].strip("<>"))
            assert link.path == "/api/tasks" and link.params["cursor"] == cursor
            assert link.params["workspace_id"] == "ws-list" and link.params["limit"] == "2"
        assert seen == list(reversed(ids)) and pages == 3
        assert all("result" not in t for t in page["tasks"])
        for t in ids:
            await final(c, t)
        done = (
            await c.get("/api/tasks", params={"status": "completed", "workspace_id": "ws-list"})
        ).json()
        assert {t["id"] for t in done["tasks"]} == set(ids)
        for params, field in (
            ({"limit": "0"}, "limit"),
            ({"limit": "x"}, "limit"),
            ({"cursor": "garbage"}, "cursor"),
            ({"status": "done"}, "status"),
            ({"workspace_id": "a/b"}, "workspace_id"),
        ):
            r = await c.get("/api/tasks", params=params)
            assert problem(r, 422)["errors"][0]["field"] == field


async def test_cancel_kills_a_running_task_and_then_is_409(api: Api) -> None:
    t = unique_seconds()
    async with api.client() as c:
        tid = await submitted(api, c, cmd(f"sh -c 'exec sleep {t}'"))
        await wait_for(lambda: host_pids(t))
        r = await c.post(f"/api/tasks/{tid}/cancel")
        assert r.status_code == 200 and r.json() == {"id": tid, "status": "cancelled"}
        rec = await final(c, tid)
        assert rec["status"] == "cancelled"
        await wait_for(lambda: not host_pids(t), timeout=10)
        p = problem(await c.post(f"/api/tasks/{tid}/cancel"), 409)
        assert p["task_status"] == "cancelled" and "cancelled" in p["detail"]


async def test_cancel_a_queued_task(api: Api) -> None:
    async with api.client() as c:
        blockers = [await submitted(api, c, cmd("sleep 30")) for _ in range(2)]  # both slots
        tid = await submitted(api, c, cmd("echo never"))
        assert (await c.post(f"/api/tasks/{tid}/cancel")).status_code == 200
        for b in blockers:
            await c.post(f"/api/tasks/{b}/cancel")
        rec = await final(c, tid)
    assert rec["status"] == "cancelled" and rec["started_at"] is None


async def _events(c: httpx.AsyncClient, tid: str, **headers: str) -> list:
    out = []
    async with aconnect_sse(c, "GET", f"/api/tasks/{tid}/events", headers=headers) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for ev in source.aiter_sse():
            if ev.data:  # the opening `retry:` block carries no event (httpx-sse yields it)
                out.append(ev)
    return out


async def test_sse_history_live_resume_and_end(api: Api) -> None:
    async with api.client() as c:
        tid = await submitted(api, c, cmd("echo one; sleep 1.5; echo two"))
        live = await _events(c, tid)  # connects while it runs: history, then live, then the end
        kinds = [e.event for e in live]
        assert kinds[0] == "status_changed" and json.loads(live[0].data) == {"status": "queued"}
        assert json.loads(live[-1].data)["status"] == "completed"
        output = "".join(json.loads(e.data)["data"] for e in live if e.event == "output")
        assert output == "one\ntwo\n"
        ids = [e.id for e in live]
        assert all(ids) and len(set(ids)) == len(ids)
        # A late subscriber gets the same history; a resume gets exactly what followed.
        assert [e.id for e in await _events(c, tid)] == ids
        resumed = await _events(c, tid, **{"Last-Event-ID": ids[1]})
        assert [e.id for e in resumed] == ids[2:]
        r = await c.get(f"/api/tasks/{tid}/events", params={"last_event_id": ids[-1]})
        assert r.status_code == 204  # over and nothing left: EventSource stops reconnecting
        bad = await c.get(f"/api/tasks/{tid}/events", headers={"Last-Event-ID": "x; DROP"})
        assert problem(bad, 422)["errors"][0]["field"] == "Last-Event-ID"


async def test_sse_raw_frames_have_retry_and_keepalives(api: Api) -> None:
    async with api.client() as c:
        tid = await submitted(api, c, cmd("sleep 1.6"))
        raw = b""
        async with c.stream("GET", f"/api/tasks/{tid}/events") as r:
            async for chunk in r.aiter_bytes():
                raw += chunk
    text = raw.decode()
    assert text.startswith("retry: 2000\n\n")
    assert ": keepalive\n\n" in text  # the fixture sets a 0.5 s keep-alive period
    last = text.rstrip().rsplit("\n\n", 1)[-1]
    assert last.startswith("id: ") and '"status":"completed"' in last


async def test_sse_events_read_together_go_out_as_one_chunk(api: Api) -> None:
    """The frames of the events one read returned are sent in one piece (one send through the
    HTTP stack), the stream's end included."""
    from frontend.feeds import Feeds
    from frontend.public.events import _task_frames
    from frontend.sse import Hub, frame

    async with api.client() as c:
        tid = await submitted(api, c, cmd("echo a"), cmd("echo b"))
    service = api.daemon.service

    async def ended() -> bool:
        events = await service.events(tid)
        return events[-1].type == "status_changed" and events[-1].data["status"] == "completed"

    await wait_for(ended, timeout=10)
    events = await service.events(tid)
    async with trio.open_nursery() as nursery:
        feeds = Feeds(Hub(nursery, 15))
        chunks = [c async for c in _task_frames(service, feeds, tid, "0-0", events)]
    assert len(events) >= 6
    assert chunks == [b"retry: 2000\n\n", b"".join(frame(e.id, e.type, e.data) for e in events)]


async def test_sse_disconnect_is_cleaned_up_at_once(api: Api) -> None:
    async with api.client() as c:
        tid = await submitted(api, c, cmd("sleep 5"))
        async with c.stream("GET", f"/api/tasks/{tid}/events") as r:
            async for _ in r.aiter_bytes():
                break
            assert await _open_streams(api) == 1

        async def closed() -> bool:
            return await _open_streams(api) == 0

        await wait_for(closed, timeout=5)
        await c.post(f"/api/tasks/{tid}/cancel")


async def _open_streams(api: Api) -> int:
    """Event streams the daemon has open, as its /metrics (on the internal API) says."""
    async with httpx.AsyncClient(base_url=api.internal) as anon:
        text = (await anon.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("wsrunner_sse_subscribers "):
            return int(float(line.split()[1]))
    raise AssertionError("wsrunner_sse_subscribers is missing from /metrics")


async def test_authentication(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.public) as anon:
        r = await anon.get("/api/tasks")
        assert problem(r, 401)["detail"] == "send Authorization: Bearer <token>"
        assert r.headers["www-authenticate"].startswith("Bearer")
        for header in (
            "Bearer",
            "Basic abc",
            "Bearer wsr_nope",
            "Bearer wsr_0123456789ab_" + "A" * 43,
            api.token,
        ):
            problem(await anon.get("/api/tasks", headers={"Authorization": header}), 401)
        assert (await anon.get("/openapi.json")).status_code == 200
    record, token = await api.daemon.service.tokens.create("soon revoked", None)
    await api.daemon.service.tokens.revoke(record.id)
    async with api.client(token) as c:
        assert "revoked" in problem(await c.get("/api/tasks"), 401)["detail"]
    rows = await api.daemon.service.tokens.list()
    assert all(token not in str(r) for r in rows)  # only the digest is stored


async def test_a_scoped_token_never_sees_other_workspaces(api: Api) -> None:
    _, scoped = await api.daemon.service.tokens.create("team a", ["ws-a"])
    async with api.client() as admin, api.client(scoped) as a:
        theirs = await submitted(api, admin, cmd("true"), workspace_id="ws-b")
        mine = await submitted(api, a, cmd("true"), workspace_id="ws-a")
        for r in (
            await a.get(f"/api/tasks/{theirs}"),
            await a.post(f"/api/tasks/{theirs}/cancel"),
            await a.get(f"/api/tasks/{theirs}/events"),
            await a.get("/api/tasks", params={"workspace_id": "ws-b"}),
            await a.post("/api/tasks/submit", json=task_body(cmd("true"), workspace_id="ws-b")),
            await a.post(
                "/api/workspaces/ws-b/github/clone", json={"repo_url": "https://github.com/a/b.git"}
            ),
        ):
            problem(r, 404)
        listed = (await a.get("/api/tasks")).json()["tasks"]
        assert [t["id"] for t in listed] == [mine]
        assert (await admin.get(f"/api/tasks/{mine}")).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"repo_url": "http://github.com/a/b.git"}, "repo_url"),
        ({"repo_url": "https://evil.example/a/b.git"}, "repo_url"),
        ({"repo_url": "https://x-access-token:t@github.com/a/b.git"}, "repo_url"),
        ({"repo_url": "https://github.com/"}, "repo_url"),
        ({"repo_url": "https://github.com/a/b.git", "branch": "-x"}, "branch"),
        ({"repo_url": "https://github.com/a/b.git", "branch": "a b"}, "branch"),
        ({"repo_url": "https://github.com/a/b.git", "upload_pack": "x"}, "upload_pack"),
        ({}, "repo_url"),
    ],
)
async def test_clone_request_validation(api: Api, body, field) -> None:
    async with api.client() as c:
        r = await c.post("/api/workspaces/ws-1/github/clone", json=body)
    assert problem(r, 422)["errors"][0]["field"] == field


# --- a real clone over HTTP, with the workspace's token ------------------------------------------

SECRET = "ghp_TOPSECRET_0123456789"


@pytest.fixture(name="git_http")
def _git_http(tmp_path: Path) -> Iterator[str]:
    """A dumb-HTTP git server for one repository that demands the token as a password."""
    bare = tmp_path / "srv" / "proj.git"
    work = tmp_path / "work"
    git_repo(work, {"README": "from http\n"})
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    with git_http_server(tmp_path / "srv", SECRET) as address:
        yield address


async def test_clone_uses_the_workspace_token_and_never_stores_it(
    start_daemon, git_http: str, tmp_path: Path, redis_client
) -> None:
    creds = tmp_path / "git-credentials.yaml"
    creds.write_text(f"workspaces:\n  ws-git:\n    '{git_http}': {SECRET}\n")
    creds.chmod(0o600)
    # The test's git server listens on the host's loopback, which `egress` never reaches.
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        bundled_policy().read_text().replace("gitNetwork: egress", "gitNetwork: host")
    )
    daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token="t",
        clone_schemes=("http",),
        clone_hosts=(git_http,),
        git_schemes=("http",),
        git_credentials_file=creds,
        policy_file=policy,
    )
    _, token = await daemon.service.tokens.create("t", None)
    api = Api(daemon, daemon.urls[0], daemon.urls[1], token)
    url = f"http://{git_http}/proj.git"
    async with api.client() as c:
        r = await c.post(
            "/api/workspaces/ws-git/github/clone",
            json={"repo_url": url, "branch": "main", "shallow": False},
        )
        assert r.status_code == 202, r.text
        tid = r.json()["task_id"]
        rec = await final(c, tid)
        events = (await c.get(f"/api/tasks/{tid}/events")).text
    assert rec["status"] == "completed", rec["result"]["result"]["steps"][0]["result"]["stderr"]
    repo = daemon.settings.volume_path / "ws-git" / "repos" / "proj"
    assert (repo / "README").read_text() == "from http\n"
    assert rec["configuration"]["steps"][0]["repo"] == url
    stored = [json.dumps(rec), events, (repo / ".git" / "config").read_text()]
    stored += [
        str(redis_client.hgetall(k))
        for k in redis_client.scan_iter(f"{daemon.settings.redis_prefix}:*")
        if redis_client.type(k) == "hash"
    ]
    assert all(SECRET not in s for s in stored)
    # A later git_pull step authenticates the same way (the server asks on every request).
    async with api.client() as c:
        pull = {"action": "git_pull", "repo_name": "proj"}
        rec = await final(c, await submitted(api, c, pull, workspace_id="ws-git"))
    assert rec["status"] == "completed", rec["result"]
    # Without a token for this workspace the server refuses, and the task says so.
    async with api.client() as c:
        r = await c.post(
            "/api/workspaces/ws-other/github/clone", json={"repo_url": url, "shallow": False}
        )
        rec = await final(c, r.json()["task_id"])
    assert rec["status"] == "failed"
    assert "could not read Username" in rec["result"]["result"]["steps"][0]["result"]["stderr"]


async def test_worker_only_daemon_serves_no_http(daemon) -> None:
    assert daemon.urls == []
    with trio.fail_after(5):
        sub = await daemon.service.submit(task_body(cmd("true")))
    assert sub.created
