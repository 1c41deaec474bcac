"""What the fakes share: trio's clock as datetimes, copies as a database returns them, round trips."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Final

import trio

from wsrunner.models import (
    JSON,
    json_text,
)

WAKE_BLOCK_S: Final = 5.0  #: longest `wait_for_work()`, as the Redis queue's BLMOVE block


class _Clock:
    """Datetimes that advance with trio's clock: under a MockClock, record timestamps and lease
    expiry move together, starting from the wall-clock time of the first call."""

    def __init__(self) -> None:
        self._origin: datetime | None = None

    def now(self) -> datetime:
        if self._origin is None:
            self._origin = datetime.now(UTC) - timedelta(seconds=trio.current_time())
        return self._origin + timedelta(seconds=trio.current_time())


def _copy(value: JSON) -> JSON:
    """What a database would hand back: a fresh, plain copy of the JSON written."""
    copied: JSON = json.loads(json_text(value))
    return copied


async def _round_trip(latency: float) -> None:
    """The time a call takes to reach its server; a cancellation here means it never did."""
    if latency > 0:
        await trio.sleep(latency)
    else:
        await trio.lowlevel.checkpoint()
