"""Event streams that follow one task share one reader of its events (frontend/feeds.py), over
real Redis: every subscriber still gets every event once and in order, a slow one holds up
nobody, a resume starts where it says, and the daemon's stop ends them all."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from frontend import feeds as feeds_module
from frontend.feeds import Feeds
from frontend.public.events import _task_frames
from frontend.sse import Hub, frame
from tests.conftest import Api, cmd, task_body, wait_for, wait_terminal
from wsrunner.daemon import Daemon
from wsrunner.errors import UnavailableError
from wsrunner.service import Service

LINES = "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.1; done"


def frames_of(raw: bytes) -> list[bytes]:
    """The event frames of a stream's bytes, without its `retry:` line and its keep-alives."""
    blocks = [b + b"\n\n" for b in raw.split(b"\n\n") if b]
    return [b for b in blocks if b.startswith(b"id: ")]


async def all_frames(service: Service, task_id: str) -> list[bytes]:
    return [frame(e.id, e.type, e.data) for e in await service.events(task_id)]


async def stream(api: Api, task_id: str, **headers: str) -> bytes:
    """Everything the task's event stream sends over HTTP, until it ends."""
    raw = b""
    async with api.client() as c:
        path = f"/api/tasks/{task_id}/events"
        async with c.stream("GET", path, headers=headers) as r:
            async for chunk in r.aiter_bytes():
                raw += chunk
    return raw


async def follow(service: Service, feeds: Feeds, task_id: str, after: str = "0-0") -> bytes:
    """Everything one stream of a running task sends, until it ends."""
    return b"".join([c async for c in _task_frames(service, feeds, task_id, after, [])])


def spy_reads(monkeypatch: pytest.MonkeyPatch, service: Service, task_id: str) -> dict[str, int]:
    """Count the service's reads of `task_id`'s events, waiting ones (a feed's reader) apart
    from the others (a stream reading what is older than its feed's window)."""
    read: Callable[..., Awaitable[Any]] = service.events
    seen = {"waiting_now": 0, "waiting_most": 0, "log_reads": 0}

    async def events(tid: str, after: str = "0-0", *, block_ms: int | None = None) -> Any:
        if tid != task_id:
            return await read(tid, after, block_ms=block_ms)
        if block_ms is None:
            seen["log_reads"] += 1
            return await read(tid, after)
        seen["waiting_now"] += 1
        seen["waiting_most"] = max(seen["waiting_most"], seen["waiting_now"])
        try:
            return await read(tid, after, block_ms=block_ms)
        finally:
            seen["waiting_now"] -= 1

    monkeypatch.setattr(service, "events", events)
    return seen


