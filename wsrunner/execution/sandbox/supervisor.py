"""The first process of a warm sandbox: starts each command the daemon asks for, reports its exit.

It is not imported by the daemon: its source runs inside the sandbox, as the workspace's uid
under the seccomp filter, as `/usr/bin/python3 -I -S -c <this file> <socket fd>`, with the
standard library only. It is pid 1 of the sandbox's pid namespace (bubblewrap's `--as-pid-1`)
and not dumpable, so that no command can signal it (pid 1 of a namespace gets no signal from
inside it unless it handles that signal: it handles SIGCHLD alone), read or write its memory,
or open its descriptors (`/proc/1/mem`, `/proc/1/fd`, `pidfd_getfd` all need it dumpable). It
holds nothing a command does not hold, besides its socket to the daemon.

The protocol, one JSON object per SOCK_SEQPACKET message:

    daemon -> {"op": "spawn", "id": N} with five descriptors: the command's stdin, stdout and
              stderr, the read end of its go pipe, and a file holding {"argv": [...], "env":
              {...}, "cwd": "...", "rlimits": [[name, soft, hard], ...]} (-1: unlimited)
    <- daemon {"op": "ready"} with a pidfd of this process, once, at start
              {"op": "spare"} with a pidfd of each spare (below), once it is forked
              {"op": "started", "id": N} with a pidfd of the command's process
              {"op": "failed", "id": N, "error": "..."} when it could not be forked
              {"op": "exit", "id": N, "status": S} S as os.waitstatus_to_exitcode gives it

Each request goes to a spare: a process forked ahead, which has started its session and
waits for one request on a socket of its own (so that no command waits for a fork). With it,
it keeps descriptors 0, 1 and 2 (the sockets are closed), sets the rlimits and waits for one
byte on the go pipe: the daemon moves it into the command's cgroups first, as root, from the
pidfd (usually before the request: it is told of each spare). EOF on the go pipe means: do not
run. A new spare is forked once the request is answered, or once the last one died.

When the daemon's end of the socket closes (the daemon is gone), this process exits, and
with pid 1 gone the kernel kills every process left in the sandbox.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, Final

PR_SET_DUMPABLE: Final = 4
EXIT_NOT_STARTED: Final = 125  #: as the cold launch chain's set-up failures
MESSAGE_BYTES: Final = 4096
RLIMITS: Final = {
    "cpu": resource.RLIMIT_CPU,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
}


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))


def receive(sock: socket.socket, maxfds: int, flags: int = 0) -> tuple[bytes, list[int], int]:
    """A message, the descriptors that came with it and the message flags; `socket.recv_fds`
    with its `flags` applied: Python 3.11's drops them, so MSG_CMSG_CLOEXEC was not set and
    every descriptor received was inherited by the next process started."""
    ints = array.array("i")
    data, ancillary, msg_flags, _ = sock.recvmsg(
        MESSAGE_BYTES, socket.CMSG_LEN(maxfds * ints.itemsize), flags
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints.frombytes(payload[: len(payload) - len(payload) % ints.itemsize])
    return data, list(ints), msg_flags


def harden() -> None:
    """Not dumpable (no ptrace, /proc/1/mem, /proc/1/fd or pidfd_getfd by the commands, which
    run as the same uid); every signal's disposition the default (Python's SIGINT handler
    gone, and SIGPIPE and SIGXFSZ, which Python ignores, no longer ignored), so that no signal
    from inside reaches this process but SIGCHLD, and so that the spares, forked from it, need
    not reset them each: an ignored signal would stay ignored in a command, a caught one is
    reset by the exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # a real-time signal Python does not manage


