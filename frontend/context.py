"""How a handler reaches the service, the SSE hub and the caller's token without closures.

Each app holds its service, hub and task feeds in `app.extensions` (`bind`, when the app is
made); the handlers, plain functions on module-level blueprints, read them for the request being
handled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from quart import Quart, current_app, g

from frontend.feeds import Feeds
from frontend.sse import Hub
from wsrunner.models import ApiToken
from wsrunner.service import Service

EXTENSION: Final = "wsrunner"  #: the key in `app.extensions`


@dataclass(frozen=True, slots=True)
class Context:
    service: Service
    hub: Hub
    feeds: Feeds


def bind(app: Quart, service: Service, hub: Hub) -> None:
    """Make `service` and `hub` what the handlers of `app` use (and feeds on that hub)."""
    app.extensions[EXTENSION] = Context(service, hub, Feeds(hub))


def _context() -> Context:
    context: Context = current_app.extensions[EXTENSION]
    return context


def current_service() -> Service:
    """The service of the app handling the request."""
    return _context().service


def current_hub() -> Hub:
    """The hub that ends the app's event streams when the daemon stops."""
    return _context().hub


def current_feeds() -> Feeds:
    """The app's shared readers of the tasks its event streams follow."""
    return _context().feeds


def set_scope(token: ApiToken) -> None:
    """Record the token the request authenticated with (the public API's hook)."""
    g.scope = token


def current_scope() -> ApiToken:
    """The token the request authenticated with; the public API's handlers pass it to the
    service, which answers 404 for anything outside it."""
    token: ApiToken = g.scope
    return token
