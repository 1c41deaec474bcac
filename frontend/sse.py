"""Server-Sent Events: frame format, response headers, and the hub that ends streams at shutdown.

A stream is an async generator. It never yields inside a cancel scope (trio's rule); it waits
inside a scope the hub tracks, so `Hub.close()` ends every open stream at once when the daemon
stops, instead of Hypercorn waiting out its graceful timeout for them.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Final

import trio
from quart import Response, make_response

RETRY_MS: Final = 2000  #: how long a disconnected EventSource waits before reconnecting
KEEPALIVE: Final = b": keepalive\n\n"
EVENT_ID: Final = re.compile(r"\d{1,19}-\d{1,19}")  #: a Redis stream id (each part < 2**64)


def frame(event_id: str | None, event: str, data: Any) -> bytes:
    """One event; `data` as compact JSON (it has no newline, so one `data:` line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"{head}event: {event}\ndata: {body}\n\n".encode()


async def stream_response(frames: AsyncIterator[bytes]) -> Response:
    response = await make_response(
        frames,
        200,
        {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    assert isinstance(response, Response)
    response.timeout = None  # else Quart's RESPONSE_TIMEOUT (60 s) cuts the stream
    return response


class Hub:
    """The open streams of one app, and a nursery for work a stream drives (exec output)."""

    def __init__(self, nursery: trio.Nursery, keepalive_s: float) -> None:
        self.nursery = nursery
        self.keepalive_s = keepalive_s
        self.closing = trio.Event()
        self._waits: set[trio.CancelScope] = set()
        self.open_streams = 0

    @contextmanager
    def waiting(self) -> Iterator[trio.CancelScope]:
        """A scope around one wait of a stream; cancelled when the hub closes."""
        with trio.CancelScope() as scope:
            if self.closing.is_set():
                scope.cancel()
            self._waits.add(scope)
            try:
                yield scope
            finally:
                self._waits.discard(scope)

    @contextmanager
    def stream(self) -> Iterator[None]:
        self.open_streams += 1
        try:
            yield
        finally:
            self.open_streams -= 1

    def close(self) -> None:
        self.closing.set()
        for scope in list(self._waits):
            scope.cancel()