def become(sock: socket.socket) -> None:
    """In a spare: wait for a request on `sock`, then become its command once the go pipe
    says so. Never returns."""
    step = "set up"
    try:
        signal.set_wakeup_fd(-1)  # the supervisor's: the exec resets its SIGCHLD handler
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setsid()
        top = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        os.closerange(3, sock.fileno())
        os.closerange(sock.fileno() + 1, top)
        _, fds, _ = receive(sock, 8)
        if len(fds) != 5:
            os._exit(EXIT_NOT_STARTED)  # the supervisor has gone, or gave up on this spare
        stdin, stdout, stderr, go, body = fds
        data = b""
        while chunk := os.pread(body, 1 << 20, len(data)):
            data += chunk
        spec = json.loads(data)
        # The received descriptors are all above 2 (0, 1 and 2 are open in this process), so
        # none is overwritten before it is copied.
        for target, fd in enumerate((stdin, stdout, stderr, go)):
            os.dup2(fd, target)
        os.closerange(4, top)
        for name, soft, hard in spec["rlimits"]:
            resource.setrlimit(RLIMITS[name], (soft, hard))
        if os.read(3, 1) != b"g":
            os._exit(EXIT_NOT_STARTED)
        os.close(3)
        step = f"cannot change to {spec['cwd']}"
        os.chdir(spec["cwd"])
        step = f"cannot run {spec['argv'][0]}"
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as exc:  # nothing may return into the supervisor's loop
        try:
            os.write(2, f"wsrunner: {step}: {exc}\n".encode(errors="replace"))
        finally:
            os._exit(EXIT_NOT_STARTED)


class Spare:
    """A process forked before it is needed, so that no request waits for a fork: it has its
    session and default signals already, and waits for its request on a socket of its own."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            become(theirs)
        theirs.close()
        self.sock = ours
        self.pidfd = os.pidfd_open(self.pid)

    def close(self) -> None:
        self.sock.close()
        os.close(self.pidfd)


class Supervisor:
    """The loop: spawn requests from the daemon, exits of the commands."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: dict[int, int] = {}  #: pid -> the command's id
        self.spare: Spare | None = None

    def spawn(self, message: dict[str, Any], fds: list[int]) -> None:
        """Hand the request to the spare and report its pidfd (or why it failed)."""
        ident = message["id"]
        try:
            if message.get("op") != "spawn" or len(fds) != 5:
                raise ValueError(f"expected a spawn request with 5 descriptors, got {message}")
            for attempt in range(2):  # a command may have killed the spare: a fresh one
                spare, self.spare = self.spare or Spare(), None
                try:
                    socket.send_fds(spare.sock, [b"spawn"], fds)
                    break
                except OSError:
                    spare.close()
                    if attempt:
                        raise
            self.children[spare.pid] = ident
            try:
                send(self.sock, {"op": "started", "id": ident}, [spare.pidfd])
            finally:
                spare.close()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            send(self.sock, {"op": "failed", "id": ident, "error": str(exc)})

    def prepare(self) -> None:
        """Fork the spare for the next request; failing that (no process left to fork), the
        request will, and say why."""
        if self.spare is None:
            try:
                self.spare = Spare()
            except OSError:
                return
            send(self.sock, {"op": "spare"}, [self.spare.pidfd])

    def reap(self) -> None:
        """Reap every child that ended: a command's (reported), the spare, or an orphan of a
        command (pid 1's job)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if (ident := self.children.pop(pid, None)) is not None:
                code = os.waitstatus_to_exitcode(status)
                send(self.sock, {"op": "exit", "id": ident, "status": code})
            elif self.spare is not None and pid == self.spare.pid:
                self.spare.close()
                self.spare = None

    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        me = os.pidfd_open(os.getpid())
        send(self.sock, {"op": "ready"}, [me])
        os.close(me)
        self.prepare()
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == wake_r:
                    while True:
                        try:
                            if not os.read(wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                    continue
                data, fds, _ = receive(self.sock, 8, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    return  # the daemon is gone
                try:
                    self.spawn(json.loads(data), fds)
                finally:
                    for received in fds:
                        os.close(received)
                # The next spare, forked only now: it must not inherit this command's
                # descriptors (a command that stopped it would hold another's output open).
                self.prepare()
            self.reap()
            self.prepare()  # in place of a spare that a command killed


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.set_inheritable(False)
    harden()
    try:
        Supervisor(sock).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon is gone: exiting ends the sandbox


if __name__ == "__main__":
    main()
