"""Serve the frontend's two apps with Hypercorn inside the daemon's nursery.

    serve
    ├── public API   (public_host:public_port)   REST + SSE, bearer tokens
    └── internal API (health_host:health_port)   /health, /metrics, files, exec, grep, git

Both stop through one shutdown trigger; open SSE streams are ended first (the hub), so
Hypercorn does not wait out its graceful timeout for them.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio import serve as hypercorn_serve

from frontend.internal.api import create_app as create_internal_app
from frontend.public.api import create_app as create_public_app
from frontend.sse import Hub
from wsrunner.errors import ConfigError
from wsrunner.service import Service
from wsrunner.settings import Settings

logger = logging.getLogger(__name__)


#: After a crash the old process may still hold the ports for a moment (systemd restarts it
#: once the old one is gone, but a port can stay bound until its last holder exits).
BIND_RETRY_S: Final = 5.0
BIND_RETRY_INTERVAL_S: Final = 0.5
#: Connections the kernel holds until the server accepts them (capped by net.core.somaxconn).
#: With Hypercorn's 100, a thousand event streams connecting at once (clients coming back
#: after a restart) overflow it: the kernel drops their SYNs and they retry 1, 3, 7 s later.
LISTEN_BACKLOG: Final = 2048


class _Config(Config):
    """Hypercorn's configuration, serving on a listening socket the daemon made.

    The socket is non-inheritable (Python's default, which Hypercorn's own sockets undo for
    its worker processes, which the daemon does not use): every command the daemon starts
    would otherwise hold both APIs' listeners, could accept requests meant for the daemon,
    and keep the ports after the daemon died.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._socket = sock

    def create_sockets(self) -> Sockets:
        return Sockets(secure_sockets=[], insecure_sockets=[self._socket], quic_sockets=[])


def _config(sock: socket.socket, host: str, port: int) -> Config:
    cfg = _Config(sock)
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.graceful_timeout = 3.0
    cfg.keep_alive_timeout = 5.0
    cfg.backlog = LISTEN_BACKLOG
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")  # through our handler (JSON lines)
    return cfg


def _bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port`, as Hypercorn makes it (not listening yet)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _bind(host: str, port: int) -> socket.socket:
    """Bind `host:port`, retrying for up to BIND_RETRY_S while the address is in use.

    Errors:
        OSError: EADDRINUSE still after BIND_RETRY_S, or any other error at once.
    """
    deadline = trio.current_time() + BIND_RETRY_S
    while True:
        try:
            return _bound_socket(host, port)
        except OSError as exc:
            left = deadline - trio.current_time()
            if exc.errno != errno.EADDRINUSE or left <= 0:
                raise
            logger.warning(
                "cannot listen on %s:%d: address in use; retrying for %.1f s more", host, port, left
            )
            await trio.sleep(min(BIND_RETRY_INTERVAL_S, left))


async def serve(
    service: Service,
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve both APIs until `shutdown_trigger` returns; reports the bound URLs.

    A port still in use is retried for BIND_RETRY_S, with a warning each time.

    Raises:
        OSError: a port cannot be bound (still in use after BIND_RETRY_S, or another error).
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
            cfg = _config(await _bind(host, port), host, port)
            urls += await nursery.start(
                partial(hypercorn_serve, app, cfg, shutdown_trigger=stopped.wait)
            )
        task_status.started(urls)
