"""Agent tool definitions: valid JSON Schema, the seed's names and permissions, and executed."""

from __future__ import annotations

import json
import os
import sys

import trio
from jsonschema import Draft202012Validator

from tests.conftest import Api
from tests.integration.test_api_public import problem

SEED = {
    "workspace_read_file": "read",
    "workspace_write_file": "write",
    "workspace_list_dir": "read",
    "workspace_grep": "read",
    "workspace_exec": "write",
    "workspace_git": "write",
}


async def test_definitions_are_json_schema_and_match_the_cli(api: Api) -> None:
    async with api.client() as c:
        served = (await c.get("/api/tools")).json()
    assert {t["name"]: t["permission"] for t in served["tools"]} == SEED
    for tool in served["tools"]:
        Draft202012Validator.check_schema(tool["parameters"])
        assert tool["category"] == "workspace" and tool["description"]
    printed = await trio.run_process(
        [sys.executable, "-m", "wsrunner", "tools"], capture_stdout=True, env=dict(os.environ)
    )
    assert json.loads(printed.stdout) == served


async def test_every_tool_runs_through_the_call_endpoint(api: Api) -> None:
    async with api.client() as c:
        schemas = {t["name"]: t["parameters"] for t in (await c.get("/api/tools")).json()["tools"]}

        async def call(tool: str, **arguments: object) -> dict:
            Draft202012Validator(schemas[tool]).validate(arguments)  # what we send is valid
            r = await c.post(
                "/api/tools/call",
                json={"workspace_id": "ws-tools", "tool": tool, "arguments": arguments},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["tool"] == tool
            return dict(body["result"])

        assert (await call("workspace_write_file", path="src/x.py", content="x = 1\n"))["written"]
        assert (await call("workspace_read_file", path="src/x.py"))["content"] == "x = 1\n"
        listing = await call("workspace_list_dir", path="src")
        assert [e["name"] for e in listing["entries"]] == ["x.py"]
        found = await call("workspace_grep", pattern=r"x = \d", include="*.py")
        assert found["matches"] == [{"file": "src/x.py", "line": 1, "content": "x = 1"}]
        ran = await call("workspace_exec", command="wc -l < x.py", cwd="src", timeout=10)
        assert ran["exit_code"] == 0 and ran["stdout"].strip() == "1"
        assert (await call("workspace_git", operation="status"))["exit_code"] == 128  # no repo yet


async def test_tool_call_errors(api: Api) -> None:
    _, scoped = await api.daemon.service.tokens.create("agent", ["ws-mine"])
    async with api.client() as c, api.client(scoped) as agent:
        cases = [
            ({"workspace_id": "ws-t", "tool": "rm_rf", "arguments": {}}, 422, "tool"),
            (
                {"workspace_id": "ws-t", "tool": "workspace_read_file", "arguments": {}},
                422,
                "arguments.path",
            ),
            (
                {"workspace_id": "ws-t", "tool": "workspace_list_dir", "arguments": {"depth": 3}},
                422,
                "arguments.depth",
            ),
            (
                {
                    "workspace_id": "ws-t",
                    "tool": "workspace_exec",
                    "arguments": {"command": "true", "timeout": 0},
                },
                422,
                "arguments.timeout",
            ),
            (
                {
                    "workspace_id": "ws-t",
                    "tool": "workspace_git",
                    "arguments": {"operation": "log", "args": "--output=/tmp/x"},
                },
                422,
                "arguments.args[0]",
            ),
            (
                {"workspace_id": "../x", "tool": "workspace_list_dir", "arguments": {}},
                422,
                "workspace_id",
            ),
        ]
        for body, status, field in cases:
            r = await c.post("/api/tools/call", json=body)
            assert problem(r, status)["errors"][0]["field"] == field, body
        r = await c.post(
            "/api/tools/call",
            json={
                "workspace_id": "ws-t",
                "tool": "workspace_read_file",
                "arguments": {"path": "../../etc/passwd"},
            },
        )
        problem(r, 403)
        # Tool calls go through the same command policy and sandbox as tasks.
        r = await c.post(
            "/api/tools/call",
            json={
                "workspace_id": "ws-t",
                "tool": "workspace_exec",
                "arguments": {"command": "nc -l 9"},
            },
        )
        denied = problem(r, 403)
        assert denied["rule"] == "default-deny" and denied["type"].endswith("/policy-denied")
        r = await c.post(
            "/api/tools/call",
            json={
                "workspace_id": "ws-t",
                "tool": "workspace_exec",
                "arguments": {"command": "ls /root /run"},
            },
        )
        assert r.status_code == 200 and "No such file or directory" in r.json()["result"]["stderr"]
        r = await agent.post(
            "/api/tools/call",
            json={
                "workspace_id": "ws-other",
                "tool": "workspace_exec",
                "arguments": {"command": "touch pwned"},
            },
        )
        problem(r, 404)
    assert not (api.daemon.settings.volume_path / "ws-other" / "pwned").exists()
