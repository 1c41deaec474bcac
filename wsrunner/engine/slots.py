"""N task slots: each is a loop that runs the steps of one claimed task at a time.

A task holds its slot while it starts and runs its steps. Removing its directory and recording
its end happen after the slot is free, in the slots' own nursery, so the next claim's command
does not wait for the last one's bookkeeping (as a peer queue acknowledges a message off its
worker thread). At most `count` tasks are being recorded at once; a slot waits for room there
before it lets its task go, so no more than 2 x `count` tasks are ever `running` here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from wsrunner.engine.runner import TaskRunner
from wsrunner.models import Claim

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
        self._recording = trio.Semaphore(count)
        self._in_steps = 0
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
        """Slots by what they do now (a task being recorded holds none)."""
        busy = self._in_steps
        return SlotStatistics(total=self.count, idle=self.count - busy, running=busy)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the slot loops until `close()` and every running task has been recorded."""
        async with trio.open_nursery() as nursery:
            for n in range(self.count):
                nursery.start_soon(self._slot, n, nursery, name=f"slot-{n}")
            task_status.started()

    async def _slot(self, n: int, nursery: trio.Nursery) -> None:
        async for claim in self._recv:
            self._in_steps += 1
            try:
                # The task runs in `nursery`: its recording goes on there after its steps.
                steps_over = trio.Event()
                nursery.start_soon(self._run, n, claim, steps_over, name=f"task {claim.claim_id}")
                await steps_over.wait()
            finally:
                self._in_steps -= 1
                self._idle.release()

    async def _run(self, n: int, claim: Claim, steps_over: trio.Event) -> None:
        """Run the claim; set `steps_over` once its steps have ended (or it ended sooner)."""
        released = False

        async def steps_done() -> None:
            nonlocal released
            if not released:
                try:  # (no pass through the scheduler when there is room, as there usually is)
                    self._recording.acquire_nowait()
                except trio.WouldBlock:
                    await self._recording.acquire()
                released = True
                steps_over.set()

        try:
            await self.runner.run_claim(claim, steps_done)
        except Exception as exc:
            # A bug must not take the daemon (and every other task) down, nor leave its
            # workspace held: the payload goes to the dead letters, saying so. (A task that had
            # started is then recovered from its record once its lease ends.)
            logger.exception("slot %d: unexpected error running claim %s", n, claim.claim_id)
            with trio.CancelScope(shield=True):
                try:
                    await self.runner.queue.dead_letter(
                        self.runner.worker_id, claim.claim_id, f"internal error: {exc}"[:500]
                    )
                except Exception:  # the claim stays in flight; the reaper hands it on
                    logger.exception("slot %d: claim %s not dead-lettered", n, claim.claim_id)
        finally:
            if released:
                self._recording.release()
            else:  # ended before its steps did (not started, or a bug): free the slot now
                steps_over.set()
