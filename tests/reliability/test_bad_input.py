"""Bad input on every endpoint of both APIs, and malformed payloads pushed straight into Redis.

Every answer is a clear client error (problem+json naming what was wrong), never a 5xx; nothing
queued before or after is lost.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import httpx
import redis

from tests.conftest import cmd, task_body, wait_for
from tests.reliability.conftest import Deployment, assert_complete
from tests.reliability.test_crashes import submit

TRAVERSALS = [
    "..",
    "../etc",
    "..%2Fetc",
    "%2e%2e",
    "a/../../b",
    "/etc/passwd",
    "ws\x00x",
    "a" * 300,
]
BODIES: dict[str, tuple[bytes, str]] = {
    "malformed JSON": (b'{"workspace_id": "ws-1", "steps": [', "application/json"),
    "a JSON array": (b"[1, 2, 3]", "application/json"),
    "a JSON string": (b'"steps"', "application/json"),
    "wrong types": (
        json.dumps(
            {
                "workspace_id": 7,
                "steps": "none",
                "path": ["x"],
                "command": {},
                "timeout": "soon",
                "content": 5,
                "repo": None,
            }
        ).encode(),
        "application/json",
    ),
    "unknown fields": (
        json.dumps(
            {
                **task_body(cmd("true")),
                "path": "a.txt",
                "content": "x",
                "command": "true",
                "surprise": 1,
            }
        ).encode(),
        "application/json",
    ),
    "invalid UTF-8": (b'{"workspace_id": "ws-\xff\xfe", "steps": []}', "application/json"),
    "not JSON at all": (b"workspace_id=ws-1", "application/x-www-form-urlencoded"),
    "huge": (b'{"pad": "' + b"x" * (11 * 1024 * 1024) + b'"}', "application/json"),
}


def operations(doc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(method, path, whether it takes a request body) of every operation in an OpenAPI doc."""
    return [
        (method.upper(), path, "requestBody" in op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "delete", "patch")
    ]


def fill(path: str, value: str) -> str:
    return re.sub(r"\{[^}]+\}", value, path)


def check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/problem+json"), what
        problem = r.json()
        assert problem["status"] == r.status_code and problem["detail"], (what, problem)


async def test_every_endpoint_answers_bad_input_with_a_clear_client_error(
    deployment: Deployment,
) -> None:
    d = await deployment.start("daemon")
    internal_headers = {"X-Internal-Token": "reliability-internal"}
    async with (
        deployment.client(d) as pub,
        httpx.AsyncClient(base_url=d.internal, timeout=30, headers=internal_headers) as internal,
    ):
        before = await submit(pub, cmd("echo before"))
        apis = [
            (pub, (await pub.get("/openapi.json")).json()),
            (internal, (await internal.get("/openapi.json")).json()),
        ]
        sent = 0
        for client, doc in apis:
            ops = operations(doc)
            assert len(ops) >= 5
            for method, path, has_body in ops:
                for value in ["ws-1", *TRAVERSALS]:
                    target = fill(path, quote(value, safe=""))
                    r = await client.request(
                        method,
                        target,
                        params={"path": value, "pattern": "(", "limit": "-1", "after": value},
                    )
                    check(r, f"{method} {target}")
                    sent += 1
                if method == "GET":
                    continue
                for name, (body, ctype) in BODIES.items():
                    r = await client.request(
                        method, fill(path, "ws-1"), content=body, headers={"Content-Type": ctype}
                    )
                    check(r, f"{method} {path} with {name}")
                    if name == "huge" and has_body:
                        assert r.status_code == 413, (path, r.status_code)
                    sent += 1
        after = await submit(pub, cmd("echo after"))
        rows = await deployment.wait_terminal([before, after], timeout=60)
    assert_complete(rows[before], stdout="before\n")
    assert_complete(rows[after], stdout="after\n")
    assert sent > 100
    assert await d.stop() == 0


async def test_malformed_payloads_in_the_queues_are_dead_lettered_and_nothing_else_is_lost(
    deployment: Deployment,
) -> None:
    r = redis.Redis.from_url(deployment.redis_url)
    queue = f"{deployment.prefix}:tasks:normal"
    good_id = "7f1c5c1e-7a5e-4a8e-9a3e-000000000001"
    marked_id = "7f1c5c1e-7a5e-4a8e-9a3e-000000000002"
    bad = [
        b"not json",
        b"[]",
        b"{}",
        b"\xff\xfe\x00",
        b'{"task_id": 5}',
        b"x" * 2_000_000,
        json.dumps(
            {"task_id": marked_id, "workspace_id": "ws-1", "steps": [{"action": "rm -rf"}]}
        ).encode(),
        json.dumps({"task_id": "x", "workspace_id": "../etc", "steps": [cmd("true")]}).encode(),
    ]
    good = json.dumps(
        {
            "task_id": good_id,
            "workspace_id": "ws-1",
            "priority": "normal",
            "timeout_seconds": 60,
            "steps": [cmd("echo good")],
        }
    ).encode()
    r.lpush(queue, *bad[:4], good, *bad[4:])
    d = await deployment.start("daemon")
    rows = await deployment.wait_terminal([good_id], timeout=60)
    assert_complete(rows[good_id], stdout="good\n")
    # A payload with a usable task id gets an answer where its producer looks (it wrote no
    # durable record): the status hash says why it did not run.
    status = {
        k.decode(): v.decode()
        for k, v in r.hgetall(f"{deployment.prefix}:task:{marked_id}:status").items()
    }
    assert status["status"] == "failed" and "invalid payload" in status["error"], status
    assert "steps[0].action" in status["error"] and marked_id not in deployment.rows()
    dead_list = f"{deployment.prefix}:tasks:dead"
    await wait_for(lambda: r.llen(dead_list) == len(bad), timeout=30)
    dead = [json.loads(x.decode(errors="replace")) for x in r.lrange(dead_list, 0, -1)]
    assert len(dead) == len(bad) and all(x["reason"] for x in dead)
    assert r.llen(queue) == 0 and r.hlen(f"{deployment.prefix}:worker:daemon:inflight") == 0
    async with deployment.client(d) as c:  # and the daemon goes on working
        tid = await submit(c, cmd("echo still"))
    assert_complete((await deployment.wait_terminal([tid], timeout=30))[tid], stdout="still\n")
    assert await d.stop() == 0
