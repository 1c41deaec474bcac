"""The agent tools: their JSON Schema definitions, and one call in a workspace of the token's
scope."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify
from quart_schema import document_request, document_response, operation_id, tag_blueprint

from frontend import schemas
from frontend.app import concurrent, json_object
from frontend.context import current_scope, current_service

blueprint = Blueprint("tools", __name__)
tag_blueprint(blueprint, ["tools"])


@blueprint.get("/api/tools")
@operation_id("listTools")
@document_response(schemas.ToolList)
async def tool_definitions() -> Response:
    """The workspace tools an agent can call, as JSON Schema tool definitions."""
    return jsonify({"tools": current_service().tool_definitions()})


@blueprint.post("/api/tools/call")
@operation_id("callTool")
@document_request(schemas.ToolCall)
@document_response(schemas.ToolResult)
async def call_tool() -> Response:
    """Run one tool in a workspace of the token's scope, under the same limits as the
    internal API."""
    body = await json_object()
    result = await current_service().call_tool(
        body.get("workspace_id"),
        body.get("tool"),
        body.get("arguments", {}),
        scope=current_scope(),
        concurrent=concurrent(body),
    )
    return jsonify({"tool": body["tool"], "result": result})