async def test_many_subscribers_of_a_task_get_every_event_in_order_from_one_reader(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = api.daemon.service
    tid = (await service.submit(task_body(cmd(LINES)))).record.id
    reads = spy_reads(monkeypatch, service, tid)
    got: list[bytes] = []

    async def subscriber() -> None:
        got.append(await stream(api, tid))

    async with trio.open_nursery() as nursery:
        for _ in range(25):
            nursery.start_soon(subscriber)
    expected = await all_frames(service, tid)
    assert b'"status":"completed"' in expected[-1]
    assert len(got) == 25
    for raw in got:
        assert raw.startswith(b"retry: 2000\n\n")
        assert frames_of(raw) == expected
    assert reads["waiting_most"] == 1  # one reader waited on the log for all 25


async def test_a_slow_subscriber_holds_up_no_other_and_catches_up_from_the_log(
    start_daemon: Callable[..., Awaitable[Daemon]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feeds_module, "WINDOW_BYTES", 300)  # two or three frames
    daemon = await start_daemon()
    service = daemon.service
    tid = (await service.submit(task_body(cmd(LINES)))).record.id
    reads = spy_reads(monkeypatch, service, tid)
    async with trio.open_nursery() as nursery:
        feeds = Feeds(Hub(nursery, 15))
        slow = _task_frames(service, feeds, tid, "0-0", [])
        raw = await slow.__anext__() + await slow.__anext__()  # following, then it stops reading
        fast: list[bytes] = []

        async def subscriber() -> None:
            fast.append(await follow(service, feeds, tid))

        async with trio.open_nursery() as others:  # they end without the slow one reading
            for _ in range(3):
                others.start_soon(subscriber)
        behind = reads["log_reads"]
        raw += b"".join([c async for c in slow])
    expected = await all_frames(service, tid)
    assert b'"status":"completed"' in expected[-1]
    assert [frames_of(r) for r in fast] == [expected] * 3
    assert frames_of(raw) == expected
    assert reads["log_reads"] > behind  # what slid out of the window came from the log


async def test_a_resume_gets_exactly_what_followed_its_id_while_others_follow(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feeds_module, "WINDOW_BYTES", 300)
    service = api.daemon.service
    tid = (await service.submit(task_body(cmd(LINES)))).record.id

    async def enough() -> bool:
        return len(await service.events(tid)) >= 5

    got: dict[str, bytes] = {}

    async def first() -> None:
        got["first"] = await stream(api, tid)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await wait_for(enough, timeout=20)
        second = (await service.events(tid))[1].id  # older than the window by now
        got["resumed"] = await stream(api, tid, **{"Last-Event-ID": second})
    expected = await all_frames(service, tid)
    assert frames_of(got["first"]) == expected
    assert frames_of(got["resumed"]) == expected[2:]


async def test_a_feed_started_from_an_id_past_the_end_of_the_log_reads_it_from_the_start(
    start_daemon: Callable[..., Awaitable[Daemon]],
) -> None:
    """The first stream's Last-Event-ID sets where the task's reader starts; one made up, past
    the log's end, would have the reader skip every event before it for all the others."""
    daemon = await start_daemon()
    service = daemon.service
    tid = (await service.submit(task_body(cmd(LINES)))).record.id
    made_up = "9999999999999-0"
    got: dict[str, bytes] = {}
    with trio.fail_after(20):  # keep-alives every 15 s: no stream gets its events from those
        async with trio.open_nursery() as nursery:
            feeds = Feeds(Hub(nursery, 15))
            ahead = _task_frames(service, feeds, tid, made_up, [])
            assert await ahead.__anext__() == b"retry: 2000\n\n"

            async def rest() -> None:
                got["ahead"] = b"".join([c async for c in ahead])

            nursery.start_soon(rest)
            await trio.testing.wait_all_tasks_blocked()  # it follows the task's feed
            got["others"] = await follow(service, feeds, tid)
    assert frames_of(got["others"]) == await all_frames(service, tid)
    assert got["ahead"] == b""  # nothing follows its id; it ends with the task


async def test_the_daemon_stopping_ends_every_stream_of_a_feed(
    start_daemon: Callable[..., Awaitable[Daemon]],
) -> None:
    daemon = await start_daemon()
    service = daemon.service
    tid = (await service.submit(task_body(cmd("echo started; sleep 30")))).record.id
    ended = 0

    async def subscriber() -> None:
        nonlocal ended
        await follow(service, feeds, tid)
        ended += 1

    async def started() -> bool:
        return any(e.type == "output" for e in await service.events(tid))

    await wait_for(started, timeout=20)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            hub = Hub(nursery, 15)
            feeds = Feeds(hub)
            for _ in range(3):
                nursery.start_soon(subscriber)
            await wait_for(lambda: hub.open_streams == 3)
            hub.close()
    assert ended == 3
    await service.cancel(tid)
    await wait_terminal(daemon, tid)


async def test_a_reader_that_fails_ends_its_streams_and_the_next_stream_starts_anew(
    start_daemon: Callable[..., Awaitable[Daemon]], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = await start_daemon()
    service = daemon.service
    tid = (await service.submit(task_body(cmd(LINES)))).record.id
    read: Callable[..., Awaitable[Any]] = service.events

    async def failing(task_id: str, after: str = "0-0", *, block_ms: int | None = None) -> Any:
        if block_ms is not None:  # the feed's waiting read: as when Redis goes away
            raise UnavailableError("Redis failed: Connection refused")
        return await read(task_id, after)

    async with trio.open_nursery() as nursery:
        feeds = Feeds(Hub(nursery, 15))
        monkeypatch.setattr(service, "events", failing)
        with pytest.raises(UnavailableError, match="Connection refused"):
            await follow(service, feeds, tid)
        monkeypatch.setattr(service, "events", read)
        again = await follow(service, feeds, tid)
    assert frames_of(again) == await all_frames(service, tid)
