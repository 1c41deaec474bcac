"""Serve the frontend's two apps with Hypercorn inside the daemon's nursery.

    serve
    ├── public API   (public_host:public_port)   REST + SSE, bearer tokens
    └── internal API (health_host:health_port)   /health, files, exec, grep, git

Both stop through one shutdown trigger; open SSE streams are ended first (the hub), so
Hypercorn does not wait out its graceful timeout for them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio import serve as hypercorn_serve

from frontend.internal import create_internal_app
from frontend.public import create_public_app
from frontend.sse import Hub
from wsrunner.errors import ConfigError
from wsrunner.service import Service
from wsrunner.settings import Settings

logger = logging.getLogger(__name__)


class _Config(Config):
    """Hypercorn's configuration, with listening sockets no child process inherits.

    Hypercorn makes them inheritable (for its worker processes, which the daemon does not
    use); every command the daemon starts would then hold both APIs' listeners: it could
    accept requests meant for the daemon, and keep the ports after the daemon died.
    """

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets, *sockets.quic_sockets):
            sock.set_inheritable(False)
        return sockets


def _config(host: str, port: int) -> Config:
    cfg = _Config()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.graceful_timeout = 3.0
    cfg.keep_alive_timeout = 5.0
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")  # through our handler (JSON lines)
    return cfg


async def serve(
    service: Service,
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve both APIs until `shutdown_trigger` returns; reports the bound URLs.

    Raises:
        ConfigError: the internal token is empty and running without one was not asked for.
    """
    if not settings.internal_token and not settings.internal_no_auth:
        raise ConfigError(
            "WORKER_INTERNAL_TOKEN is empty: the internal API would run commands for anyone who "
            "reaches it. Set a token, or set WSRUNNER_INTERNAL_NO_AUTH=true to run without one"
        )
    if not settings.internal_token:
        logger.warning("the internal API runs WITHOUT authentication (internal_no_auth)")
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        hub = Hub(nursery, settings.sse_keepalive_s)

        async def stop() -> None:
            await shutdown_trigger()
            hub.close()
            stopped.set()

        nursery.start_soon(stop)
        urls: list[str] = []
        for app, host, port in (
            (create_public_app(service, hub), settings.public_host, settings.public_port),
            (create_internal_app(service, hub), settings.health_host, settings.health_port),
        ):
            urls += await nursery.start(
                partial(hypercorn_serve, app, _config(host, port), shutdown_trigger=stopped.wait)
            )
        task_status.started(urls)
