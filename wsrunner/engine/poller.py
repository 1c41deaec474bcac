"""The poller: wait for an idle slot, claim the next task, hand it over; block while idle."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import trio

from wsrunner.engine.slots import Slots
from wsrunner.errors import UnavailableError
from wsrunner.ports import WorkQueue

logger = logging.getLogger(__name__)

MAX_BACKOFF_S: Final = 5.0


async def serve_poller(
    queue: WorkQueue,
    slots: Slots,
    worker_id: str,
    stopping: trio.Event,
    on_hand_back: Callable[[], None] | None = None,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed `slots` until `stopping` is set; then close them.

    There is no polling sleep: with nothing queued, the poller blocks in Redis until a payload
    arrives. A Redis failure is retried with exponential backoff; the daemon stays up.
    `on_hand_back` is called when a claim made as the stop began is given back (metrics).
    """
    task_status.started()
    backoff = 0.1
    try:
        while not stopping.is_set():
            await slots.wait_idle()
            try:
                claim = None
                while claim is None and not stopping.is_set():
                    claim = await queue.claim(worker_id)
                    if claim is None:
                        await _wait_for_work(queue, stopping)
                backoff = 0.1
            except UnavailableError as exc:
                slots.release_unused()
                logger.warning("cannot claim tasks (retrying in %.1fs): %s", backoff, exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            if claim is None:
                slots.release_unused()
                break
            if stopping.is_set():  # claimed while stopping: give it straight back
                await queue.requeue_claim(worker_id, claim.claim_id, claim.priority)
                if on_hand_back is not None:
                    on_hand_back()
                slots.release_unused()
                break
            await slots.hand_off(claim)
    finally:
        slots.close()


async def _wait_for_work(queue: WorkQueue, stopping: trio.Event) -> None:
    """Block until work may be queued, or `stopping` is set (no waiting out the idle block).

    Raises UnavailableError itself, not wrapped in the nursery's exception group.
    """
    failed: UnavailableError | None = None
    with trio.CancelScope() as waiting:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on, stopping, waiting)
            try:
                await queue.wait_for_work()
            except UnavailableError as exc:
                failed = exc
            nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
