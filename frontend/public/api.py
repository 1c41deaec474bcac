"""The public API's app: bearer-token authentication, problem+json errors, the OpenAPI
document, the probes, and the resources' blueprints."""

from __future__ import annotations

from typing import Final

from quart import request
from quart_schema import QuartSchema

from frontend import context, probes, problems
from frontend.app import App
from frontend.openapi import Provider, install_openapi
from frontend.public import events, tasks, tools, workspaces
from frontend.sse import Hub
from wsrunner import __version__
from wsrunner.errors import AuthenticationError
from wsrunner.service import Service

OPEN_PATHS: Final = frozenset({"/openapi.json"}) | probes.PATHS


def create_app(service: Service, hub: Hub) -> App:
    """The public API, its handlers reading `service` and `hub` through `frontend.context`."""
    app = App("wsrunner.public", api="public", metrics=service.metrics)
    app.config["MAX_CONTENT_LENGTH"] = service.settings.max_request_bytes
    context.bind(app, service, hub)
    problems.install(app)
    QuartSchema(
        app,
        openapi_path=None,  # served by install_openapi, which adds problem+json and SSE
        swagger_ui_path=None,  # the UIs load scripts from CDNs
        redoc_ui_path=None,
        scalar_ui_path=None,
        info={"title": "wsrunner public API", "version": __version__},
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        security=[{"bearer": []}],
        tags=[
            {"name": "tasks", "description": "Submit, list, get and cancel tasks"},
            {"name": "events", "description": "A task's events as Server-Sent Events"},
            {"name": "workspaces", "description": "Clone a repository into a workspace"},
            {"name": "tools", "description": "The agent tools, and a call of one"},
            {"name": "probes", "description": "Liveness and readiness, without a token"},
        ],
        openapi_provider_class=Provider,
    )
    app.register_blueprint(probes.blueprint)
    install_openapi(app, open_paths=OPEN_PATHS)
    app.before_request(authenticate)
    for resource in (tasks, workspaces, tools, events):
        app.register_blueprint(resource.blueprint)
    return app


async def authenticate() -> None:
    """Record the bearer token's scope for the handlers, or refuse the request."""
    # No route (404) or not this method (405): the answer says nothing the open
    # /openapi.json does not, and a scraper of the old /metrics gets a plain 404.
    if request.path in OPEN_PATHS or request.routing_exception is not None:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("send Authorization: Bearer <token>")
    context.set_scope(await context.current_service().authenticate(token.strip()))
