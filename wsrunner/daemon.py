"""The composition root: open the adapters, then run every service in one visible nursery tree.

    run_daemon
    └── trio_asyncio loop, Redis queue, PostgreSQL store (migrated)
        └── http nursery ........ the frontend (health + APIs), stops last
            └── services ........ heartbeat, cancel watch, reaper, warm sandboxes, drain timer
                └── work ........ N task slots, poller

Start order is dependency order; each service reports readiness through `nursery.start`. On stop:
the poller stops claiming, running tasks get `shutdown_grace_s` to finish and are then re-queued,
the background services stop, the HTTP servers close, and this daemon's heartbeat is removed.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
import trio_asyncio

from wsrunner.backends.embedded.queue import LocalQueue
from wsrunner.backends.embedded.store import open_sqlite_store
from wsrunner.backends.postgres.store import database_location, open_postgres_store
from wsrunner.backends.redis.queue import open_redis_queue
from wsrunner.engine.leases import Reaper, serve_cancel_watch, serve_heartbeat
from wsrunner.engine.poller import serve_poller
from wsrunner.engine.runner import StopReason, TaskRunner
from wsrunner.engine.slots import Slots
from wsrunner.errors import ConfigError, UnavailableError
from wsrunner.execution.git.credentials import credential_provider
from wsrunner.execution.process import inherit_none
from wsrunner.execution.sandbox import Sandbox, probe, turned_off
from wsrunner.execution.steps import Executor
from wsrunner.metrics import Metrics
from wsrunner.notify import Notifier
from wsrunner.policy import LivePolicy, PolicyError
from wsrunner.ports import Queue, Store
from wsrunner.service import Service
from wsrunner.settings import Settings, policy_paths
from wsrunner.workspace.directories import Workspaces
from wsrunner.workspace.operations import WorkspaceOps

logger = logging.getLogger(__name__)


@dataclass
class Daemon:
    """A running daemon, as handed to whoever started it (the CLI, or a test)."""

    settings: Settings
    service: Service
    runner: TaskRunner
    slots: Slots
    policy: LivePolicy
    metrics: Metrics
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    stopping: trio.Event = field(default_factory=trio.Event)
    urls: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self.stopping.set()


EMBEDDED_STORE: Final = "wsrunner.sqlite3"


@asynccontextmanager
async def open_store(settings: Settings, max_size: int = 2) -> AsyncIterator[Store]:
    """The durable store alone (migrated), for commands that need no daemon: `wsrunner tokens`."""
    if settings.backend == "embedded":
        async with open_sqlite_store(
            settings.state_dir / EMBEDDED_STORE, lease_s=settings.lease_ttl_s
        ) as embedded:
            yield embedded
        return
    async with open_postgres_store(
        settings.database_url,
        schema=settings.database_schema,
        max_size=max_size,
        lease_s=settings.lease_ttl_s,
    ) as store:
        yield store


def describe_store(settings: Settings, origins: Mapping[str, str]) -> str:
    """The store `open_store` opens and why, for an operator; never a password: "PostgreSQL
    wsrunner@db:5432/wsrunner, schema public (database_url from credential database-url in ...)"."""
    if settings.backend == "embedded":
        why = origins.get("backend") or "no database_url or redis_url is set"
        return f"the embedded store {settings.state_dir / EMBEDDED_STORE} ({why})"
    return (
        f"PostgreSQL {database_location(settings.database_url)}, schema "
        f"{settings.database_schema} (database_url from {origins.get('database_url', '?')})"
    )


@asynccontextmanager
async def open_backends(settings: Settings) -> AsyncIterator[tuple[Queue, Store]]:
    """The queue and the store: Redis + PostgreSQL, or the embedded pair in `state_dir`.

    The embedded store is locked to this process (one daemon per state directory). Its running
    tasks belong to a daemon that is gone, so their leases end now and the reconciler puts them
    back on the queue with everything still queued.
    """
    if settings.backend == "embedded":
        async with open_sqlite_store(
            settings.state_dir / EMBEDDED_STORE, lease_s=settings.lease_ttl_s
        ) as store:
            lock = await trio.to_thread.run_sync(_lock_state_dir, settings.state_dir)
            try:
                await store.expire_leases()
                yield LocalQueue(store), store
            finally:
                os.close(lock)
        return
    async with (
        trio_asyncio.open_loop(),
        open_redis_queue(settings.redis_url, settings.redis_prefix) as queue,
        open_store(settings, max_size=settings.concurrency + 4) as pg,
    ):
        yield queue, pg


