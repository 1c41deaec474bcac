"""The internal API (WORKER_HEALTH_PORT): health, metrics, and file/exec/grep/git for orchestrators.

The reference system's paths, so its orchestrator client works unchanged. Every route but
`/health`, the probes, `/metrics` and `/openapi.json` needs `X-Internal-Token`, compared in
constant time. Paths are contained in the workspace by the core (`wsrunner.workspace.paths`); errors are
problem+json, with the message repeated under `error` where the reference's clients read it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import trio
from quart import Response, jsonify, request
from quart_schema import (
    QuartSchema,
    document_querystring,
    document_request,
    document_response,
    hide,
)

from frontend import probes, problems, schemas
from frontend.app import App, json_object, query_int
from frontend.openapi import Provider, install_openapi
from frontend.sse import KEEPALIVE, Hub, frame, stream_response
from wsrunner import __version__
from wsrunner.errors import AuthenticationError, ValidationError, WsrunnerError
from wsrunner.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from wsrunner.models import JSON
from wsrunner.service import Service

logger = logging.getLogger(__name__)

OPEN_PATHS: Final = frozenset({"/health", "/metrics", "/openapi.json"}) | probes.PATHS
STREAM_BUFFER: Final = 256  #: output chunks a slow reader of /exec/stream may fall behind


def _required_arg(name: str) -> str:
    value = request.args.get(name)
    if value is None or value == "":
        raise ValidationError(name, "is required")
    return value


def create_internal_app(service: Service, hub: Hub) -> App:
    app = App("wsrunner.internal", api="internal", metrics=service.metrics)
    app.config["MAX_CONTENT_LENGTH"] = service.settings.max_request_bytes
    problems.install(app, error_member=True)
    QuartSchema(
        app,
        openapi_path=None,
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        info={"title": "wsrunner internal API", "version": __version__},
        security_schemes={
            "internal_token": {"type": "apiKey", "in_": "header", "name": "X-Internal-Token"}
        },
        security=[{"internal_token": []}],
        openapi_provider_class=Provider,
    )
    probes.install_probes(app, service)
    install_openapi(app, sse_paths={"/workspaces/{workspace_id}/exec/stream"},
                    open_paths=OPEN_PATHS)  # fmt: skip
    expected = service.settings.internal_token.encode()
    ws = service.workspace

    @app.before_request
    async def check_token() -> None:
        if request.path in OPEN_PATHS or not expected:  # no token: explicitly allowed (server.py)
            return
        given = request.headers.get("X-Internal-Token", "").encode()
        if not hmac.compare_digest(given, expected):
            raise AuthenticationError("send the daemon's internal token in X-Internal-Token")

    @app.get("/health")
    @document_response(schemas.Health)
    @document_response(schemas.Health, 503)
    async def health() -> Any:
        """Whether Redis and PostgreSQL answer; 503 when one does not."""
        body = await service.health()
        return jsonify(body), 200 if body["status"] == "healthy" else 503

    @app.get("/metrics")
    @hide  # Prometheus text, not JSON: kept out of the OpenAPI document
    async def metrics() -> Response:
        """Prometheus metrics of this daemon. No token, like the probes: Prometheus scrapes it,
        and its labels carry no ids or secrets."""
        body = await service.metrics_text(sse_subscribers=hub.open_streams)
        return Response(body, content_type=METRICS_CONTENT_TYPE)

    @app.get("/workspaces/<workspace_id>/files")
    @document_querystring(schemas.PathQuery)
    @document_response(schemas.Listing)
    async def list_files(workspace_id: str) -> Response:
        """A directory listing: directories first, then by name."""
        return jsonify(await ws.list_files(workspace_id, request.args.get("path") or "."))

    @app.get("/workspaces/<workspace_id>/files/content")
    @document_querystring(schemas.RequiredPathQuery)
    @document_response(schemas.FileContent)
    async def read_file(workspace_id: str) -> Response:
        """A file's content: UTF-8 text, or base64 when it is binary (`encoding` says which)."""
        return jsonify(await ws.read_file(workspace_id, _required_arg("path")))

    @app.post("/workspaces/<workspace_id>/files/write")
    @document_request(schemas.WriteRequest)
    @document_response(schemas.WriteResult)
    async def write_file(workspace_id: str) -> Response:
        """Write a text file atomically, creating its parents, within the storage quota."""
        body = await json_object()
        path, content = body.get("path"), body.get("content")
        if not isinstance(path, str) or not path.strip():
            raise ValidationError("path", "expected a non-empty string")
        return jsonify(await ws.write_file(workspace_id, path.strip(), content))

    @app.post("/workspaces/<workspace_id>/exec")
    @document_request(schemas.ExecRequest)
    @document_response(schemas.CommandResult)
    async def exec_command(workspace_id: str) -> Response:
        """Run a shell command in the workspace; a non-zero exit is a result, not an error."""
        body = await json_object()
        return jsonify(
            await ws.exec(workspace_id, body.get("command"), body.get("cwd"), body.get("timeout"))
        )

    @app.post("/workspaces/<workspace_id>/exec/stream")
    @document_request(schemas.ExecRequest)
    async def exec_stream(workspace_id: str) -> Response:
        """Run a command and stream it as SSE: `output` events, then one `exit` with the result."""
        body = await json_object()
        command, _, _ = ws.check_exec(body.get("command"), body.get("cwd"), body.get("timeout"))
        await ws.check_policy(workspace_id, command)
        return await stream_response(_exec_frames(service, hub, workspace_id, body))

    @app.get("/workspaces/<workspace_id>/files/grep")
    @document_querystring(schemas.GrepQuery)
    @document_response(schemas.GrepResult)
    async def grep(workspace_id: str) -> Response:
        """Regex search; matches sorted by file and line."""
        return jsonify(
            await ws.grep(
                workspace_id,
                _required_arg("pattern"),
                request.args.get("path") or ".",
                request.args.get("include") or None,
                query_int("max_results", 50),
            )
        )

    @app.post("/workspaces/<workspace_id>/git")
    @document_request(schemas.GitRequest)
    @document_response(schemas.CommandResult)
    async def git(workspace_id: str) -> Response:
        """One git operation from a fixed set; options that run programs are refused."""
        body = await json_object()
        return jsonify(
            await ws.git(
                workspace_id,
                body.get("operation"),
                body.get("cwd"),
                body.get("args"),
                body.get("branch"),
            )
        )

    return app


