"""N task slots: each is a loop that runs one claimed task at a time, inside its cancel scope."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from wsrunner.models import Claim
from wsrunner.runner import TaskRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SlotStatistics:
    total: int
    idle: int
    running: int


class Slots:
    """Hands claims to idle slot loops. A claim is only taken after `wait_idle()` returned."""

    def __init__(self, count: int, runner: TaskRunner) -> None:
        self.count = count
        self.runner = runner
        self._idle = trio.Semaphore(count)
        # Buffer 0: a hand-off completes only when a slot loop takes the claim.
        self._send, self._recv = trio.open_memory_channel[Claim](0)

    async def wait_idle(self) -> None:
        """Reserve an idle slot for the next `hand_off()`."""
        await self._idle.acquire()

    def release_unused(self) -> None:
        """Give back a reservation that found nothing to run."""
        self._idle.release()

    async def hand_off(self, claim: Claim) -> None:
        await self._send.send(claim)

    def close(self) -> None:
        """No more claims: each slot loop ends after its current task."""
        self._send.close()

    def statistics(self) -> SlotStatistics:
        running = len(self.runner.running)
        return SlotStatistics(total=self.count, idle=self.count - running, running=running)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the slot loops until `close()` and every running task has ended."""
        async with trio.open_nursery() as nursery:
            for n in range(self.count):
                nursery.start_soon(self._slot, n, name=f"slot-{n}")
            task_status.started()

    async def _slot(self, n: int) -> None:
        async for claim in self._recv:
            try:
                await self.runner.run_claim(claim)
            except Exception:
                # A bug must not take the daemon (and every other task) down; the claim stays
                # in our in-flight hash, so the reaper hands it on once we restart.
                logger.exception("slot %d: unexpected error running claim %s", n, claim.claim_id)
            finally:
                self._idle.release()
