"""Child processes owned from spawn to reap: own session, capped output, whole-group kill.

Each command starts in a new session (its pid is its process group id). When it exits, times out
or is cancelled, every process left in its group gets SIGTERM, then SIGKILL after a grace period,
and the direct child is reaped, so no background grandchild outlives its step or holds its pipes.
Output is read into capped buffers: the first `cap` bytes are kept, the rest is counted and
dropped, so a `yes` cannot exhaust the daemon's memory. Once a buffer is full and nobody streams
the output any more, the rest is spliced to /dev/null in the kernel, 1 MiB at a time (the pipes
are made that large), and only counted: a command printing a gigabyte costs the event loop a
thousand system calls, not a gigabyte of copies that starve every other task.

A child is started from the event loop's thread with posix_spawn (a vfork in glibc): the loop
waits until the child has exec'd (about 0.1 ms on an idle machine, 0.35 ms under load), and the
spawn costs about half the CPU of `subprocess.Popen`. Only the descriptors it is given are open
in the child: every other one is close-on-exec (Python opens them so; `inherit_none` marks those
the daemon itself inherited).

One task then serves the command to its end, the caller's: it waits on an epoll set holding
both pipes and a pidfd for the exit, so a command costs the event loop no tasks of its own.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

DRAIN_S: Final = 2.0  # how long to wait for pipes after the group is dead (a setsid escapee)
PIPE_BYTES: Final = 1 << 20  # each output pipe's buffer (F_SETPIPE_SZ), and one read or splice
_POLL_S: Final = 0.02
#: Python ignores these; a command gets them back (as `subprocess`' restore_signals does), so
#: that a write past RLIMIT_FSIZE kills it (SIGXFSZ) and `yes | head` ends (SIGPIPE).
_DEFAULT_SIGNALS: Final = (signal.SIGPIPE, signal.SIGXFSZ)
#: A check made while a command runs: returns the seconds until the next one, or None: stop it.
Watch = Callable[[], Awaitable[float | None]]


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
    def capped(
        cls,
        stdout_cap: int,
        stderr_cap: int,
        on_output: Callable[[str, bytes], bool | None] | None = None,
    ) -> Capture:
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
    """A started child: the read ends of its pipes (non-blocking), its pidfd, and one epoll
    set over all three, so a single task can wait for whichever is ready first."""

    def __init__(
        self, argv: Sequence[str], *, env: Mapping[str, str], pass_fds: tuple[int, ...]
    ) -> None:
        path = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0], path=env.get("PATH"))
        if path is None:
            raise FileNotFoundError(errno.ENOENT, "no such command on the PATH", argv[0])
        out_r, out_w = os.pipe()  # both ends close-on-exec; the spawn dup2()s the write ends
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # over fs.pipe-max-size (or the user's pipe pages): the default
                pass
        # dup2 onto itself clears close-on-exec in the child only (glibc 2.29 and later).
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
            *((os.POSIX_SPAWN_DUP2, fd, fd) for fd in pass_fds),
        ]
        try:
            self.pid = os.posix_spawn(
                path, list(argv), env, file_actions=actions, setsid=True, setsigdef=_DEFAULT_SIGNALS
            )
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        self.returncode: int | None = None
        self.pipes = {out_r: "stdout", err_r: "stderr"}  #: the ones still open
        try:
            self.pidfd = os.pidfd_open(self.pid)
            self.ready = select.epoll(3)
            for fd in (out_r, err_r, self.pidfd):
                self.ready.register(fd, select.EPOLLIN)
        except BaseException:  # out of descriptors, say: the command must not run unowned
            _killpg(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            for fd in (out_r, err_r, getattr(self, "pidfd", -1)):
                if fd >= 0:
                    os.close(fd)
            raise

    def poll(self) -> int | None:
        """Reap the child if it has exited; its exit status (negative: killed by that signal)."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    async def wait(self) -> int:
        while (code := self.poll()) is None:
            await trio.lowlevel.wait_readable(self.pidfd)
        return code

    def close_pipe(self, fd: int) -> None:
        del self.pipes[fd]
        self.ready.unregister(fd)
        os.close(fd)

    def close(self) -> None:
        for fd in list(self.pipes):
            self.close_pipe(fd)
        self.ready.close()
        os.close(self.pidfd)


_chunk = bytearray(PIPE_BYTES)  # every read lands here first (on the event loop's thread only)


def _read(fd: int) -> bytes:
    """What the pipe holds, up to PIPE_BYTES; b"" at its end. Raises BlockingIOError."""
    size = os.readv(fd, [_chunk])
    return bytes(memoryview(_chunk)[:size])


def _skip(fd: int, null: int) -> int:
    """Drop up to PIPE_BYTES of the pipe and count them; 0 at its end. Raises BlockingIOError.

    splice(2) moves the pipe's pages to /dev/null (`null`) in the kernel, never copied into
    this process; where the kernel refuses (EINVAL), they are read and dropped.
    """
    try:
        return os.splice(fd, null, PIPE_BYTES, flags=os.SPLICE_F_NONBLOCK)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.readv(fd, [_chunk])


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