async def _exec_frames(service: Service, hub: Hub, workspace_id: str,
                       body: dict[str, Any]) -> AsyncIterator[bytes]:  # fmt: skip
    """Run the command in the hub's nursery; end it (and kill its group) if the client goes."""
    send, receive = trio.open_memory_channel[tuple[str, JSON]](STREAM_BUFFER)
    dropped = 0

    def on_output(stream: str, chunk: bytes) -> None:
        nonlocal dropped
        try:
            send.send_nowait(("output", {"stream": stream,
                                         "text": chunk.decode("utf-8", errors="replace")}))  # fmt: skip
        except trio.WouldBlock:
            dropped += len(chunk)  # the reader is behind; the final result still has it all

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with send:
                try:
                    result = await service.workspace.exec(
                        workspace_id,
                        body.get("command"),
                        body.get("cwd"),
                        body.get("timeout"),
                        on_output=on_output,
                    )
                except WsrunnerError as exc:
                    await send.send(("error", {"error": str(exc), "kind": type(exc).__name__}))
                    return
                except Exception:  # a bug must not take the server's nursery down
                    logger.exception("exec stream in workspace %s failed", workspace_id)
                    await send.send(("error", {"error": "internal error"}))
                    return
                if dropped:
                    result["stream_dropped_bytes"] = dropped
                await send.send(("exit", result))

    scope: trio.CancelScope = await hub.nursery.start(run)
    with hub.stream():
        try:
            while True:
                with hub.waiting() as wait, trio.move_on_after(hub.keepalive_s) as idle:
                    try:
                        kind, data = await receive.receive()
                    except trio.EndOfChannel:
                        return
                if wait.cancelled_caught:
                    return
                if idle.cancelled_caught:
                    yield KEEPALIVE
                    continue
                yield frame(None, kind, data)
                if kind in ("exit", "error"):
                    return
        finally:
            scope.cancel()  # the client left (or the stream ended): stop the command
