"""In-memory fakes of wsrunner's ports and of what a TaskRunner runs steps with, for unit tests.

`MemoryStore` and `MemoryQueue` implement `wsrunner.ports.Store` and `wsrunner.ports.Queue` in
plain dicts, with the rules of the real adapters: every state write is a compare-and-set against
`models.TRANSITIONS` that raises (store) or refuses (queue) as PostgreSQL and Redis do; claims
stay in a daemon's in-flight map until acknowledged; leases and heartbeats expire. Time is
trio's clock, so under `trio.testing.MockClock(autojump_threshold=0)` a 60 s lease runs out at
once and deterministically. There are no threads and no I/O: each call is one checkpoint (its
round trip; `latency` seconds of trio time if set, to widen a race window) and then one atomic
change, as a single statement or Lua script is.

`FakeWorkspaces` and `FakeExecutor` stand in for the task directories and the step executor a
`TaskRunner` is built with. A command step is a small script played in trio time:
`ExecuteCommand(command="echo hi; sleep 5; exit 3")` prints, waits five seconds, and fails.

    store, queue = MemoryStore(), MemoryQueue()
    runner = TaskRunner(settings, queue, store, FakeWorkspaces(), FakeExecutor())
"""

from __future__ import annotations

from wsrunner.ports import Queue, Store
from wsrunner.testing.execution import (
    FakeCapture,
    FakeExecutor,
    FakePolicy,
    FakeStepContext,
    FakeWorkspaces,
    StepRun,
)
from wsrunner.testing.queue import MemoryQueue
from wsrunner.testing.store import MemoryStore

__all__ = [
    "FakeCapture",
    "FakeExecutor",
    "FakePolicy",
    "FakeStepContext",
    "FakeWorkspaces",
    "MemoryQueue",
    "MemoryStore",
    "StepRun",
]


def _implements(store: MemoryStore, queue: MemoryQueue) -> tuple[Store, Queue]:
    """Never called: mypy checks here that the fakes implement the ports."""
    return store, queue
