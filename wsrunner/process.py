"""Child processes owned from spawn to reap: own session, capped output, whole-group kill.

Each command starts in a new session (its pid is its process group id). When it exits, times out
or is cancelled, every process left in its group gets SIGTERM, then SIGKILL after a grace period,
and the direct child is reaped, so no background grandchild outlives its step or holds its pipes.
Output is read by our own pumps into capped buffers: the first `cap` bytes are kept, the rest is
counted and dropped, so a `yes` cannot exhaust the daemon's memory. Once a buffer is full and
nobody streams the output any more, the rest is spliced to /dev/null in the kernel, 1 MiB at a
time (the pipes are made that large), and only counted: a command printing a gigabyte costs the
event loop a thousand system calls, not a gigabyte of copies that starve every other task.

A child is started from the event loop's thread: `subprocess.Popen` uses vfork, so the loop waits
only until the child has exec'd (well under a millisecond; a worker thread costs more than that),
and its exit is awaited on a pidfd.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

DRAIN_S: Final = 2.0  # how long to wait for pipes after the group is dead (a setsid escapee)
PIPE_BYTES: Final = 1 << 20  # each output pipe's buffer (F_SETPIPE_SZ), and one read or splice
_POLL_S: Final = 0.02


@dataclass(slots=True)
class CappedBuffer:
    """Keeps the first `cap` bytes written to it and counts all of them."""

    cap: int
    data: bytearray = field(default_factory=bytearray)
    total: int = 0

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.total += len(chunk)

    @property
    def truncated(self) -> bool:
        return self.total > len(self.data)

    @property
    def full(self) -> bool:
        return len(self.data) >= self.cap

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass(slots=True)
class Capture:
    """What a process printed; filled while it runs, so it is complete even after a cancel."""

    stdout: CappedBuffer
    stderr: CappedBuffer
    #: called with ("stdout" | "stderr", chunk) as output arrives; must not block. Returning
    #: False says it wants no more (then a full buffer lets the rest go unread, only counted).
    on_output: Callable[[str, bytes], bool | None] | None = None
    pipes_held_open: bool = False  #: a process that left the group kept our pipes open

    @classmethod
    def capped(cls, stdout_cap: int, stderr_cap: int,
               on_output: Callable[[str, bytes], bool | None] | None = None) -> Capture:  # fmt: skip
        return cls(CappedBuffer(stdout_cap), CappedBuffer(stderr_cap), on_output)


def _group_alive(pgid: int) -> bool:
    """True if a non-zombie process is still in group `pgid` (killpg(0) counts zombies too)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


class _Child:
    """A started child: its pipes, and its exit awaited on a pidfd (no thread, no SIGCHLD)."""

    def __init__(self, argv: Sequence[str], *, cwd: str, env: Mapping[str, str],
                 pass_fds: tuple[int, ...]) -> None:  # fmt: skip
        out_r, out_w = os.pipe()  # both ends close-on-exec; Popen dup2()s the write ends
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # over fs.pipe-max-size (or the user's pipe pages): the default
                pass
        try:
            self._popen = subprocess.Popen(
                list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out_w,
                stderr=err_w, start_new_session=True, pass_fds=pass_fds,
            )  # fmt: skip
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        self.pid = self._popen.pid
        self._pidfd = os.pidfd_open(self.pid)
        self.stdout = trio.lowlevel.FdStream(out_r)
        self.stderr = trio.lowlevel.FdStream(err_r)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        while self._popen.poll() is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        return self._popen.returncode


async def _discard(stream: trio.lowlevel.FdStream) -> int:
    """Read `stream` to its end without copying it into this process; returns the byte count.

    splice(2) moves the pipe's pages to /dev/null in the kernel, with the GIL released.
    """
    fd, total = stream.fileno(), 0
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        while True:
            try:
                moved = os.splice(fd, null, PIPE_BYTES, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as exc:  # no splice for this pipe (EINVAL): read and drop
                if exc.errno != errno.EINVAL:
                    raise
                while chunk := await stream.receive_some(PIPE_BYTES):
                    total += len(chunk)
                return total
            if moved == 0:
                return total
            total += moved
            await trio.lowlevel.checkpoint()
    finally:
        os.close(null)


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


async def terminate_group(proc: _Child, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds, reap the direct child.

    Cancellation: call it shielded; it always finishes within `grace` plus a few ms.
    """
    pgid = proc.pid
    if _killpg(pgid, signal.SIGTERM):
        with trio.move_on_after(grace):
            await proc.wait()
            # No event exists for "the group is empty": look again every few ms.
            while await trio.to_thread.run_sync(_group_alive, pgid):  # noqa: ASYNC110
                await trio.sleep(_POLL_S)
        _killpg(pgid, signal.SIGKILL)
    await proc.wait()


async def run_process(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    capture: Capture,
    kill_grace: float,
    pass_fds: tuple[int, ...] = (),
) -> int:
    """Run `argv` to completion and return its exit status (negative: killed by that signal).

    The caller owns the timeout: wrap the call in `trio.move_on_after`.

    Cancellation: the whole process group is terminated (SIGTERM, grace, SIGKILL) and the
    child reaped before `Cancelled` propagates; `capture` keeps what was printed until then.
    """
    proc = _Child(argv, cwd=cwd, env=env, pass_fds=pass_fds)
    try:
        async with trio.open_nursery() as nursery:
            done = [trio.Event(), trio.Event()]

            async def pump(stream: trio.lowlevel.FdStream, name: str, buf: CappedBuffer,
                           finished: trio.Event) -> None:  # fmt: skip
                try:
                    async with stream:
                        while chunk := bytes(await stream.receive_some(PIPE_BYTES)):
                            buf.add(chunk)
                            more = (
                                False
                                if capture.on_output is None
                                else capture.on_output(name, chunk)
                            )
                            if buf.full and more is False:  # kept all it may, streamed enough
                                buf.total += await _discard(stream)
                                break
                finally:
                    finished.set()

            nursery.start_soon(pump, proc.stdout, "stdout", capture.stdout, done[0])
            nursery.start_soon(pump, proc.stderr, "stderr", capture.stderr, done[1])
            await proc.wait()
            # The command is done; whatever it left running in its group goes with it.
            with trio.CancelScope(shield=True):
                await terminate_group(proc, kill_grace)
            with trio.move_on_after(DRAIN_S):
                for ev in done:
                    await ev.wait()
            if not all(ev.is_set() for ev in done):
                capture.pipes_held_open = True
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            # The common case, nothing left in the group, costs one signal-0 probe; only a
            # group that still exists (perhaps only zombies) is looked at through /proc.
            if proc.returncode is None or (
                _killpg(proc.pid, 0) and await trio.to_thread.run_sync(_group_alive, proc.pid)
            ):
                await terminate_group(proc, kill_grace)
    assert proc.returncode is not None
    return proc.returncode
