"""A helper process for the directory work every task needs, off the daemon's GIL.

Making and removing a task directory is about a dozen short system calls. In a worker thread,
each of them gives the GIL up and takes it back from the trio thread, which is busy with the
other tasks: the two threads hand the GIL back and forth a dozen times per task, in futex
calls, and both wait. The helper process has an interpreter of its own; the daemon sends one
datagram and awaits one back.

Only the usual case goes there. Anything else (an error of any kind, leftovers to walk, a
workspace whose layout a command changed, no helper running) is answered `None`: "do it
yourself", and the daemon does the whole operation in a worker thread, as without the helper.
So the helper changes where the work runs, never what happens.

The helper runs as the daemon's user, ignores SIGINT and SIGTERM (a stopping daemon still
records its last tasks) and exits when the daemon's end of the socket closes.

    python -m wsrunner.workspace.fshelper FD
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Final

import outcome
import trio

from wsrunner.workspace import paths

logger = logging.getLogger(__name__)

MESSAGE_BYTES: Final = 1 << 20  #: a request (a task's credentials included) or a reply, at most
RESTART_DELAY_S: Final = 1.0
START_TIMEOUT_S: Final = 10.0  #: the daemon's start waits this long for the helper, at most


class Helper:
    """The daemon's end: one helper process while `serve` runs, started again if it dies."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None  #: non-blocking, while the helper is up
        self._send_lock = trio.Lock()  #: for a sender that must wait for room
        self._calls: dict[int, trio.lowlevel.Task] = {}  #: sent, awaiting the answer
        self._next_id = 0
        self._status: Any = None  #: `serve`'s task status until the helper first answers
        self.pid: int | None = None  #: the helper's, while it is up
        self._answered = False  #: the current helper answered (is or was up)

    async def call(self, op: str, *args: Any) -> Any:
        """Run `op(*args)` in the helper; None: it did nothing, do it yourself.

        Not cancellable once sent (like a worker thread's call): the helper finishes what it
        started, and its caller learns what happened.
        """
        sock = self._sock
        if sock is None:
            return None
        self._next_id += 1
        call_id = self._next_id
        try:
            await self._send(sock, json.dumps([call_id, op, args]).encode())
        except (OSError, trio.ClosedResourceError):  # the helper went away meanwhile
            return None
        # Registered only now (no checkpoint since the send): the reader wakes this task with
        # the answer, or with None when the helper goes. The wait refuses to be cancelled, as a
        # shielded one would, without a cancel scope and an event per call.
        self._calls[call_id] = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    async def _send(self, sock: socket.socket, data: bytes) -> None:
        """Send one datagram (SOCK_SEQPACKET: all of it or nothing), at once if there is room,
        as is usual: no pass through the scheduler (the answer's wait is one). Waiting for room
        is shielded: a call, once begun, is sent."""
        while True:
            try:
                sock.send(data)
                return
            except BlockingIOError:
                with trio.CancelScope(shield=True):
                    async with self._send_lock:  # one waiter per socket, as trio requires
                        await trio.lowlevel.wait_writable(sock)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the helper until cancelled; callers are declined while it is down.

        Started once the helper answered its first request (or could not be started), so the
        daemon's first tasks find it there.
        """
        self._status = task_status
        delay = RESTART_DELAY_S
        while True:
            self._answered = False
            try:
                await self._run_once()
            except OSError as exc:
                logger.warning("the directory helper failed: %s", exc)
            # One that never answered is tried less and less often (up to once a minute).
            delay = RESTART_DELAY_S if self._answered else min(60.0, delay * 2)
            logger.warning(
                "the directory helper is down; task directories are made in worker "
                "threads until it is back, in %g s",
                delay,
            )
            self._started()
            await trio.sleep(delay)

    def _started(self) -> None:
        if self._status is not None:
            self._status.started()
            self._status = None

    async def _run_once(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with theirs:
                # Its environment is only where to import from: none of the daemon's secrets.
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "wsrunner.workspace.fshelper", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
                )
        except BaseException:
            ours.close()
            raise
        sock, buf = ours, bytearray(MESSAGE_BYTES)
        sock.setblocking(False)
        try:
            await self._send(sock, json.dumps([0, "ping", []]).encode())
            with trio.move_on_after(START_TIMEOUT_S) as waiting:
                await trio.lowlevel.wait_readable(sock)
            if waiting.cancelled_caught:  # the daemon goes on without it; it may answer later
                logger.warning("the directory helper did not answer within %g s", START_TIMEOUT_S)
                self._started()
            while True:
                try:
                    size = sock.recv_into(buf)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if size == 0:  # the helper is gone
                    return
                try:
                    call_id, result = json.loads(buf[:size])
                except ValueError:  # never sent by the helper's loop: stop this one
                    logger.error("the directory helper sent an unreadable reply")
                    return
                if call_id == 0:  # the answer to the first request: it is up
                    self._sock, self.pid, self._answered = sock, proc.pid, True
                    self._started()
                elif (task := self._calls.pop(call_id, None)) is not None:
                    trio.lowlevel.reschedule(task, outcome.Value(result))
        finally:
            self._sock = self.pid = None
            trio.lowlevel.notify_closing(sock)  # a sender waiting for room gets ClosedResourceError
            sock.close()
            for task in self._calls.values():  # never answered: do it yourselves
                trio.lowlevel.reschedule(task, outcome.Value(None))
            self._calls.clear()
            with trio.CancelScope(shield=True):
                proc.kill()
                await proc.wait()


# --- the helper process ---------------------------------------------------------------------


def _make(
    root: str,
    rel: str,
    subdirs: list[str],
    files: dict[str, list[Any]],
    layout: list[list[str]],
    spares: str,
) -> bool | None:
    """A fresh task directory (`paths.make_fresh_dir`, its parent there), from a parked spare
    when there is one, in a workspace whose `layout` (directories, files) is still as prepared;
    None if it is not."""
    if not paths.layout_intact(root, *layout):
        return None
    made = {name: (content, mode) for name, (content, mode) in files.items()}
    if not paths.take_spare(root, rel, spares, subdirs=subdirs, files=made):
        paths.make_fresh_dir(root, rel, subdirs=subdirs, files=made, parents=False)
    return True


def _remove(
    root: str,
    rel: str,
    subdirs: list[str],
    files: list[str],
    listing: str | None,
    spares: str,
    keep: int,
) -> list[str]:
    """The directory gone from `rel`: parked in `spares` (`paths.park_dir`), else removed if
    it is as it was made (anything else raises: no walk here); then the directories in
    `listing`, if one is named."""
    if not paths.park_dir(root, rel, spares, subdirs=subdirs, files=files, keep=keep):
        paths.remove_dir(root, rel, subdirs=subdirs, files=files, walk=False)
    return paths.subdirectories(root, listing) if listing else []


OPS: Final[dict[str, Callable[..., Any]]] = {"make": _make, "remove": _remove, "ping": lambda: True}


def serve_requests(sock: socket.socket, ops: dict[str, Callable[..., Any]]) -> None:
    """The helper's loop: answer each request with its op's result, or None if it raised."""
    buf = bytearray(MESSAGE_BYTES)  # one buffer: a fresh 1 MiB per request costs an mmap
    while size := sock.recv_into(buf):
        call_id, op, args = json.loads(buf[:size])
        try:
            result = ops[op](*args)
        except Exception:  # whatever it was: the daemon does it again, and reports what it finds
            result = None
        reply = json.dumps([call_id, result]).encode()
        if len(reply) > MESSAGE_BYTES:  # (a workspace with a great many repositories)
            reply = json.dumps([call_id, None]).encode()
        sock.send(reply)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with socket.socket(fileno=int(sys.argv[1])) as sock:
        serve_requests(sock, OPS)


if __name__ == "__main__":
    main()
