"""The OpenAPI documents: valid 3.1, complete, and true to the running daemon (schemathesis)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest
import trio
from openapi_spec_validator import validate

from tests.conftest import INTERNAL_TOKEN, Api


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
        "/api/tasks/submit", "/api/tasks", "/api/tasks/{task_id}", "/api/tasks/{task_id}/cancel",
        "/api/tasks/{task_id}/events", "/api/workspaces/{workspace_id}/github/clone",
        "/livez", "/readyz", "/api/tools", "/api/tools/call",
    }  # fmt: skip
    assert set(internal["paths"]) == {
        "/health", "/workspaces/{workspace_id}/files", "/workspaces/{workspace_id}/files/content",
        "/workspaces/{workspace_id}/files/write", "/workspaces/{workspace_id}/exec",
        "/workspaces/{workspace_id}/exec/stream", "/workspaces/{workspace_id}/files/grep",
        "/workspaces/{workspace_id}/git", "/livez", "/readyz",
    }  # fmt: skip
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


async def _schemathesis(base: str, headers: dict[str, str], tmp_path: Path, *extra: str) -> None:
    st = Path(sys.executable).with_name("st")
    argv = [str(st), "run", f"{base}/openapi.json", "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance", "--max-examples", os.environ.get("WSRUNNER_FUZZ_EXAMPLES", "25"), "--request-timeout", "20",
            "--seed", "1", "--no-color", "--report-dir", str(tmp_path), *extra]  # fmt: skip
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    with trio.fail_after(600):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                        env={**os.environ, "SCHEMATHESIS_HOOKS": ""})  # fmt: skip
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
