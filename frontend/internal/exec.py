"""Commands in a workspace: run one and answer with its result, or stream its output as SSE."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import trio
from quart import Blueprint, Response, jsonify
from quart_schema import document_request, document_response, operation_id, tag_blueprint

from frontend import schemas
from frontend.app import concurrent, json_object
from frontend.context import current_hub, current_service
from frontend.openapi import document_events
from frontend.sse import KEEPALIVE, Hub, frame, stream_response
from wsrunner.errors import WsrunnerError
from wsrunner.models import JSON
from wsrunner.service import Service

logger = logging.getLogger(__name__)

STREAM_BUFFER: Final = 256  #: output chunks a slow reader of /exec/stream may fall behind

blueprint = Blueprint("exec", __name__)
tag_blueprint(blueprint, ["exec"])


@blueprint.post("/workspaces/<workspace_id>/exec")
@operation_id("execCommand")
@document_request(schemas.ExecRequest)
@document_response(schemas.CommandResult)
async def exec_command(workspace_id: str) -> Response:
    """Run a shell command in the workspace; a non-zero exit is a result, not an error."""
    body = await json_object()
    return jsonify(
        await current_service().exec(
            workspace_id,
            body.get("command"),
            body.get("cwd"),
            body.get("timeout"),
            concurrent=concurrent(body),
        )
    )


@blueprint.post("/workspaces/<workspace_id>/exec/stream")
@operation_id("execCommandStream")
@document_request(schemas.ExecRequest)
@document_events(
    {"output": schemas.ExecOutput, "exit": schemas.ExecExit, "error": schemas.ExecError}
)
async def exec_stream(workspace_id: str) -> Response:
    """Run a command and stream it as SSE: `output` events, then one `exit` with the result."""
    body = await json_object()
    concurrent(body)  # checked now: a bad flag is a problem, not a stream
    service = current_service()
    await service.check_exec(
        workspace_id, body.get("command"), body.get("cwd"), body.get("timeout")
    )
    return await stream_response(_exec_frames(service, current_hub(), workspace_id, body))


async def _exec_frames(
    service: Service, hub: Hub, workspace_id: str, body: dict[str, Any]
) -> AsyncIterator[bytes]:
    """Run the command in the hub's nursery; end it (and kill its group) if the client goes."""
    send, receive = trio.open_memory_channel[tuple[str, JSON]](STREAM_BUFFER)
    dropped = 0

    def on_output(stream: str, chunk: bytes) -> None:
        nonlocal dropped
        try:
            text = chunk.decode("utf-8", errors="replace")
            send.send_nowait(("output", {"stream": stream, "text": text}))
        except trio.WouldBlock:
            dropped += len(chunk)  # the reader is behind; the final result still has it all

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with send:
                try:
                    result = await service.exec(
                        workspace_id,
                        body.get("command"),
                        body.get("cwd"),
                        body.get("timeout"),
                        on_output=on_output,
                        concurrent=concurrent(body),
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
