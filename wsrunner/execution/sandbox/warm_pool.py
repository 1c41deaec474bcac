"""The live warm sandboxes: by key, least recently used first, each kept while it is used.

A sandbox is made on a command's first use of its key, reused while in use, stopped after
`idle_s` unused, and at most `max_alive` live: the least recently used idle one makes room,
and with none idle a command runs cold (a sandbox of its own). A key whose sandbox failed to
start runs cold for a while. A workspace has one sandbox for new commands: one made for a new
key (a policy reloaded, a protected path created) replaces the workspace's others, as does
one made for a sandbox that is worn (`WarmSandbox.wear`); a replaced sandbox is stopped once
its commands have ended, so that no tenant holds more than one idle sandbox (and its /tmp) by
changing its key. When the pool stops, every sandbox is stopped.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from wsrunner.execution.sandbox.warm import STOPPED, WarmFailure, WarmKey, WarmSandbox

logger = logging.getLogger(__name__)

RETRY_AFTER_S: Final = 30.0  #: a key whose sandbox failed to start runs cold this long


class WarmPool:
    """The live sandboxes, by key, least recently used first; `serve` keeps them."""

    def __init__(self, *, idle_s: float, max_alive: int) -> None:
        self.idle_s = idle_s
        self.max_alive = max_alive
        self.starts = 0  #: sandboxes started, for statistics
        #: commands by how they started: "ahead" (in cgroups made before they asked), "joined"
        #: (in cgroups made as they started) or "cold" (no warm sandbox for them)
        self.commands: Counter[str] = Counter()
        #: sandboxes by why they ended: "idle", "room" (the least recently used), "replaced",
        #: "failed" or "shutdown"
        self.stops: Counter[str] = Counter()
        self._alive: OrderedDict[WarmKey, WarmSandbox] = OrderedDict()
        self._starting: dict[WarmKey, trio.Event] = {}
        self._failed: dict[WarmKey, float] = {}
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()

    @property
    def serving(self) -> bool:
        return self._nursery is not None

    def sandboxes(self) -> list[WarmSandbox]:
        return list(self._alive.values())

    def statistics(self) -> dict[str, int]:
        alive = list(self._alive.values())
        return {"alive": len(alive), "active": sum(s.active for s in alive), "starts": self.starts}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the sandboxes until cancelled; each is stopped (shielded) on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._expire()
        finally:
            self._nursery = None

    async def _expire(self) -> None:
        while True:
            now, due = trio.current_time(), float("inf")
            for key, failed in list(self._failed.items()):
                if failed + RETRY_AFTER_S <= now:
                    del self._failed[key]
            for sandbox in list(self._alive.values()):
                if sandbox.active == 0:
                    if (at := sandbox.last_used + self.idle_s) <= now:
                        self._drop(sandbox)
                        self._stop(sandbox, "idle", f"unused for {self.idle_s:g}s")
                    else:
                        due = min(due, at)
            with trio.move_on_at(due):
                await self._changed.wait()
            self._changed = trio.Event()

    async def acquire(
        self, key: WarmKey, start: Callable[[], Awaitable[WarmSandbox]]
    ) -> WarmSandbox | None:
        """The ready sandbox for `key`, started with `start()` if there is none; None when the
        command should run cold (the pool is stopped or full of busy sandboxes, or the
        sandbox failed to start). Release it with `release`."""
        while self._nursery is not None:
            if (sandbox := self._alive.get(key)) is not None and sandbox.worn is not None:
                self._retire(sandbox, sandbox.worn)
                continue
            if sandbox is not None and sandbox.usable:
                self._alive.move_to_end(key)
                sandbox.active += 1
                try:
                    await sandbox.settled.wait()
                except BaseException:
                    self.release(sandbox)
                    raise
                if sandbox.usable:
                    return sandbox
                self.release(sandbox)
                return None
            if sandbox is not None:
                self._drop(sandbox)
            if (starting := self._starting.get(key)) is not None:
                await starting.wait()
                continue
            failed = self._failed.get(key)
            if failed is not None and trio.current_time() < failed + RETRY_AFTER_S:
                return None
            for other in list(self._alive.values()):  # one sandbox a workspace, for new commands
                if other.key.root == key.root:
                    self._retire(other, "replaced by a sandbox of the workspace's current settings")
            if not self._make_room():
                return None
            self._starting[key] = starting = trio.Event()
            try:
                try:
                    sandbox = await start()
                except (OSError, WarmFailure) as exc:
                    logger.error("a warm sandbox for %s could not start: %s", key.root, exc)
                    self._failed[key] = trio.current_time()
                    return None
                self.starts += 1
                sandbox.commands = self.commands
                if self._nursery is None:  # the pool stopped meanwhile: this one ends at once
                    self._stop(sandbox, "shutdown", "the warm sandboxes are stopping")
                    with trio.CancelScope(shield=True):
                        await sandbox.serve(self._forget)
                    return None
                self._alive[key] = sandbox
                self._nursery.start_soon(sandbox.serve, self._forget)
            finally:
                del self._starting[key]
                starting.set()
        return None

    def release(self, sandbox: WarmSandbox) -> None:
        sandbox.active -= 1
        sandbox.last_used = trio.current_time()
        if sandbox.worn is not None or self._alive.get(sandbox.key) is not sandbox:
            self._retire(sandbox, sandbox.worn or "replaced")
        self._changed.set()

    def _retire(self, sandbox: WarmSandbox, reason: str) -> None:
        """No new command gets `sandbox`; it is stopped now if idle, else at its last release."""
        self._drop(sandbox)
        sandbox.wear(reason)
        if sandbox.active == 0:
            self._stop(sandbox, "replaced", f"replaced: {reason}")

    def _make_room(self) -> bool:
        if len(self._alive) + len(self._starting) < self.max_alive:
            return True
        for sandbox in self._alive.values():  # least recently used first
            if sandbox.active == 0:
                self._drop(sandbox)
                self._stop(sandbox, "room", "the least recently used, stopped to make room")
                return True
        return False

    @staticmethod
    def _stop(sandbox: WarmSandbox, kind: str, reason: str) -> None:
        sandbox.stopped_as = sandbox.stopped_as or kind
        sandbox.stop(reason)

    def _drop(self, sandbox: WarmSandbox) -> None:
        if self._alive.get(sandbox.key) is sandbox:
            del self._alive[sandbox.key]

    def _forget(self, sandbox: WarmSandbox) -> None:
        self._drop(sandbox)
        kind = "shutdown" if sandbox.failure == STOPPED else "failed"
        self.stops[sandbox.stopped_as or kind] += 1
        if sandbox.supervisor_pid < 0:
            self._failed[sandbox.key] = trio.current_time()
            logger.error(
                "a warm sandbox for %s could not start: %s", sandbox.key.root, sandbox.failure
            )
        self._changed.set()
