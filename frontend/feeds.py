"""One reader per followed task, shared by all the task's event streams in this process.

A thousand subscribers of a task would otherwise each read every event from the event log,
decode it and encode it as an SSE frame: a thousand times the same work, every event. Here one
reader per task reads each event once and encodes it once, into a window of frames bounded in
bytes; each subscriber keeps only its cursor (the id of the last event it sent) and takes what
follows it in the window. No subscriber ever waits for another: the reader never waits for
them, and one slower than the window reaches back (a late joiner's history, a reader stuck on
a full socket) reads what it lacks from the event log itself, as every subscriber once did.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Final

import trio

from frontend.sse import Hub, frame
from wsrunner.models import TERMINAL_STATES, Event
from wsrunner.service import Service

WINDOW_BYTES: Final = 512 * 1024  #: frames a feed keeps for its subscribers (at least its last)

_TERMINAL: Final = frozenset(s.value for s in TERMINAL_STATES)

Key = tuple[int, int]  #: an event id ("1732400000000-0") as the numbers it orders by


def event_key(event_id: str) -> Key:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def event_id(key: Key) -> str:
    return f"{key[0]}-{key[1]}"


def _before(key: Key) -> Key:
    """The greatest id below `key` (which is above 0-0)."""
    ms, seq = key
    return (ms, seq - 1) if seq else (ms - 1, 2**64 - 1)


def encode(events: Sequence[Event]) -> tuple[list[bytes], bool]:
    """The events' frames, up to and including the task's final status (True when it is in)."""
    frames = []
    for event in events:
        frames.append(frame(event.id, event.type, event.data))
        if event.type == "status_changed" and event.data.get("status") in _TERMINAL:
            return frames, True
    return frames, False


class Feed:
    """A task's events after `floor`, as frames, and the wake-up of the streams that follow it.

    The reader appends; subscribers only read (`frames_after`) and wait (`changed`), so no
    subscriber can hold up the reader or another subscriber.
    """

    def __init__(self, task_id: str, floor: Key) -> None:
        self.task_id = task_id
        self.floor = floor  #: the window holds every event after this one, and none before
        self.known = False  #: the reader has found `floor` in the log (or read it from its start)
        self.ended = False  #: nothing follows the window (the task's final status is in it)
        self.failed: Exception | None = None  #: why the reader stopped, if it failed
        self.changed = trio.Event()  #: set (and replaced) when anything here changes
        self.quiet = 0  #: keep-alive periods that passed without an event
        self.subscribers = 0
        self._keys: list[Key] = []
        self._frames: list[bytes] = []
        self._size = 0
        self._next = floor  # where the reader reads from
        self._scope = trio.CancelScope()  # the reader's whole life

    def frames_after(self, cursor: Key) -> tuple[list[bytes], Key] | None:
        """The frames of the events after `cursor`, and the id of the last of them (`cursor`
        when there are none); None when the window does not reach back that far."""
        if cursor < self.floor:
            return None
        i = bisect.bisect_right(self._keys, cursor)
        if i == len(self._keys):
            return [], cursor
        return self._frames[i:], self._keys[-1]

    def stop(self) -> None:
        self._scope.cancel()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _append(self, events: Sequence[Event]) -> None:
        frames, self.ended = encode(events)
        for event, encoded in zip(events, frames, strict=False):
            self._keys.append(event_key(event.id))
            self._frames.append(encoded)
            self._size += len(encoded)
        self._next = self._keys[-1]
        drop = 0
        while self._size > WINDOW_BYTES and drop < len(self._frames) - 1:
            self._size -= len(self._frames[drop])
            drop += 1
        if drop:
            self.floor = self._keys[drop - 1]
            del self._keys[:drop], self._frames[:drop]

    async def serve(self, service: Service, hub: Hub, gone: Callable[[Feed], None]) -> None:
        """Read the task's events into the window until the task ends, the reader is stopped
        or the hub closes; a failure is kept in `failed` for the subscribers to raise."""
        with self._scope:
            try:
                await self._read(service, hub)
            except Exception as exc:
                # UnavailableError, NotFoundError if the task went, or a bug: it ends this
                # feed's streams (each raises it, as it raised a failure of its own read
                # before), never the server whose nursery runs the reader.
                self.failed = exc
                gone(self)  # the next stream tries again
            finally:
                self._wake()

    async def _read(self, service: Service, hub: Hub) -> None:
        # The first stream's Last-Event-ID says where to start, and nothing says that an event
        # with that id exists. Read from just before it: a log that ends before it (an id made
        # up) is read from its start, or the reader would skip every event before that id.
        if self.floor > (0, 0):
            events = await service.events(self.task_id, event_id(_before(self.floor)))
            if events and event_key(events[0].id) == self.floor:
                events = events[1:]
            elif not events:
                self.floor = self._next = (0, 0)
            if events:
                self._append(events)
        self.known = True
        self._wake()
        block_ms = int(hub.keepalive_s * 1000)
        while not self.ended:
            events = []
            with hub.waiting():
                events = await service.events(self.task_id, event_id(self._next), block_ms=block_ms)
            if hub.closing.is_set():
                return
            if events:
                self._append(events)
            elif (await service.get(self.task_id)).status.terminal:
                # Quiet for a keep-alive period, and over: its last events are gone (Redis
                # lost them), so nothing is left to wait for.
                self.ended = True
            else:
                self.quiet += 1
            self._wake()


class Feeds:
    """The feeds of one app, by task; a feed lives while a stream follows it."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._feeds: dict[str, Feed] = {}

    @contextmanager
    def follow(self, service: Service, task_id: str, after: Key) -> Iterator[Feed]:
        """The task's feed, started (reading after `after`) if no stream follows it yet."""
        feed = self._feeds.get(task_id)
        if feed is None:
            feed = self._feeds[task_id] = Feed(task_id, after)
            self.hub.nursery.start_soon(feed.serve, service, self.hub, self._gone)
        feed.subscribers += 1
        try:
            yield feed
        finally:
            feed.subscribers -= 1
            if not feed.subscribers:
                feed.stop()
                self._gone(feed)

    def _gone(self, feed: Feed) -> None:
        """Forget `feed` (it failed, or nobody follows it): the next stream starts a new one."""
        if self._feeds.get(feed.task_id) is feed:
            del self._feeds[feed.task_id]
