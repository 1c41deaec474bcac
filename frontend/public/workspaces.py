"""A workspace's repository clone: queued as a task, answered like a submission."""

from __future__ import annotations

from quart import Blueprint, Response
from quart_schema import (
    document_headers,
    document_request,
    document_response,
    operation_id,
    tag_blueprint,
)

from frontend import schemas
from frontend.app import json_body
from frontend.context import current_scope, current_service
from frontend.public.tasks import accepted, with_idempotency

blueprint = Blueprint("workspaces", __name__)
tag_blueprint(blueprint, ["workspaces"])


@blueprint.post("/api/workspaces/<workspace_id>/github/clone")
@operation_id("cloneRepository")
@document_request(schemas.CloneRequest)
@document_headers(schemas.IdempotencyHeaders)
@document_response(schemas.Accepted, 202, schemas.AcceptedHeaders)
async def clone(workspace_id: str) -> Response:
    """Queue a clone into repos/ of the workspace; its git token is added when it runs."""
    body = with_idempotency(await json_body())
    return accepted(await current_service().submit_clone(workspace_id, body, scope=current_scope()))
