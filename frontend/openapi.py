"""The OpenAPI 3.1 document of an app: quart-schema's, completed with what it cannot say.

quart-schema builds the paths from the routes and the `frontend.schemas` models. This adds the
problem+json error responses every operation can give, the SSE media type of streaming routes,
required query parameters, and no security on the open routes.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any, Final

from quart import Quart, jsonify
from quart_schema import hide
from quart_schema.openapi import OpenAPIProvider

from frontend.problems import MEDIA_TYPE
from frontend.schemas import Problem

_ERRORS: Final = {
    "400": "The body is not valid JSON",
    "401": "No valid bearer token or internal token",
    "403": "The path leaves the workspace or names wsrunner's own files, or the command "
    "policy denies the command (`rule` names the rule that decided)",
    "404": "No such task, workspace, file or route (or not visible to this token)",
    "409": "The request conflicts with the task's state or an earlier request",
    "413": "The request body or the file is too large",
    "422": "A field is not valid; `errors` names it",
    "507": "The workspace is over its storage quota",
    "503": "Redis or PostgreSQL is unavailable, every command slot is busy (retry later), or "
    "the host cannot give the isolation the policy requires (`missing` says why)",
}

#: One event of a stream, as an EventSource client sees it; `data` is JSON text.
_SSE_EVENT: Final = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["event", "data"],
}


class Provider(OpenAPIProvider):
    """Marks the required query parameters (quart-schema leaves them all optional)."""

    def build_querystring_parameters(
        self, model: Any
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parameters, definitions = super().build_querystring_parameters(model)
        required = set(model.model_json_schema().get("required", []))
        for parameter in parameters:
            if parameter["name"] in required:
                parameter["required"] = True
        return parameters, definitions


def install_openapi(app: Quart, *, sse_paths: Collection[str] = (),
                    open_paths: Collection[str] = ()) -> None:  # fmt: skip
    """Serve the completed document at `/openapi.json` (open, like the routes in `open_paths`)."""
    cached: dict[str, Any] = {}

    @app.get("/openapi.json")
    @hide
    async def openapi() -> Any:
        if not cached:
            cached.update(document(app, sse_paths=sse_paths, open_paths=open_paths))
        return jsonify(cached)


def document(app: Quart, *, sse_paths: Collection[str] = (),
             open_paths: Collection[str] = ()) -> dict[str, Any]:  # fmt: skip
    doc: dict[str, Any] = copy.deepcopy(app.extensions["QUART_SCHEMA"].openapi_provider.schema())
    schemas = doc["components"]["schemas"]
    problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem_schema.pop("$defs", {}))
    schemas["Problem"] = problem_schema
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            # quart-schema keys documented statuses by int; JSON (and sorting) needs strings.
            responses = {str(k): v for k, v in operation.get("responses", {}).items()}
            operation["responses"] = responses
            for status, description in _ERRORS.items():
                responses.setdefault(status, {
                    "description": description,
                    "content": {MEDIA_TYPE: {"schema": problem}},
                })  # fmt: skip
            if path in sse_paths:
                responses["200"] = {
                    "description": "A stream of Server-Sent Events (id, event, data as JSON)",
                    "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                }
                responses["204"] = {"description": "The task has ended and nothing is left to send"}
            if path in open_paths:
                operation["security"] = []
                responses.pop("401", None)
    return doc
