"""Regex search in a workspace."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify, request
from quart_schema import document_querystring, document_response, operation_id, tag_blueprint

from frontend import schemas
from frontend.app import query_int, required_arg
from frontend.context import current_service

blueprint = Blueprint("grep", __name__)
tag_blueprint(blueprint, ["search"])


@blueprint.get("/workspaces/<workspace_id>/files/grep")
@operation_id("grepFiles")
@document_querystring(schemas.GrepQuery)
@document_response(schemas.GrepResult)
async def grep(workspace_id: str) -> Response:
    """Regex search; matches sorted by file and line."""
    return jsonify(
        await current_service().grep(
            workspace_id,
            required_arg("pattern"),
            request.args.get("path") or ".",
            request.args.get("include") or None,
            query_int("max_results", 50),
        )
    )
