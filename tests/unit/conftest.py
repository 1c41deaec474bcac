"""The unit layer: the engine against in-memory fakes of its ports, on trio's mock clock.

Every async test here runs under `MockClock(autojump_threshold=0)`: whenever all tasks wait, the
clock jumps to the next deadline, so a 60 s lease or a 300 s task timeout costs nothing and
always ends the same way. Nothing here touches Redis, PostgreSQL, processes or files; the
integration tests one level up do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from tests.conftest import cmd
from wsrunner.engine.runner import TaskRunner
from wsrunner.models import TaskRecord
from wsrunner.service import Service
from wsrunner.settings import Settings
from wsrunner.testing import FakeExecutor, FakeWorkspaces, MemoryQueue, MemoryStore

HERE = Path(__file__).parent


def run_on_mock_clock(fn: Callable[[], Any], *, clock: Any = None, instruments: Any = ()) -> Any:
    """pytest-trio's runner for this folder: a test that asks for no clock gets an autojump
    one (a test may still take `autojump_clock` or `mock_clock` to move time itself)."""
    return trio.run(fn, clock=clock or MockClock(autojump_threshold=0), instruments=instruments)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # pytest-trio runs a test with the `run` of its nearest `trio` marker: put ours first.
    for item in items:
        if HERE in item.path.parents and inspect.iscoroutinefunction(getattr(item, "obj", None)):
            item.add_marker(pytest.mark.trio(run=run_on_mock_clock), append=False)


@pytest.fixture(name="settings")
def _settings() -> Settings:
    """Short leases and intervals; no test here reaches a real backend or volume."""
    return Settings(
        worker_id="unit-a",
        concurrency=2,
        backend="embedded",
        volume_path=Path("/nonexistent/wsrunner-unit"),
        frontend="none",
        heartbeat_interval_s=1.0,
        lease_ttl_s=3.0,
        reconcile_interval_s=5.0,
        max_attempts=3,
        shutdown_grace_s=2.0,
    )


@pytest.fixture(name="store")
def _store(settings: Settings) -> MemoryStore:
    return MemoryStore(lease_s=settings.lease_ttl_s)


@pytest.fixture(name="queue")
def _queue() -> MemoryQueue:
    return MemoryQueue()


@pytest.fixture(name="workspaces")
def _workspaces() -> FakeWorkspaces:
    return FakeWorkspaces()


@pytest.fixture(name="executor")
def _executor() -> FakeExecutor:
    return FakeExecutor()


@pytest.fixture(name="runner")
def _runner(
    settings: Settings,
    queue: MemoryQueue,
    store: MemoryStore,
    workspaces: FakeWorkspaces,
    executor: FakeExecutor,
) -> TaskRunner:
    return TaskRunner(settings, queue, store, workspaces, executor)


@pytest.fixture(name="service")
def _service(settings: Settings, queue: MemoryQueue, store: MemoryStore) -> Service:
    return Service(settings, queue, store)


async def submit(service: Service, *commands: str, **extra: Any) -> str:
    """Submit a task of command steps (FakeExecutor scripts) through the facade; its id."""
    body = {"workspace_id": "ws-1", "steps": [cmd(c) for c in commands], **extra}
    return (await service.submit(body)).record.id


async def run_next(runner: TaskRunner, queue: MemoryQueue) -> None:
    """Claim the next payload for the runner's daemon and run it to its end."""
    claim = await queue.claim(runner.worker_id)
    assert claim is not None, "nothing queued"
    await runner.run_claim(claim)


async def status_changes(queue: MemoryQueue, task_id: str) -> list[str]:
    """The statuses of the task's `status_changed` events, in order."""
    return [
        e.data["status"] for e in await queue.read_events(task_id) if e.type == "status_changed"
    ]


async def until(predicate: Callable[[], Any], *, timeout: float = 600.0) -> Any:
    """Wait (in mock time) until `await predicate()` or `predicate()` is truthy; its value."""
    with trio.fail_after(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await trio.sleep(0.05)


async def ended(store: MemoryStore, task_id: str) -> TaskRecord | None:
    rec = await store.get(task_id)
    return rec if rec.status.terminal else None
