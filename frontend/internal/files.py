"""A workspace's files: a directory listing, a file's content, and an atomic write."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify, request
from quart_schema import (
    document_querystring,
    document_request,
    document_response,
    operation_id,
    tag_blueprint,
)

from frontend import schemas
from frontend.app import concurrent, json_object, required_arg
from frontend.context import current_service
from wsrunner.errors import ValidationError

blueprint = Blueprint("files", __name__)
tag_blueprint(blueprint, ["files"])


@blueprint.get("/workspaces/<workspace_id>/files")
@operation_id("listFiles")
@document_querystring(schemas.PathQuery)
@document_response(schemas.Listing)
async def list_files(workspace_id: str) -> Response:
    """A directory listing: directories first, then by name."""
    return jsonify(
        await current_service().list_files(workspace_id, request.args.get("path") or ".")
    )


@blueprint.get("/workspaces/<workspace_id>/files/content")
@operation_id("readFile")
@document_querystring(schemas.RequiredPathQuery)
@document_response(schemas.FileContent)
async def read_file(workspace_id: str) -> Response:
    """A file's content: UTF-8 text, or base64 when it is binary (`encoding` says which)."""
    return jsonify(await current_service().read_file(workspace_id, required_arg("path")))


@blueprint.post("/workspaces/<workspace_id>/files/write")
@operation_id("writeFile")
@document_request(schemas.WriteRequest)
@document_response(schemas.WriteResult)
async def write_file(workspace_id: str) -> Response:
    """Write a text file atomically, creating its parents, within the storage quota."""
    body = await json_object()
    path, content = body.get("path"), body.get("content")
    if not isinstance(path, str) or not path.strip():
        raise ValidationError("path", "expected a non-empty string")
    return jsonify(
        await current_service().write_file(
            workspace_id, path.strip(), content, concurrent=concurrent(body)
        )
    )
