"""The systemd notify protocol (sd_notify(3)), without libsystemd: a datagram per message.

`READY=1` once the APIs listen and Redis and PostgreSQL answer, `STATUS=` lines for
`systemctl status`, `WATCHDOG=1` from a trio task (so a wedged event loop stops them and systemd
restarts the daemon), `RELOADING=1` / `READY=1` around a policy reload and `STOPPING=1` on
shutdown. Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

The protocol's variables are read here, from the environment systemd gives the process; they
are not settings.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import trio

logger = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to `address` (a path, or `@name` for the abstract namespace)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: trio.socket.SocketType | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        if env.get("WATCHDOG_USEC", "").isdigit():
            pid = env.get("WATCHDOG_PID", "")
            if not pid or pid == str(os.getpid()):  # meant for this process, not a child
                usec = int(env["WATCHDOG_USEC"])
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout systemd gave, or None."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    async def send(self, **fields: Any) -> None:
        """One message of `KEY=value` lines; errors are logged, never raised (best effort)."""
        if self.address is None:
            return
        text = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            await self._sock.sendto(text.encode(), target)
        except OSError as exc:
            logger.warning("cannot notify systemd at %s: %s", self.address, exc)

    async def ready(self, status: str) -> None:
        await self.send(ready=1, status=status, mainpid=os.getpid())

    async def status(self, status: str) -> None:
        await self.send(status=status)

    async def reloading(self) -> None:
        await self.send(reloading=1, monotonic_usec=time.monotonic_ns() // 1000)

    async def stopping(self, status: str = "stopping") -> None:
        await self.send(stopping=1, status=status)

    async def serve_watchdog(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Send WATCHDOG=1 every half timeout while the event loop runs (if systemd asks)."""
        task_status.started()
        interval = self.watchdog_interval
        if interval is None or not self.enabled:
            return
        while True:
            await self.send(watchdog=1)
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
