"""The OpenAPI documents: valid 3.1, complete, and true to the running daemon (schemathesis)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
import trio
from httpx_sse import aconnect_sse
from openapi_spec_validator import validate
from quart import Quart
from quart_schema import QuartSchema

from frontend.openapi import REF, Provider, document
from frontend.sse import EVENT_ID
from tests.conftest import INTERNAL_TOKEN, Api, cmd, task_body, wait_for
from wsrunner.taskshape import STEP_MODELS, TaskRequest


async def _doc(base: str) -> dict:
    async with httpx.AsyncClient(base_url=base) as c:
        r = await c.get("/openapi.json")
    assert r.status_code == 200
    doc: dict = r.json()
    return doc


async def test_documents_are_valid_and_cover_every_route(api: Api) -> None:
    public, internal = await _doc(api.public), await _doc(api.internal)
    for doc in (public, internal):
        validate(doc)
        assert doc["openapi"].startswith("3.1")
    assert set(public["paths"]) == {
        "/api/tasks/submit",
        "/api/tasks",
        "/api/tasks/{task_id}",
        "/api/tasks/{task_id}/cancel",
        "/api/tasks/{task_id}/events",
        "/api/workspaces/{workspace_id}/github/clone",
        "/livez",
        "/readyz",
        "/api/tools",
        "/api/tools/call",
    }
    assert set(internal["paths"]) == {
        "/health",
        "/workspaces/{workspace_id}/files",
        "/workspaces/{workspace_id}/files/content",
        "/workspaces/{workspace_id}/files/write",
        "/workspaces/{workspace_id}/exec",
        "/workspaces/{workspace_id}/exec/stream",
        "/workspaces/{workspace_id}/files/grep",
        "/workspaces/{workspace_id}/git",
        "/livez",
        "/readyz",
    }
    submit = public["paths"]["/api/tasks/submit"]["post"]
    assert set(submit["responses"]) >= {"202", "401", "409", "422"}
    assert "application/problem+json" in submit["responses"]["422"]["content"]
    events = public["paths"]["/api/tasks/{task_id}/events"]["get"]["responses"]
    assert "text/event-stream" in events["200"]["content"]
    assert public["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert internal["paths"]["/health"]["get"]["security"] == []
    content = internal["paths"]["/workspaces/{workspace_id}/files/content"]["get"]
    assert {"name": "path", "in": "query", "required": True}.items() <= next(
        p for p in content["parameters"] if p["name"] == "path"
    ).items()


def _operations(doc: dict) -> dict[tuple[str, str], dict]:
    return {
        (method, path): op for path, item in doc["paths"].items() for method, op in item.items()
    }


def _component(doc: dict, ref: str) -> dict:
    schema: dict = doc["components"]["schemas"][ref.removeprefix("#/components/schemas/")]
    return schema


def _stream_events(doc: dict, method: str, path: str) -> dict[str, dict]:
    """Event type -> the schema of its `data`, from a route's text/event-stream response."""
    stream = doc["paths"][path][method]["responses"]["200"]["content"]["text/event-stream"]
    events = {}
    for alternative in stream["schema"]["oneOf"]:
        data = alternative["properties"]["data"]
        assert data["contentMediaType"] == "application/json"
        events[alternative["properties"]["event"]["const"]] = _component(
            doc, data["contentSchema"]["$ref"]
        )
    return events


