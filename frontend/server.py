"""Serve the frontend's apps with Hypercorn inside the daemon's nursery."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from frontend.internal import create_internal_app
from wsrunner.service import Service
from wsrunner.settings import Settings


def _config(host: str, port: int) -> Config:
    cfg = Config()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.graceful_timeout = 3.0
    cfg.keep_alive_timeout = 5.0
    cfg.accesslog = None
    cfg.errorlog = "-"
    return cfg


async def serve(
    service: Service,
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the internal API until `shutdown_trigger` returns; reports the bound URLs."""
    async with trio.open_nursery() as nursery:
        internal = create_internal_app(service)
        urls = await nursery.start(
            partial(
                hypercorn_serve,
                internal,
                _config(settings.health_host, settings.health_port),
                shutdown_trigger=shutdown_trigger,
            )
        )
        task_status.started(list(urls))