def _lock_state_dir(state_dir: Path) -> int:
    fd = os.open(state_dir / "wsrunner.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"another wsrunner daemon uses the state directory {state_dir}; "
            "the embedded backend serves one daemon (use Redis + PostgreSQL "
            "for several)"
        ) from None
    return fd


def load_frontend(name: str) -> Any:
    """The frontend module named in the settings, or None for a worker-only daemon."""
    if name.lower() in ("", "none"):
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(
            f"frontend: cannot import {name!r} ({exc}); set it to 'none' to run without HTTP"
        ) from None
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
    inherit_none()  # commands start with posix_spawn: only what they are given is open there
    async with open_backends(settings) as (queue, store):
        try:
            await trio.to_thread.run_sync(_make_volume, settings)
        except OSError as exc:
            raise ConfigError(
                f"WORKSPACE_VOLUME_PATH {settings.volume_path}: {exc.strerror}"
            ) from None
        metrics = Metrics()
        notifier = Notifier.from_environ()
        policy = await open_policy(settings, metrics)
        sandbox = await open_sandbox(settings, policy, metrics)
        workspaces = Workspaces(
            settings.volume_path,
            default_quota=settings.default_quota_bytes,
            quotas=settings.workspace_quotas,
            git_schemes=settings.git_schemes,
            uids=sandbox.isolation.uids,
            default_inode_quota=settings.default_inode_quota,
            inode_quotas=settings.workspace_inode_quotas,
        )
        executor = Executor(
            settings,
            workspaces,
            policy,
            sandbox,
            credential_provider(settings.git_credentials_file),
            metrics,
        )
        queue.on_error = metrics.backend_errors.labels(backend="redis").inc
        store.on_error = metrics.backend_errors.labels(backend="postgres").inc
        workspaces.on_dir_operation = lambda by: metrics.dir_operation(by).inc()
        runner = TaskRunner(settings, queue, store, workspaces, executor, metrics)
        slots = Slots(settings.concurrency, runner)
        ops = WorkspaceOps(settings, workspaces, executor)
        service = Service(settings, queue, store, ops=ops, stats=slots.statistics, metrics=metrics)
        daemon = Daemon(settings, service, runner, slots, policy, metrics, notifier)
        reaper = Reaper(settings, queue, store)
        reaper.on_reap = lambda outcome: metrics.reap(outcome).inc()
        reaper.on_requeue = lambda reason: metrics.requeue(reason).inc()
        reaper.on_dead_letter = lambda reason: metrics.dead_letter(reason).inc()
        await reaper.configure_turns()
        # The durable store is the source of truth: repair the queue first. An embedded queue
        # starts empty, so everything queued is pushed again, however recent.
        await reaper.reconcile(min_age_s=0 if settings.backend == "embedded" else None)
        http_stop = trio.Event()
        async with trio.open_nursery() as http:
            async with trio.open_nursery() as services:
                await services.start(serve_heartbeat, settings, queue, store, runner)
                await services.start(serve_cancel_watch, settings, queue, runner)
                await services.start(reaper.serve)
                await services.start(serve_policy_reload, policy, metrics, notifier)
                await services.start(workspaces.serve_metadata)
                await services.start(workspaces.helper.serve)
                if settings.warm_sandboxes:  # stopped, every one, when the services stop
                    await services.start(
                        sandbox.serve_warm, settings.warm_idle_s, settings.warm_max
                    )
                await services.start(notifier.serve_watchdog)
                if frontend is not None:
                    daemon.urls = await http.start(
                        frontend.serve, service, settings, http_stop.wait
                    )
                services.start_soon(_drain_timer, daemon)
                async with trio.open_nursery() as work:
                    await work.start(slots.serve)
                    await work.start(
                        serve_poller,
                        queue,
                        slots,
                        settings.worker_id,
                        daemon.stopping,
                        metrics.requeue("shutdown").inc,
                    )
                    logger.info(
                        "wsrunner %s ready: %d slots, volume %s%s",
                        settings.worker_id,
                        settings.concurrency,
                        settings.volume_path,
                        f", serving {' '.join(daemon.urls)}" if daemon.urls else "",
                    )
                    await notifier.ready(
                        f"{settings.concurrency} slots; policy {policy.current.digest}; "
                        f"isolation {sandbox.isolation.level}"
                    )
                    task_status.started(daemon)
                services.cancel_scope.cancel()
            http_stop.set()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await queue.retire(settings.worker_id)
            except UnavailableError as exc:
                logger.warning("could not remove the heartbeat; it expires by itself: %s", exc)
        logger.info("wsrunner %s stopped", settings.worker_id)