async def test_documents_are_exact(api: Api) -> None:
    """Explicit operationIds and tags; the task's shape from the core's models (the `shell`
    alias included); typed step results; each event type of a stream with its data; the
    request and response headers the handlers read and set."""
    public, internal = await _doc(api.public), await _doc(api.internal)
    for doc in (public, internal):
        ops = _operations(doc)
        ids = [op["operationId"] for op in ops.values()]
        assert len(ids) == len(set(ids)), ids
        assert all(i[0].islower() and "_" not in i for i in ids), ids  # not quart-schema's get_x
        declared = {tag["name"] for tag in doc["tags"]}
        for key, op in ops.items():
            assert op["tags"] and set(op["tags"]) <= declared, key
    assert {k: op["operationId"] for k, op in _operations(public).items()} == {
        ("post", "/api/tasks/submit"): "submitTask",
        ("get", "/api/tasks"): "listTasks",
        ("get", "/api/tasks/{task_id}"): "getTask",
        ("post", "/api/tasks/{task_id}/cancel"): "cancelTask",
        ("get", "/api/tasks/{task_id}/events"): "streamTaskEvents",
        ("post", "/api/workspaces/{workspace_id}/github/clone"): "cloneRepository",
        ("get", "/api/tools"): "listTools",
        ("post", "/api/tools/call"): "callTool",
        ("get", "/livez"): "checkLiveness",
        ("get", "/readyz"): "checkReadiness",
    }

    # The submit body is the core's model; `shell` is an alias of execute_command.
    submit = public["paths"]["/api/tasks/submit"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    expected = TaskRequest.model_json_schema(ref_template=REF)
    expected.pop("$defs")
    assert body == expected
    mapping = body["properties"]["steps"]["items"]["discriminator"]["mapping"]
    assert set(mapping) == set(STEP_MODELS)
    assert mapping["shell"] == mapping["execute_command"]
    execute = _component(public, mapping["shell"])
    assert set(execute["properties"]["action"]["enum"]) == {"execute_command", "shell"}
    for action, model in STEP_MODELS.items():
        assert _component(public, mapping[action]) == model.model_json_schema(ref_template=REF)

    # Typed results: a task's result holds each step's result, by action.
    task = _component(public, "Task")
    result = _component(public, task["properties"]["result"]["anyOf"][0]["$ref"])
    outcome = _component(public, result["properties"]["result"]["anyOf"][0]["$ref"])
    outcomes = outcome["properties"]["steps"]["items"]["discriminator"]["mapping"]
    assert set(outcomes) == set(STEP_MODELS) - {"shell"}
    command = _component(public, outcomes["execute_command"])["properties"]["result"]["$ref"]
    assert {"exit_code", "stdout", "stderr", "truncated", "duration_ms", "error"} <= set(
        _component(public, command)["properties"]
    )
    listing = _component(public, outcomes["list_directory"])["properties"]["result"]["$ref"]
    assert {"entries", "count", "truncated"} <= set(_component(public, listing)["properties"])

    # Each event type of a stream, with the schema of its data.
    events = _stream_events(public, "get", "/api/tasks/{task_id}/events")
    assert set(events) == {"status_changed", "progress_update", "output", "error"}
    assert "status" in events["status_changed"]["required"]
    assert set(events["output"]["required"]) == {"step", "stream", "data"}
    exec_events = _stream_events(internal, "post", "/workspaces/{workspace_id}/exec/stream")
    assert set(exec_events) == {"output", "exit", "error"}
    for doc, method, path, ids in (
        (public, "get", "/api/tasks/{task_id}/events", True),
        (internal, "post", "/workspaces/{workspace_id}/exec/stream", False),
    ):
        stream = doc["paths"][path][method]["responses"]["200"]["content"]["text/event-stream"]
        assert all(("id" in a["required"]) == ids for a in stream["schema"]["oneOf"]), path
    assert "exit_code" in exec_events["exit"]["properties"]

    # Headers: Last-Event-ID (or its query twin) in; Location, Idempotent-Replayed, Link and
    # Retry-After out.
    stream = public["paths"]["/api/tasks/{task_id}/events"]["get"]
    parameters = {(p["in"], p["name"]): p for p in stream["parameters"]}
    assert parameters["header", "Last-Event-ID"]["schema"]["pattern"] == f"^{EVENT_ID.pattern}$"
    assert parameters["query", "last_event_id"]["schema"]["pattern"] == f"^{EVENT_ID.pattern}$"
    for path in ("/api/tasks/submit", "/api/workspaces/{workspace_id}/github/clone"):
        headers = public["paths"][path]["post"]["responses"]["202"]["headers"]
        assert headers["Location"]["required"] and not headers["Idempotent-Replayed"]["required"]
    listed = public["paths"]["/api/tasks"]["get"]["responses"]["200"]
    assert not listed["headers"]["Link"]["required"]
    assert "Retry-After" in submit["responses"]["503"]["headers"]
    assert "WWW-Authenticate" in submit["responses"]["401"]["headers"]


def _check(doc: dict, schema: dict, value: object) -> None:
    """`value` is valid under `schema`, a schema of `doc` (its references resolved there)."""
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(value)


async def test_what_a_task_returns_is_what_the_document_says(api: Api) -> None:
    """A task with a step of each kind (failed ones included): its record, its page in the
    list and every event of its stream, checked against the public document."""
    doc = await _doc(api.public)
    ops = _operations(doc)
    steps = [
        cmd("echo out; echo err >&2"),
        {"action": "create_directory", "path": "d/e"},
        {"action": "write_file", "path": "d/f.txt", "content": "x"},
        {"action": "read_file", "path": "d/f.txt"},
        {"action": "list_directory", "path": "d"},
        {"action": "git_pull", "repo_name": "missing"},
        cmd("exit 3"),
    ]
    async with api.client() as c:
        r = await c.post("/api/tasks/submit", json=task_body(*steps, workspace_id="ws-doc"))
        assert r.status_code == 202 and r.headers["location"].endswith(r.json()["task_id"])
        tid = r.json()["task_id"]

        async def ended() -> dict | None:
            body: dict = (await c.get(f"/api/tasks/{tid}")).json()
            return body if body["status"] in ("completed", "failed") else None

        record = await wait_for(ended, timeout=60)
        page = (await c.get("/api/tasks", params={"workspace_id": "ws-doc"})).json()
        events = []
        async with aconnect_sse(c, "GET", f"/api/tasks/{tid}/events") as source:
            async for event in source.aiter_sse():
                if event.data:
                    events.append(event)
        # The largest id the document admits is one Redis takes (a part of 20 digits can be
        # over 64 bits: Redis refused it, a 503); a longer one is refused as the document says.
        stream = ops["get", "/api/tasks/{task_id}/events"]
        pattern = next(p for p in stream["parameters"] if p["name"] == "Last-Event-ID")
        digits = int(re.fullmatch(r"\^\\d\{1,(\d+)\}-.*", pattern["schema"]["pattern"])[1])
        largest = "-".join(["9" * digits] * 2)
        r = await c.get(f"/api/tasks/{tid}/events", params={"last_event_id": largest})
        assert r.status_code == 204, r.text  # it ended, and nothing follows
        r = await c.get(f"/api/tasks/{tid}/events", headers={"Last-Event-ID": "1" + largest})
        assert r.status_code == 422, r.text
    schema = ops["get", "/api/tasks/{task_id}"]["responses"]["200"]["content"]["application/json"]
    _check(doc, schema["schema"], record)
    assert [s["action"] for s in record["result"]["result"]["steps"]] == [
        s["action"] for s in steps
    ]
    assert record["status"] == "failed"  # git_pull and `exit 3`: their results say why
    schema = ops["get", "/api/tasks"]["responses"]["200"]["content"]["application/json"]
    _check(doc, schema["schema"], page)
    documented = _stream_events(doc, "get", "/api/tasks/{task_id}/events")
    assert {e.event for e in events} == set(documented)  # each type, in this task
    for event in events:
        _check(doc, documented[event.event], json.loads(event.data))


def test_a_route_without_an_explicit_operation_id_is_refused() -> None:
    """quart-schema would name it `get_<function>`, which changes when the handler is renamed."""
    app = Quart(__name__, static_folder=None)
    QuartSchema(app, openapi_path=None, openapi_provider_class=Provider)

    @app.get("/x")
    async def unnamed() -> str:
        return "x"

    with pytest.raises(TypeError, match="GET /x has no operationId"):
        document(app)


async def _schemathesis(base: str, headers: dict[str, str], tmp_path: Path, *extra: str) -> None:
    st = Path(sys.executable).with_name("st")
    argv = [
        str(st),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance",
        "--max-examples",
        os.environ.get("WSRUNNER_FUZZ_EXAMPLES", "25"),
        "--request-timeout",
        "20",
        "--seed",
        "1",
        "--no-color",
        "--report-dir",
        str(tmp_path),
        *extra,
    ]
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    with trio.fail_after(600):
        result = await trio.run_process(
            argv,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out[-6000:]
    print(out[out.rfind("Test cases:") :].strip())  # shown with -rP: how much was generated


@pytest.mark.fuzz
async def test_fuzz_public_api(api: Api, tmp_path: Path) -> None:
    """No 500, no hang, every response as documented, for generated requests."""
    # Tool calls included: generated commands meet the policy and run in the sandbox.
    await _schemathesis(api.public, {"Authorization": f"Bearer {api.token}"}, tmp_path)


@pytest.mark.fuzz
async def test_fuzz_internal_api(api: Api, tmp_path: Path) -> None:
    # exec and git included: generated commands meet the policy and run in the sandbox.
    await _schemathesis(api.internal, {"X-Internal-Token": INTERNAL_TOKEN}, tmp_path)
