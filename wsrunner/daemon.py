"""The composition root: open the adapters, then run every service in one visible nursery tree.

    run_daemon
    └── trio_asyncio loop, Redis queue, PostgreSQL store (migrated)
        └── http nursery ........ the frontend (health + APIs), stops last
            └── services ........ heartbeat, cancel watch, reaper, shutdown drain timer
                └── work ........ N task slots, poller

Start order is dependency order; each service reports readiness through `nursery.start`. On stop:
the poller stops claiming, running tasks get `shutdown_grace_s` to finish and are then re-queued,
the background services stop, the HTTP servers close, and this daemon's heartbeat is removed.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_asyncio

from wsrunner.credentials import credential_provider
from wsrunner.errors import ConfigError, UnavailableError
from wsrunner.executor import Executor
from wsrunner.lease import Reaper, serve_cancel_watch, serve_heartbeat
from wsrunner.metrics import Metrics
from wsrunner.operations import WorkspaceOps
from wsrunner.poller import serve_poller
from wsrunner.ports import Store
from wsrunner.queue import open_redis_queue
from wsrunner.runner import StopReason, TaskRunner
from wsrunner.service import Service
from wsrunner.settings import Settings
from wsrunner.slots import Slots
from wsrunner.store import open_postgres_store
from wsrunner.workspace import Workspaces

logger = logging.getLogger(__name__)


@dataclass
class Daemon:
    """A running daemon, as handed to whoever started it (the CLI, or a test)."""

    settings: Settings
    service: Service
    runner: TaskRunner
    slots: Slots
    stopping: trio.Event = field(default_factory=trio.Event)
    urls: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self.stopping.set()


@asynccontextmanager
async def open_store(settings: Settings, max_size: int = 2) -> AsyncIterator[Store]:
    """The durable store alone (migrated), for commands that need no daemon: `wsrunner tokens`."""
    async with open_postgres_store(settings.database_url, schema=settings.database_schema,
                                   max_size=max_size, lease_s=settings.lease_ttl_s) as store:  # fmt: skip
        yield store


def load_frontend(name: str) -> Any:
    """The frontend module named in the settings, or None for a worker-only daemon."""
    if name.lower() in ("", "none"):
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"frontend: cannot import {name!r} ({exc}); set it to 'none' "
                          "to run without HTTP") from None  # fmt: skip
    if not callable(getattr(module, "serve", None)):
        raise ConfigError(
            f"frontend: module {name!r} has no serve(service, settings, stop) function"
        )
    return module


async def run_daemon(settings: Settings, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until its `stop()` is called, then shut down gracefully.

    Raises:
        UnavailableError: Redis or PostgreSQL cannot be reached at start-up.
        ConfigError: the frontend cannot be loaded.
    """
    frontend = load_frontend(settings.frontend)
    async with (
        trio_asyncio.open_loop(),
        open_redis_queue(settings.redis_url, settings.redis_prefix) as queue,
        open_store(settings, max_size=settings.concurrency + 4) as store,
    ):  # fmt: skip
        workspaces = Workspaces(settings.volume_path, default_quota=settings.default_quota_bytes,
                                quotas=settings.workspace_quotas, git_schemes=settings.git_schemes)  # fmt: skip
        try:
            await trio.to_thread.run_sync(
                lambda: settings.volume_path.mkdir(parents=True, exist_ok=True)
            )
        except OSError as exc:
            raise ConfigError(
                f"WORKSPACE_VOLUME_PATH {settings.volume_path}: {exc.strerror}"
            ) from None
        executor = Executor(
            settings, workspaces, credential_provider(settings.git_credentials_file)
        )
        metrics = Metrics()
        queue.on_error = metrics.backend_errors.labels(backend="redis").inc
        store.on_error = metrics.backend_errors.labels(backend="postgres").inc
        runner = TaskRunner(settings, queue, store, workspaces, executor, metrics)
        slots = Slots(settings.concurrency, runner)
        ops = WorkspaceOps(settings, workspaces, executor)
        service = Service(settings, queue, store, ops=ops, stats=slots.statistics, metrics=metrics)
        daemon = Daemon(settings, service, runner, slots)
        reaper = Reaper(settings, queue, store)
        await reaper.reconcile()  # PostgreSQL is the source of truth: repair Redis first
        http_stop = trio.Event()
        async with trio.open_nursery() as http:
            async with trio.open_nursery() as services:
                await services.start(serve_heartbeat, settings, queue, store, runner)
                await services.start(serve_cancel_watch, settings, queue, runner)
                await services.start(reaper.serve)
                if frontend is not None:
                    daemon.urls = await http.start(
                        frontend.serve, service, settings, http_stop.wait
                    )
                services.start_soon(_drain_timer, daemon)
                async with trio.open_nursery() as work:
                    await work.start(slots.serve)
                    await work.start(
                        serve_poller, queue, slots, settings.worker_id, daemon.stopping
                    )
                    logger.info("wsrunner %s ready: %d slots, volume %s%s", settings.worker_id,
                                settings.concurrency, settings.volume_path,
                                f", serving {' '.join(daemon.urls)}" if daemon.urls else "")  # fmt: skip
                    task_status.started(daemon)
                services.cancel_scope.cancel()
            http_stop.set()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await queue.retire(settings.worker_id)
            except UnavailableError as exc:
                logger.warning("could not remove the heartbeat; it expires by itself: %s", exc)
        logger.info("wsrunner %s stopped", settings.worker_id)


async def _drain_timer(daemon: Daemon) -> None:
    """After a stop request, give running tasks `shutdown_grace_s`, then re-queue the rest."""
    await daemon.stopping.wait()
    running = len(daemon.runner.running)
    logger.info("stopping: no new claims; %d running task(s) have %.0fs to finish",
                running, daemon.settings.shutdown_grace_s)  # fmt: skip
    await trio.sleep(daemon.settings.shutdown_grace_s)
    for task_id in list(daemon.runner.running):
        daemon.runner.stop_task(task_id, StopReason.SHUTDOWN)