def _make_volume(settings: Settings) -> None:
    volume = settings.volume_path
    if not volume.is_dir():
        volume.mkdir(parents=True)
        volume.chmod(0o711)  # workspace uids pass through; nobody lists the workspaces


async def open_policy(settings: Settings, metrics: Metrics) -> LivePolicy:
    """Load the command policy; an invalid one stops the start-up (ConfigError, exit 2)."""
    base, dropins = policy_paths(settings)
    try:
        live = await trio.to_thread.run_sync(LivePolicy.open, base, dropins)
    except PolicyError as exc:
        raise ConfigError(f"invalid command policy:\n{exc}") from None
    metrics.policy_loaded(live.current.digest, live.last_reload_at)
    logger.info("policy %s loaded from %s", live.current.digest, ", ".join(live.current.sources))
    return live


async def open_sandbox(settings: Settings, policy: LivePolicy, metrics: Metrics) -> Sandbox:
    """Probe the isolation this host offers and log it, one line per layer."""
    if settings.sandbox == "off":
        isolation = turned_off()
    else:
        isolation = await trio.to_thread.run_sync(
            probe, str(settings.volume_path), settings.sandbox_uids
        )

    metrics.isolation.state(isolation.level)
    for layer, state in isolation.layers.items():
        logger.info("sandbox %s: %s", layer, state)
    required = policy.base().sandbox.require
    if (refusal := isolation.refusal(required)) is not None:
        logger.error("sandbox: %s; commands will be refused until this is fixed", refusal)
    elif isolation.level != "full":
        logger.warning(
            "sandbox: isolation is %s (missing: %s)", isolation.level, "; ".join(isolation.missing)
        )
    else:
        logger.info("sandbox: full isolation")
    return Sandbox(isolation)


async def serve_policy_reload(
    live: LivePolicy,
    metrics: Metrics,
    notifier: Notifier,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload the policy on SIGHUP: validated first, the old one kept if the new one is invalid.

    Tasks already running keep the policy they started with (their `StepContext.policy`).
    """
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            await notifier.reloading()
            ok = await reload_policy(live, metrics)
            await notifier.ready(
                f"policy {live.current.digest} "
                + ("loaded" if ok else "kept: the new files are invalid")
            )


async def reload_policy(live: LivePolicy, metrics: Metrics) -> bool:
    """One reload (what SIGHUP does); True if the new files are now in force."""
    if await trio.to_thread.run_sync(live.reload):
        metrics.policy_loaded(live.current.digest, live.last_reload_at)
        return True
    metrics.policy_reload_ok.set(0)
    metrics.policy_reload_failures.inc()
    return False


async def _drain_timer(daemon: Daemon) -> None:
    """After a stop request, give running tasks `shutdown_grace_s`, then re-queue the rest."""
    await daemon.stopping.wait()
    running = len(daemon.runner.running)
    await daemon.notifier.stopping(f"stopping: {running} running task(s) finishing")
    logger.info(
        "stopping: no new claims; %d running task(s) have %.0fs to finish",
        running,
        daemon.settings.shutdown_grace_s,
    )
    await trio.sleep(daemon.settings.shutdown_grace_s)
    for task_id in list(daemon.runner.running):
        daemon.runner.stop_task(task_id, StopReason.SHUTDOWN)