async def _ready_by(proc: _Child, deadline: float) -> bool:
    """Wait for a pipe or the exit of `proc`: True when one is ready, False at `deadline`."""
    if deadline == math.inf:  # (no cancel scope to make)
        await trio.lowlevel.wait_readable(proc.ready.fileno())
        return True
    with trio.move_on_at(deadline):
        await trio.lowlevel.wait_readable(proc.ready.fileno())
        return True
    return False


async def _pump(
    proc: _Child, capture: Capture, kill_grace: float, watch: Watch | None, watch_after: float
) -> None:
    """Read both pipes into `capture`, await the exit and call `watch` when due, all in this
    one task. Once the command is done, kill what it left in its group, then read on until
    both pipes end (at most DRAIN_S: a process that left the group may hold them open).
    Returns early, the command still running, when `watch` says to stop it."""
    buffers = {"stdout": capture.stdout, "stderr": capture.stderr}
    counted: set[int] = set()  # pipes past their cap that nobody streams: only counted
    null = -1
    drain_until = math.inf
    watch_at = math.inf if watch is None else trio.current_time() + watch_after
    waited = False  # since the last batch: then it needs no checkpoint of its own
    try:
        while proc.pipes or proc.returncode is None:
            ready = proc.ready.poll(0)
            if not ready:
                waited = True
                if proc.returncode is not None:
                    if not await _ready_by(proc, drain_until):
                        capture.pipes_held_open = True
                        return
                elif not await _ready_by(proc, watch_at):
                    assert watch is not None
                    if (delay := await watch()) is None:
                        return
                    watch_at = trio.current_time() + delay
                continue
            for fd, _ in ready:
                if fd == proc.pidfd:
                    proc.ready.unregister(fd)
                    # Reaped first (it has exited: a zombie still counts in its group); what it
                    # left in its group is terminated. Usually nothing: one signal-0 probe.
                    if proc.poll() is None or _killpg(proc.pid, 0):
                        with trio.CancelScope(shield=True):
                            await proc.wait()
                            await terminate_group(proc, kill_grace)
                    drain_until = trio.current_time() + DRAIN_S
                    continue
                name = proc.pipes[fd]
                try:
                    if fd in counted:
                        size = _skip(fd, null)
                    else:
                        chunk = _read(fd)
                        size = len(chunk)
                except BlockingIOError:
                    continue
                if size == 0:
                    proc.close_pipe(fd)
                elif fd in counted:
                    buffers[name].total += size
                else:
                    buf = buffers[name]
                    buf.add(chunk)
                    more = False if capture.on_output is None else capture.on_output(name, chunk)
                    if buf.full and more is False:  # kept all it may, streamed enough
                        counted.add(fd)
                        if null < 0:
                            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            if not waited:  # output that never stops must not starve the other tasks
                await trio.lowlevel.checkpoint()
            waited = False
    finally:
        if null >= 0:
            os.close(null)


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    capture: Capture,
    kill_grace: float,
    pass_fds: tuple[int, ...] = (),
    watch: Watch | None = None,
    watch_after: float = 0.0,
) -> int:
    """Run `argv` to completion and return its exit status (negative: killed by that signal).

    It starts in the daemon's working directory (a launch, `wsrunner.execution.sandbox`, changes to its
    own first), with only stdin (/dev/null), the pipes and `pass_fds` open. The caller owns the
    timeout: wrap the call in `trio.move_on_after`.

    `watch`, if given, is awaited `watch_after` seconds after the start, then again as often as
    it asks (it returns the seconds until its next call) while the command runs; it returns None
    to have the command stopped like a cancelled one. While it runs, the pipes are not read
    (they hold PIPE_BYTES each).

    Cancellation: the whole process group is terminated (SIGTERM, grace, SIGKILL) and the
    child reaped before `Cancelled` propagates; `capture` keeps what was printed until then.
    """
    proc = _Child(argv, env=env, pass_fds=pass_fds)
    try:
        await _pump(proc, capture, kill_grace, watch, watch_after)
    finally:
        # The common case, nothing left in the group, costs one signal-0 probe; only a group
        # that still exists (perhaps only zombies) is looked at through /proc.
        if proc.returncode is None or _killpg(proc.pid, 0):
            with trio.CancelScope(shield=True):
                if proc.returncode is None or await trio.to_thread.run_sync(_group_alive, proc.pid):
                    await terminate_group(proc, kill_grace)
        proc.close()
    assert proc.returncode is not None
    return proc.returncode


def inherit_none() -> None:
    """Make every descriptor of this process above stderr close-on-exec, so that none the
    daemon inherited (from systemd, a shell, a test runner) reaches a command it starts; the
    ones Python opens are so already."""
    for name in os.listdir("/proc/self/fd"):
        if (fd := int(name)) > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the listing's own descriptor, closed by now
                pass
