"""The PostgreSQL adapter under cancellation, against a real server."""

from __future__ import annotations

import trio

from tests.conftest import DATABASE_URL
from wsrunner.daemon import open_store
from wsrunner.settings import Settings


async def test_cancelled_while_waiting_for_a_thread_returns_at_once(schema: str) -> None:
    """A call cancelled before its worker thread started must not wait for that thread.

    This hung a daemon's shutdown: the reaper was cancelled while it queued for the store's
    thread limiter, and then waited, shielded, for work that would never run.
    """
    settings = Settings(worker_id="t", database_url=DATABASE_URL, database_schema=schema)
    async with open_store(settings, max_size=1) as store:
        busy = trio.Event()

        async def hold_the_only_thread() -> None:
            busy.set()
            await store._run(lambda conn: conn.execute("SELECT pg_sleep(1)"))  # type: ignore[attr-defined]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_the_only_thread)
            await busy.wait()
            await trio.sleep(0.1)  # the sleeper has the only thread now
            with trio.move_on_after(0.2) as waited:
                await store.ping()  # queues for the limiter, then is cancelled there
            # Before the fix, the line above never returned (the test hung here).
            assert waited.cancelled_caught
        await store.ping()  # the store still works
