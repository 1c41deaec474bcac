"""The OpenAPI 3.1 document of an app: quart-schema's, completed with what it cannot say.

quart-schema builds the paths from the routes and the `frontend.schemas` models. `Provider`
makes every operation name its operationId explicitly, puts response headers where OpenAPI
reads them, marks required query parameters, and describes a route's Server-Sent Events
(`document_events`): one schema per event type, its `data` the JSON of a model. `document`
adds the problem+json error responses every operation can give (with their headers), and no
security on the open routes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final, TypeVar

from pydantic import BaseModel
from quart import Quart, jsonify
from quart_schema import hide
from quart_schema.openapi import QUART_SCHEMA_OPERATION_ID_ATTRIBUTE, OpenAPIProvider
from werkzeug.routing import Rule

from frontend.problems import MEDIA_TYPE, RETRY_AFTER_S
from frontend.schemas import Problem

T = TypeVar("T")
REF: Final = "#/components/schemas/{model}"
_EVENTS_ATTRIBUTE: Final = "_wsrunner_events"

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
#: The headers `frontend.problems` sets on an error response, by status.
_ERROR_HEADERS: Final = {
    "401": {
        "WWW-Authenticate": {
            "description": 'the scheme to authenticate with: Bearer realm="wsrunner"',
            "schema": {"type": "string"},
        }
    },
    "503": {
        "Retry-After": {
            "description": "seconds to wait before retrying (when Redis or PostgreSQL is "
            f"unavailable: {RETRY_AFTER_S})",
            "schema": {"type": "integer", "minimum": 0},
        }
    },
}


def document_events(
    events: Mapping[str, type[BaseModel]], *, ids: bool = False, ended: str | None = None
) -> Callable[[T], T]:
    """Document the route's 200 as a stream of Server-Sent Events: for each name in `events`,
    events of that type, their `data` the JSON of its model. With `ids`, every event has an id
    to resume after (`Last-Event-ID`); with `ended`, the route answers 204 (`ended` says when)
    instead of a stream that would have nothing to send."""

    def decorate(func: T) -> T:
        setattr(func, _EVENTS_ATTRIBUTE, (dict(events), ids, ended))
        return func

    return decorate


class Provider(OpenAPIProvider):
    """quart-schema's document builder, with the completions named in the module docstring."""

    def operation_id(self, method: str, path: str, func: Callable[..., Any]) -> str:
        """The route's own operationId (`quart_schema.operation_id`); every route has one, so
        that a generated client's method names do not change when a handler is renamed."""
        explicit: str | None = getattr(func, QUART_SCHEMA_OPERATION_ID_ATTRIBUTE, None)
        if explicit is None:
            raise TypeError(f"{method} {path} has no operationId: add @operation_id(...)")
        return explicit

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        documented = getattr(self._app.view_functions[rule.endpoint], _EVENTS_ATTRIBUTE, None)
        if documented is not None:
            events, ids, ended = documented
            stream, definitions = _event_stream(events, ids=ids)
            components.update(definitions)
            for operations in paths.values():
                for operation in operations.values():
                    operation["responses"][200] = {
                        "description": "A stream of Server-Sent Events: "
                        + ", ".join(f"`{name}`" for name in events),
                        "content": {"text/event-stream": {"schema": stream}},
                    }
                    if ended is not None:
                        operation["responses"][204] = {"description": ended}
        return paths, components

    def build_response_object(
        self, model: Any, headers_model: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The response, its headers in `headers` (quart-schema puts them among the media
        types), each marked required when the model requires it."""
        response, definitions = super().build_response_object(model, None)
        if headers_model is not None:
            schema = headers_model.model_json_schema(ref_template=REF)
            required = set(schema.get("required", []))
            response["headers"] = {}
            for name, prop in schema["properties"].items():
                header: dict[str, Any] = {"required": name in required}
                if "description" in prop:
                    header["description"] = prop.pop("description")
                prop.pop("title", None)
                header["schema"] = _not_null(prop)
                response["headers"][name] = header
        return response, definitions

    def build_headers_parameters(self, model: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The header parameters, a header that may be left out not said to be null."""
        parameters, definitions = super().build_headers_parameters(model)
        for parameter in parameters:
            parameter["schema"] = _not_null(parameter["schema"])
        return parameters, definitions

    def build_querystring_parameters(
        self, model: Any
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The query parameters, the model's required ones marked (quart-schema leaves them
        all optional)."""
        parameters, definitions = super().build_querystring_parameters(model)
        required = set(model.model_json_schema().get("required", []))
        for parameter in parameters:
            parameter["schema"] = _not_null(parameter["schema"])
            if parameter["name"] in required:
                parameter["required"] = True
        return parameters, definitions


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without its null alternative: a parameter or header is absent, never null
    (pydantic writes an optional field as `anyOf: [X, null]`, default null)."""
    options = schema.get("anyOf", [])
    rest = [s for s in options if s != {"type": "null"}]
    if len(rest) != 1 or len(rest) == len(options):
        return schema
    kept = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**rest[0], **kept}


def _event_stream(
    events: Mapping[str, type[BaseModel]], *, ids: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The schema of one event of a stream, one alternative per type (as an EventSource client
    sees it: `data` is JSON text), and the definitions of the `data` models."""
    alternatives, definitions = [], {}
    for name, model in events.items():
        schema = model.model_json_schema(ref_template=REF, mode="serialization")
        definitions.update(schema.pop("$defs", {}))
        definitions[model.__name__] = schema
        data = {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": REF.format(model=model.__name__)},
        }
        alternative: dict[str, Any] = {
            "title": name,
            "type": "object",
            "properties": {"event": {"const": name}, "data": data},
            "required": ["event", "data"],
        }
        if ids:
            alternative["properties"]["id"] = {
                "type": "string",
                "description": "the event's id: resume after it with Last-Event-ID",
            }
            alternative["required"].append("id")
        alternatives.append(alternative)
    return {"oneOf": alternatives}, definitions


def install_openapi(app: Quart, *, open_paths: Collection[str] = ()) -> None:
    """Serve the completed document at `/openapi.json` (open, like the routes in `open_paths`)."""
    cached: dict[str, Any] = {}

    @app.get("/openapi.json")
    @hide
    async def openapi() -> Any:
        if not cached:
            cached.update(document(app, open_paths=open_paths))
        return jsonify(cached)


def document(app: Quart, *, open_paths: Collection[str] = ()) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(app.extensions["QUART_SCHEMA"].openapi_provider.schema())
    schemas = doc["components"]["schemas"]
    problem_schema = Problem.model_json_schema(ref_template=REF)
    schemas.update(problem_schema.pop("$defs", {}))
    schemas["Problem"] = problem_schema
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            # A docstring's summary line is the summary; the rest, if any, the description.
            description = operation.pop("description", "").strip()
            if description:
                operation["description"] = description
            # quart-schema keys documented statuses by int; JSON (and sorting) needs strings.
            responses = {str(k): v for k, v in operation.get("responses", {}).items()}
            operation["responses"] = responses
            for status, text in _ERRORS.items():
                if status not in responses:
                    response = {"description": text, "content": {MEDIA_TYPE: {"schema": problem}}}
                    if status in _ERROR_HEADERS:
                        response["headers"] = copy.deepcopy(_ERROR_HEADERS[status])
                    responses[status] = response
            if path in open_paths:
                operation["security"] = []
                responses.pop("401", None)
    return doc
