"""Outbound network for a sandbox that never reaches the host: the `egress` mode.

The sandbox keeps its own network namespace (bubblewrap's). While bubblewrap waits on its block
fd, the daemon attaches a user-mode TCP/IP stack to that namespace (slirp4netns, started as
root so that it can open /dev/net/tun there, and sandboxed by its own `--enable-sandbox`) and
adds `unreachable` routes inside it for every private, shared, link-local and reserved range
and for each of the host's own addresses. Then the command starts. What it can reach is the
public internet through the host's sockets:

- the host's loopback is out of reach: slirp4netns maps none of it (`--disable-host-loopback`),
  and the namespace's own 127.0.0.1 is its own;
- 10/8, 172.16/12, 192.168/16, 100.64/10, 169.254/16 (cloud metadata) and the host's addresses
  answer "no route", unless the policy names a range in `sandbox.egressAllow`;
- nothing reaches the sandbox from outside: slirp4netns forwards no port inward.

A sandbox without network (`none`) costs none of this: only `egress` commands pay for the
stack (a few milliseconds: the daemon's git network operations, and commands whose policy
asks for it).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import trio

logger = logging.getLogger(__name__)

#: Destinations an egress sandbox must not reach (RFC 6890 special-purpose IPv4 ranges that
#: are not global, plus multicast); loopback is the namespace's own.
UNREACHABLE: Final = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
GATEWAY: Final = "10.0.2.2"  #: slirp4netns' defaults: the gateway and its DNS forwarder
RESOLV_CONF: Final = "nameserver 10.0.2.3\noptions timeout:2 attempts:2\n"
SETUP_TIMEOUT_S: Final = 5.0
_ADDRESSES_TTL_S: Final = 30.0
_NS_GET_PARENT: Final = 0xB702  #: ioctl(2) on a namespace descriptor: its parent's
_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


class EgressError(RuntimeError):
    """The user-mode network could not be attached; the command must not start."""


@dataclass(frozen=True, slots=True)
class Tools:
    """The programs egress needs, found by `find_tools`."""

    slirp4netns: str
    nsenter: str
    ip: str


def find_tools() -> Tools | str:
    """The programs egress mode needs, or a sentence naming the one missing."""
    found = {
        name: shutil.which(name, path=_ENV["PATH"]) for name in ("slirp4netns", "nsenter", "ip")
    }
    missing = [name for name, path in found.items() if path is None]
    if missing:
        packages = {"slirp4netns": "slirp4netns", "nsenter": "util-linux", "ip": "iproute2"}
        return (
            f"{', '.join(missing)} not installed (apt-get install "
            f"{' '.join(packages[m] for m in missing)})"
        )
    return Tools(**found)  # type: ignore[arg-type]


class Egress:
    """Attaches the user-mode stack to sandboxes that ask for `egress`."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self._addresses: tuple[float, tuple[str, ...]] = (0.0, ())

    def host_addresses(self) -> tuple[str, ...]:
        """The host's own IPv4 addresses (re-read every half minute). Blocking: a thread."""
        at, cached = self._addresses
        if time.monotonic() - at < _ADDRESSES_TTL_S:
            return cached
        done = subprocess.run(
            [self.tools.ip, "-o", "-4", "addr", "show"],
            capture_output=True,
            text=True,
            timeout=5,
            env=_ENV,
            check=False,
        )
        found = []
        for line in done.stdout.splitlines():
            words = line.split()
            if "inet" in words:
                address = words[words.index("inet") + 1].split("/")[0]
                if not ipaddress.ip_address(address).is_loopback:
                    found.append(address)
        self._addresses = (time.monotonic(), tuple(found))
        return self._addresses[1]

    def routes(self, allowed: Sequence[str]) -> str:
        """The `ip -batch` script for the namespace. Blocking (host addresses): a thread."""
        lines = [f"route add unreachable {net}" for net in UNREACHABLE]
        lines += [f"route add unreachable {addr}/32" for addr in self.host_addresses()]
        lines += [f"route add {net} via {GATEWAY}" for net in allowed]
        return "\n".join(lines) + "\n"

    async def attach(
        self,
        info_fd: int,
        block_fd: int,
        allowed: Sequence[str],
        failures: list[str],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve one sandbox's network: wait for bubblewrap to report its pid on `info_fd`,
        attach slirp4netns, add the routes, then release the command through `block_fd`. Runs
        until cancelled (the command's end); then the stack is stopped.

        Errors: when the stack cannot be attached within SETUP_TIMEOUT_S, the sandbox is
        killed before its command runs and the reason is appended to `failures`; nothing is
        raised (the command's end reports it).
        """
        task_status.started()
        try:
            await self._attach(info_fd, block_fd, allowed)
        except (EgressError, OSError) as exc:
            logger.error("egress network not attached: %s", exc)
            failures.append(str(exc))

    async def _attach(self, info_fd: int, block_fd: int, allowed: Sequence[str]) -> None:
        pid = None
        stop_r, stop_w = os.pipe()  # slirp4netns exits when this closes (--exit-fd)
        ready_r, ready_w = os.pipe()
        userns = pidfd = -1
        released = False
        slirp: trio.Process | None = None
        try:
            with trio.fail_after(SETUP_TIMEOUT_S):
                pid = await _read_child_pid(info_fd)
                try:  # it waits on its block fd, so this is the sandbox, not a reused pid
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    raise EgressError("the sandbox ended before its network was set up") from None
                userns = await _outer_userns(pid)
                slirp = await trio.lowlevel.open_process(
                    [
                        self.tools.slirp4netns,
                        "--configure",
                        "--mtu=65520",
                        "--disable-host-loopback",
                        "--enable-sandbox",
                        f"--userns-path=/proc/self/fd/{userns}",
                        "--ready-fd",
                        str(ready_w),
                        "--exit-fd",
                        str(stop_r),
                        str(pid),
                        "tap0",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    pass_fds=(ready_w, stop_r, userns),
                    env=_ENV,
                )
                os.close(ready_w)
                ready_w = -1
                if not await _read_some(ready_r):
                    raise EgressError(f"slirp4netns stopped: {await _stderr(slirp)}")
                script = await trio.to_thread.run_sync(self.routes, allowed)
                done = await trio.run_process(
                    [
                        self.tools.nsenter,
                        f"--net=/proc/{pid}/ns/net",
                        "--",
                        self.tools.ip,
                        "-batch",
                        "-",
                    ],
                    stdin=script.encode(),
                    capture_stderr=True,
                    check=False,
                    env=_ENV,
                )
                if done.returncode != 0:
                    raise EgressError("routes: " + done.stderr.decode(errors="replace").strip())
            os.write(block_fd, b"1")
            released = True
            await trio.sleep_forever()
        except BaseException as exc:
            if pidfd >= 0 and not released:
                _kill(pidfd)  # blocked before exec: nothing ran without its routes
            if isinstance(exc, trio.TooSlowError):
                raise EgressError(f"not attached within {SETUP_TIMEOUT_S:g}s") from None
            raise
        finally:
            for fd in (ready_r, ready_w, stop_r, stop_w, userns, pidfd):
                if fd >= 0:
                    os.close(fd)
            if slirp is not None:
                # The sandbox is gone or going: the stack has nothing left to deliver. Its exit
                # (the kernel tearing down what it held of the namespace) takes about 20 ms,
                # which the command's caller need not wait for: it is reaped in the background.
                if slirp.returncode is None:
                    slirp.kill()
                trio.lowlevel.spawn_system_task(_reap, slirp, name="wsrunner.egress.reap")


async def _reap(proc: trio.Process) -> None:
    """Wait for a killed stack to exit and close its pipe."""
    try:
        await proc.wait()
    finally:
        if proc.stderr is not None:
            await proc.stderr.aclose()


async def _read_some(fd: int) -> bytes:
    """What is there to read on the blocking pipe `fd`, once readable; b"" at its end."""
    await trio.lowlevel.wait_readable(fd)
    return os.read(fd, 4096)


async def _read_child_pid(fd: int) -> int:
    """The sandbox's pid from bubblewrap's `--info-fd` JSON."""
    data = b""
    while chunk := await _read_some(fd):
        data += chunk
        try:
            info = json.loads(data)
        except ValueError:
            if len(data) > 65536:
                break
            continue
        pid = info.get("child-pid") if isinstance(info, dict) else None
        if isinstance(pid, int) and pid > 1:
            return pid
        break
    raise EgressError("bubblewrap reported no sandbox pid (did it fail to start?)")


async def _outer_userns(pid: int) -> int:
    """A descriptor of the user namespace that owns the sandbox's network namespace, once the
    sandbox is done setting itself up.

    bubblewrap reports the pid right after the clone; its child then brings up its loopback
    (which must not race with ours) and, for `--disable-userns`, moves into a second, nested
    user namespace, which has no say over the network namespace, before it waits on the block
    fd. So: wait until the child's user namespace is that nested one, and take its parent.
    """
    ours = os.stat("/proc/self/ns/user").st_ino
    delay = 0.0002
    while True:
        try:
            fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EgressError("the sandbox ended before its network was set up") from None
        try:
            parent = fcntl.ioctl(fd, _NS_GET_PARENT)
        finally:
            os.close(fd)
        if os.fstat(parent).st_ino != ours:
            return parent
        os.close(parent)  # still the first namespace: its set-up is under way
        await trio.sleep(delay)
        delay = min(delay * 2, 0.005)


async def _stderr(proc: trio.Process) -> str:
    assert proc.stderr is not None
    with trio.move_on_after(1):
        data = await proc.stderr.receive_some(4096)
        return data.decode(errors="replace").strip() or "no message"
    return "no message"


def _kill(pidfd: int) -> None:
    """SIGKILL the process of `pidfd` (by descriptor: never another process that got its pid)."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
