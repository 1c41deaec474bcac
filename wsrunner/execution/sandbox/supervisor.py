"""The first process of a warm sandbox: forks each command the daemon asks for, reports its exit.

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
              {"op": "started", "id": N} with a pidfd of the command's process
              {"op": "failed", "id": N, "error": "..."} when it could not be forked
              {"op": "exit", "id": N, "status": S} S as os.waitstatus_to_exitcode gives it

A command's process starts a session of its own, sets its rlimits, keeps descriptors 0, 1
and 2 (the socket is closed), and waits for one byte on its go pipe: the daemon moves it into
the command's cgroups first, as root, from the pidfd. EOF on the go pipe means: do not run.
When the daemon's end of the socket closes (the daemon is gone), this process exits, and
with pid 1 gone the kernel kills every process left in the sandbox.
"""

from __future__ import annotations

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


def harden() -> None:
    """Not dumpable (no ptrace, /proc/1/mem, /proc/1/fd or pidfd_getfd by the commands, which
    run as the same uid); Python's SIGINT handler gone, so that no signal from inside reaches
    this process but SIGCHLD."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def child(spec: dict[str, Any], stdin: int, stdout: int, stderr: int, go: int) -> None:
    """In the forked process: become the command once the go pipe says so. Never returns."""
    step = "set up"
    try:
        signal.set_wakeup_fd(-1)
        for sig in signal.valid_signals():  # ignored signals would stay ignored after exec
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass  # a real-time signal Python does not manage
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setsid()
        # The received descriptors are all above 2 (0, 1 and 2 are open in this process), so
        # none is overwritten before it is copied.
        for target, fd in enumerate((stdin, stdout, stderr, go)):
            os.dup2(fd, target)
        os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
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


def spawn(
    sock: socket.socket, message: dict[str, Any], fds: list[int], children: dict[int, int]
) -> None:
    """Fork the command `message` asks for and report its pidfd (or why it failed)."""
    ident = message["id"]
    try:
        if message.get("op") != "spawn" or len(fds) != 5:
            raise ValueError(f"expected a spawn request with 5 descriptors, got {message}")
        stdin, stdout, stderr, go, body = fds
        data = b""
        while chunk := os.pread(body, 1 << 20, len(data)):
            data += chunk
        spec = json.loads(data)
        pid = os.fork()
        if pid == 0:
            child(spec, stdin, stdout, stderr, go)
        children[pid] = ident
        pidfd = os.pidfd_open(pid)
        try:
            send(sock, {"op": "started", "id": ident}, [pidfd])
        finally:
            os.close(pidfd)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        send(sock, {"op": "failed", "id": ident, "error": str(exc)})


def reap(sock: socket.socket, children: dict[int, int]) -> None:
    """Reap every child that ended: a command's (reported), or an orphan of one (pid 1's job)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if (ident := children.pop(pid, None)) is not None:
            send(sock, {"op": "exit", "id": ident, "status": os.waitstatus_to_exitcode(status)})


def serve(sock: socket.socket) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    children: dict[int, int] = {}
    me = os.pidfd_open(os.getpid())
    send(sock, {"op": "ready"}, [me])
    os.close(me)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
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
            else:
                data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 8, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    return  # the daemon is gone
                try:
                    spawn(sock, json.loads(data), fds, children)
                finally:
                    for received in fds:
                        os.close(received)
        reap(sock, children)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.set_inheritable(False)
    harden()
    try:
        serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon is gone: exiting ends the sandbox


if __name__ == "__main__":
    main()
