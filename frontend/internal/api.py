"""The internal API's app: the token check, problem+json errors (with `error`), the OpenAPI
document, the probes, `/health` and `/metrics`, and the resources' blueprints."""

from __future__ import annotations

import hmac
from typing import Any, Final

from quart import Response, jsonify, request
from quart_schema import QuartSchema, document_response, hide, operation_id, tag

from frontend import context, probes, problems, schemas
from frontend.app import App
from frontend.internal import exec as exec_  # the module; `exec` alone is the builtin
from frontend.internal import files, git, grep
from frontend.openapi import Provider, install_openapi
from frontend.sse import Hub
from wsrunner import __version__
from wsrunner.errors import AuthenticationError
from wsrunner.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from wsrunner.service import Service

OPEN_PATHS: Final = frozenset({"/health", "/metrics", "/openapi.json"}) | probes.PATHS


def create_app(service: Service, hub: Hub) -> App:
    """The internal API, its handlers reading `service` and `hub` through `frontend.context`."""
    app = App("wsrunner.internal", api="internal", metrics=service.metrics)
    app.config["MAX_CONTENT_LENGTH"] = service.settings.max_request_bytes
    context.bind(app, service, hub)
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
        tags=[
            {"name": "health", "description": "The reference worker's health check"},
            {"name": "probes", "description": "Liveness and readiness, without a token"},
            {"name": "files", "description": "List, read and write a workspace's files"},
            {"name": "search", "description": "Regex search in a workspace"},
            {"name": "exec", "description": "Run a command in a workspace's sandbox"},
            {"name": "git", "description": "One git operation in a workspace"},
        ],
        openapi_provider_class=Provider,
    )
    app.register_blueprint(probes.blueprint)
    install_openapi(app, open_paths=OPEN_PATHS)
    app.before_request(check_token)
    app.get("/health")(health)
    app.get("/metrics")(metrics)
    for resource in (files, exec_, grep, git):
        app.register_blueprint(resource.blueprint)
    return app


async def check_token() -> None:
    """Refuse a request to a guarded path without the daemon's internal token."""
    expected = context.current_service().settings.internal_token.encode()
    if request.path in OPEN_PATHS or not expected:  # no token: explicitly allowed (server.py)
        return
    given = request.headers.get("X-Internal-Token", "").encode()
    if not hmac.compare_digest(given, expected):
        raise AuthenticationError("send the daemon's internal token in X-Internal-Token")


@operation_id("getHealth")
@tag(["health"])
@document_response(schemas.Health)
@document_response(schemas.Health, 503)
async def health() -> Any:
    """Whether Redis and PostgreSQL answer; 503 when one does not."""
    body = await context.current_service().health()
    return jsonify(body), 200 if body["status"] == "healthy" else 503


@hide  # Prometheus text, not JSON: kept out of the OpenAPI document
async def metrics() -> Response:
    """Prometheus metrics of this daemon. No token, like the probes: Prometheus scrapes it,
    and its labels carry no ids or secrets."""
    body = await context.current_service().metrics_text(
        sse_subscribers=context.current_hub().open_streams
    )
    return Response(body, content_type=METRICS_CONTENT_TYPE)
