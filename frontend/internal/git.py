"""One git operation in a workspace, from a fixed set."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify
from quart_schema import document_request, document_response, operation_id, tag_blueprint

from frontend import schemas
from frontend.app import concurrent, json_object
from frontend.context import current_service

blueprint = Blueprint("git", __name__)
tag_blueprint(blueprint, ["git"])


@blueprint.post("/workspaces/<workspace_id>/git")
@operation_id("runGit")
@document_request(schemas.GitRequest)
@document_response(schemas.CommandResult)
async def git(workspace_id: str) -> Response:
    """One git operation from a fixed set; options that run programs are refused."""
    body = await json_object()
    return jsonify(
        await current_service().git(
            workspace_id,
            body.get("operation"),
            body.get("cwd"),
            body.get("args"),
            body.get("branch"),
            concurrent=concurrent(body),
        )
    )
