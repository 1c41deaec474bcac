"""Warm sandboxes: a workspace's sandbox is built once and each command is started inside it.

A cold command pays for bubblewrap's namespaces and mounts every time. A warm sandbox is
started once per key (`WarmKey`: the workspace, its uid, the policy's sandbox settings and
the paths bound into it) through the same launch chain and profile, with the supervisor
(`supervisor.py`) as its first process instead of a command. The daemon talks to it over a
socketpair (no name in any file system, held by the supervisor alone). For each command:

    daemon  <-  a spare's pidfd                 supervisor forks a process ahead (a spare)
    daemon      moves the spare into cgroups of its own, with the last command's limits (as
                root, by its host pid), before any command asks for it
    daemon  ->  pipes, a go pipe, the request   supervisor hands them to the spare, which sets
                                                up its rlimits and descriptors and waits on
    daemon  <-  the spare's pidfd               the go pipe
    daemon  ->  the go byte                     it changes directory and executes the command
    daemon  <-  the exit status                 supervisor, when it reaps it

So a command of a busy sandbox starts with no cgroup work of its own on its way: its cgroups
were made and joined while the sandbox waited (`_Ahead`). Where they were not (the first
command, other limits, a spare that died), the command makes and joins its own, as before it
starts. Its cgroups are removed after its result (`WarmPool.later`).

The command's output is read by `process._pump`, as a cold command's, into the same capped
`Capture`. When the command ends, is timed out or cancelled, its cgroups are killed and seen
empty (`CommandGroup.kill`), so nothing it started outlives it, as a cold sandbox's pid
namespace would not. A supervisor that dies, stops answering or breaks the protocol ends its
sandbox: the commands in it fail with that reason, and the next command gets a new sandbox.

Which sandboxes live, and for how long, is `warm_pool.WarmPool`'s.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import platform
import resource
import select
import signal
import socket
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from wsrunner.execution.process import PIPE_BYTES, Capture, Watch, _Child, _pump
from wsrunner.execution.sandbox.cgroups import CommandGroup, read
from wsrunner.execution.sandbox.supervisor import receive
from wsrunner.policy import Limits, SandboxPolicy

logger = logging.getLogger(__name__)

SUPERVISOR: Final = Path(__file__).with_name("supervisor.py").read_text()
PYTHON: Final = "/usr/bin/python3"  #: the sandbox's own interpreter, not the daemon's venv
SUPERVISOR_ENV: Final = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
#: The limits of the cgroups the supervisor, its spare and each command's process until it is
#: moved out live in: the supervisor's needs, whatever a policy gives commands.
SUPERVISOR_MEMORY: Final = 256 * 1024**2
SUPERVISOR_PIDS: Final = 64
#: Its CPU bandwidth: the supervisor handles SIGCHLD, which any command of the workspace may
#: send it as fast as it likes; without a bound each signal's wake-up is CPU that no command's
#: limit counts (a review's flood from a command took a whole CPU beside the command's own).
#: Its own work is about 0.8 ms of CPU a command (most of it forking the next spare), so a
#: quarter of a CPU throttled a sandbox running 300 short commands a second in every period
#: (`bench/sandbox_overhead.py`: a third of the time, and a p95 of 32 ms); 0.4 did not.
SUPERVISOR_CPUS: Final = 0.4
START_S: Final = 20.0  #: a new sandbox reports ready within this, or is given up
STARTS: Final = 3  #: processes a command is tried with, when those before it were killed
TIDY_S: Final = 1.0  #: ended commands' cgroups wait this long for a spare's making, at most
REPLY_S: Final = 10.0  #: the supervisor answers a spawn request within this
EXIT_REPORT_S: Final = 10.0  #: ... and reports an exit within this after the process ended
EXIT_NOT_STARTED: Final = 125
STOPPED: Final = "the warm sandbox was stopped"  #: why it ended, when nothing else said
_BATCH: Final = 64  #: messages applied per wake-up, at most
_STDERR_KEPT: Final = 4096


class WarmFailure(Exception):
    """The warm sandbox could not start or finish the command; the message says why."""


class NotStarted(WarmFailure):
    """The process forked for the command ended before it was let go (a command of the
    workspace killed it): nothing of the command ran, and another process may run it."""


ENDED: Final = "the command's process ended before it started"


@dataclass(frozen=True, slots=True)
class WarmKey:
    """What makes two commands share a sandbox: all of it is fixed when the sandbox starts."""

    root: str
    root_id: tuple[int, int]  #: (device, inode): a workspace made again is another sandbox
    uid: int | None
    policy: SandboxPolicy
    memory: int  #: the size of its /tmp
    open_files: int  #: at most (the supervisor's hard limit is this, or more)
    binds: tuple[tuple[str, str, int, int], ...]  #: (flag, path, device, inode) of each bind


@dataclass(eq=False, slots=True)
class _Pending:
    """One command's exchange with the supervisor, filled in by the sandbox's reader."""

    started: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    pidfd: int = -1
    error: str | None = None
    status: int | None = None
    ahead: _Ahead | None = None  #: the spare it got, if the daemon had made it ready ahead


@dataclass(eq=False, slots=True)
class _Ahead:
    """A spare the daemon moved into cgroups of its own before any command asked for it, made
    with the limits of the sandbox's last command. `done` once tried: `ready` says whether it
    is in them; a command that gets another process, or has other limits, makes its own."""

    pid: int
    pidfd: int
    limits: Limits
    group: CommandGroup
    done: trio.Event = field(default_factory=trio.Event)
    ready: bool = False

    def discard(self) -> None:
        """In a worker thread: kill its spare, remove its cgroups."""
        self.group.kill()
        self.group.remove()
        os.close(self.pidfd)


_CHANGED: Final = "a command changed its supervisor's limits or scheduling"


def _shape(limits: Limits) -> tuple[int, int, float | None]:
    """What a command's cgroups are made with. Its other limits are not theirs: its process
    sets its rlimits itself (`rlimits`: the file size follows the workspace's quota room),
    the daemon applies its timeout and output caps."""
    return limits.memory_bytes, limits.pids, limits.cpus


def _remove(groups: list[CommandGroup]) -> None:
    """In a worker thread: check ended commands' cgroups empty (killing what is left) and
    remove them."""
    for group in groups:
        if not group.kill():
            logger.error("processes survived a cgroup kill: %s", ", ".join(group.procs_files))
        group.remove()


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What vetting a process found (`WarmSandbox.vet`, in a worker thread), applied on the
    event loop: why it may not run a command; whether that ends the sandbox (a supervisor that
    lied), or why the sandbox should start no more commands."""

    problem: str | None
    fails: bool = False
    worn: str | None = None

    def apply(self, sandbox: WarmSandbox) -> None:
        if self.worn is not None:
            sandbox.wear(self.worn)
        if self.fails and self.problem is not None:
            sandbox.fail(self.problem)


def _pid_of(pidfd: int) -> int:
    """The host pid of the process a pidfd refers to; -1 once it has exited."""
    with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise WarmFailure("this kernel shows no Pid in a pidfd's fdinfo")


#: The daemon's own hard limits: the supervisor inherits them, so no command may ask for more.
_HARD: Final = {
    name: resource.getrlimit(res)[1]
    for name, res in (("cpu", resource.RLIMIT_CPU), ("fsize", resource.RLIMIT_FSIZE))
}


def rlimits(limits: Limits) -> list[tuple[str, int, int]]:
    """The rlimits the cold chain's shell sets (`_SETUP`), as (name, soft, hard)."""
    out = [("core", 0, 0)]
    for name, soft, hard in (
        ("cpu", limits.cpu_s, limits.cpu_s + 5),
        ("fsize", max(1, limits.file_size_bytes // 512) * 512, None),
    ):
        top = _HARD[name]
        hard = soft if hard is None else hard
        if top != resource.RLIM_INFINITY:
            soft, hard = min(soft, top), min(hard, top)
        out.append((name, soft, hard))
    out.append(("nofile", limits.open_files, limits.open_files))
    return out


class WarmSandbox:
    """One live sandbox: the launch chain's process (the daemon's child), the socket to its
    supervisor, and the commands in flight. `serve` owns it from start to end."""

    def __init__(
        self,
        key: WarmKey,
        group: CommandGroup,
        pid: int,
        sock: socket.socket,
        stderr: int,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.key = key
        self.group = group  #: the supervisor's own cgroups (its forks start there)
        self.limiter = limiter  #: for the cgroup work of its spares (worker threads)
        self.pid = pid
        self.sock = sock
        self.stderr = stderr
        self.pidfd = os.pidfd_open(pid)
        self.supervisor_pid = -1  #: host pid, once ready
        self.failure: str | None = None  #: why it ended (or is ending)
        #: why it should start no more commands (the pool replaces it, and stops it once idle)
        self.worn: str | None = None
        self.kept = 0  #: bytes its ended commands left charged to their cgroups (`_kept`)
        self.stopped_as: str | None = None  #: why its pool stopped it (`WarmPool.stops`)
        #: its commands by how they started (`WarmPool.commands`: the pool's, once it has it)
        self.commands: Counter[str] = Counter()
        #: what the supervisor's forks inherit from it (`_inherited`), as it started
        self.inherited: list[str] = []
        self.active = 0
        self.last_used = trio.current_time()
        self.settled = trio.Event()  #: ready, or ended before it was
        self.ended = trio.Event()
        self._ready = False
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._scope = trio.CancelScope()
        self._errors = bytearray()
        #: the limits of its last command, which the next spare's cgroups are made with
        self.limits: Limits | None = None
        self._announced = -1  #: pidfd of the newest spare, until it is made ready
        self._announce = trio.Event()
        #: whether a command started since the last spare was made ready: one is made ready
        #: for each, so that a command killing spares costs no cgroups of the daemon's
        self._wanted = False
        self._ahead: _Ahead | None = None  #: the spare made ready, or being made ready
        self._stale: list[_Ahead] = []  #: spares made ready that no command will use
        self._emptied: list[CommandGroup] = []  #: ended commands' cgroups, to remove
        self._closed = False  #: it takes no more cgroups to remove
        self._waiting = trio.CancelScope()  #: `_keep_ahead`'s wait for the next spare

    @classmethod
    def spawn(
        cls,
        key: WarmKey,
        group: CommandGroup,
        chain: Callable[[int], tuple[list[str], dict[str, str], list[int]]],
        limiter: trio.CapacityLimiter,
    ) -> WarmSandbox:
        """Start the launch chain `chain(socket fd)` gives (argv, env, descriptors to pass and
        close). From the event loop's thread: bubblewrap's --die-with-parent follows the
        thread that started it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        err_r, err_w = os.pipe()
        fds: list[int] = []
        try:
            argv, env, fds = chain(theirs.fileno())
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
                *((os.POSIX_SPAWN_DUP2, fd, fd) for fd in (*fds, theirs.fileno())),
            ]
            pid = os.posix_spawn(
                argv[0],
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except BaseException:
            ours.close()
            os.close(err_r)
            raise
        finally:
            theirs.close()
            os.close(err_w)
            for fd in fds:
                os.close(fd)
        ours.setblocking(False)
        os.set_blocking(err_r, False)
        try:
            return cls(key, group, pid, ours, err_r, limiter)
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            ours.close()
            os.close(err_r)
            raise

    @property
    def usable(self) -> bool:
        return self.failure is None

    def fail(self, reason: str) -> None:
        """End the sandbox (from any task): its commands fail with `reason`."""
        if self.failure is None and self._ready:
            logger.warning("the warm sandbox of %s failed: %s", self.key.root, reason)
        self.stop(reason)

    def stop(self, reason: str) -> None:
        """End the sandbox (from any task), for `reason`; `serve` cleans up."""
        self.failure = self.failure or reason
        self._scope.cancel()

    def wear(self, reason: str) -> None:
        """Let it start no more commands, for `reason`: the pool gives the next command a new
        sandbox, and stops this one once its commands have ended."""
        if self.worn is None and self.failure is None:
            logger.info("the warm sandbox of %s is replaced: %s", self.key.root, reason)
        self.worn = self.worn or reason

    def keep(self, size: int) -> None:
        """Count what an ended command left in the sandbox (`_kept`). Files in its own mounts
        (/tmp, /run, /dev/shm), shared memory segments and message queues outlive the command
        and its cgroups, charged to no limit of anyone's; past the memory limit (the size of
        its /tmp), the sandbox is replaced, which frees them."""
        self.kept += size
        if self.kept > self.key.memory:
            mib = 1024**2
            self.wear(
                f"its commands left {self.kept // mib} MiB in it (files outside the workspace, "
                f"shared memory), more than the memory limit of {self.key.memory // mib} MiB"
            )

    # --- the reader ---------------------------------------------------------------------------

    async def serve(self, forget: Callable[[WarmSandbox], None]) -> None:
        """Read the supervisor's messages until the sandbox ends; then kill what is left of it
        (shielded), fail the commands still waiting, and `forget` it."""
        ready = select.epoll(3)
        for fd in (self.sock.fileno(), self.pidfd, self.stderr):
            ready.register(fd, select.EPOLLIN)
        try:
            with self._scope:
                with trio.move_on_after(START_S) as starting:
                    while not self._ready and self.failure is None:
                        await self._step(ready)
                if starting.cancelled_caught:
                    self.fail(f"it did not start within {START_S:g}s")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_ahead)
                    while self.failure is None:
                        await self._step(ready)
                    nursery.cancel_scope.cancel()
        finally:
            self.failure = self.failure or STOPPED
            self._closed = True
            for pending in self._pending.values():
                pending.error = pending.error or self.failure
                pending.started.set()
                pending.exited.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._destroy)
            ready.close()
            self.settled.set()
            self.ended.set()
            forget(self)

    async def _step(self, ready: select.epoll) -> None:
        await trio.lowlevel.wait_readable(ready.fileno())
        for fd, _ in ready.poll(0):
            if fd == self.stderr:
                self._read_errors(ready)
            elif fd == self.pidfd:
                self.fail("its supervisor exited" + self._error_tail())
            else:
                self._receive()

    def _read_errors(self, ready: select.epoll) -> None:
        try:
            chunk = os.read(self.stderr, _STDERR_KEPT)
        except BlockingIOError:
            return
        if not chunk:
            ready.unregister(self.stderr)
        self._errors = (self._errors + chunk)[-_STDERR_KEPT:]

    def _error_tail(self) -> str:
        lines = self._errors.decode(errors="replace").strip().splitlines()
        return f": {lines[-1]}" if lines else ""

    def _receive(self) -> None:
        """Apply what the supervisor sent, up to a batch: the loop is not its to hold."""
        for _ in range(_BATCH):
            if self.failure is not None:
                return
            try:
                data, fds, flags = receive(
                    self.sock, 2, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(f"its socket failed: {exc}")
                return
            if not data and not fds:
                self.fail("its supervisor exited" + self._error_tail())  # the socket's only holder
                return
            why = "truncated" if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) else None
            try:
                why = why or self._handle(json.loads(data), fds)
            except (ValueError, TypeError, KeyError, OSError, WarmFailure) as exc:
                why = str(exc)
            if why is not None:
                for fd in fds:
                    os.close(fd)
                self.fail(f"protocol violation by its supervisor: {why}")

    def _handle(self, message: dict[str, Any], fds: list[int]) -> str | None:
        """Apply one message of the supervisor's; why it is not a valid one, or None. The
        supervisor runs as the tenant, so nothing it says is taken on trust: an unexpected
        message ends the sandbox."""
        op, ident = message["op"], message.get("id")
        if op == "ready" and len(fds) == 1 and not self._ready:
            self.supervisor_pid = _pid_of(fds[0])
            os.close(fds[0])
            self.inherited = _inherited(self.supervisor_pid)  # before any command ran
            self._ready = True
            self.settled.set()
            return None
        if op == "spare" and len(fds) == 1 and self._ready:
            if self._announced >= 0:  # never made ready: a newer spare replaced it
                os.close(self._announced)
            self._announced = fds[0]
            self._announce.set()
            return None
        if not isinstance(ident, int) or not 0 <= ident < self._next_id:
            return f"unexpected message {str(message)[:200]}"
        if (pending := self._pending.get(ident)) is None:
            for fd in fds:  # its command gave up waiting: only the descriptor to close
                os.close(fd)
            return None
        if op == "started" and len(fds) == 1 and not pending.started.is_set():
            pending.pidfd = fds[0]
            self._claim(pending)
        elif op == "failed" and not fds and not pending.started.is_set():
            pending.error = str(message.get("error"))[:500]
        elif op == "exit" and not fds and pending.started.is_set() and not pending.exited.is_set():
            if not isinstance(status := message.get("status"), int):
                return f"exit status {status!r}"
            pending.status = status
            pending.exited.set()
            return None
        else:
            return f"unexpected message {str(message)[:200]}"
        pending.started.set()
        return None

    def _claim(self, pending: _Pending) -> None:
        """Give the command the spare it got, if that one was made ready ahead (or is being
        made ready); a spare a command got is never made ready for another."""
        pid = _pid_of(pending.pidfd)
        if self._announced >= 0 and _pid_of(self._announced) == pid:
            os.close(self._announced)
            self._announced = -1
        ahead = self._ahead
        if pid > 0 and ahead is not None and _pid_of(ahead.pidfd) == pid:
            pending.ahead, self._ahead = ahead, None

    def remove_later(self, group: CommandGroup) -> bool:
        """Take an ended command's emptied cgroups to remove with the next spare's making (one
        worker thread for both), or within TIDY_S; False once the sandbox is ending."""
        if self._closed:
            return False
        self._emptied.append(group)
        due = trio.current_time() + TIDY_S
        self._waiting.deadline = min(self._waiting.deadline, due)
        return True

    async def _keep_ahead(self) -> None:
        """Make each new spare ready for the next command, in cgroups of its own with the last
        command's limits (none before the first command: their limits are not known), and
        remove the cgroups no command will use any more."""
        while True:
            with trio.CancelScope() as self._waiting:
                if self._emptied or self._stale:
                    self._waiting.deadline = trio.current_time() + TIDY_S
                await self._announce.wait()
            self._announce = trio.Event()
            ahead = None
            if (
                self._wanted
                and self.limits is not None
                and self._announced >= 0
                and self.worn is None
            ):
                pidfd, self._announced, self._wanted = self._announced, -1, False
                if self._ahead is not None:
                    self.discard_later(self._ahead)
                self._ahead = None
                group = CommandGroup(self.group.support, f"cmd-{uuid.uuid4().hex[:12]}")
                try:
                    pid = _pid_of(pidfd)
                except WarmFailure as exc:  # a kernel that does not say: no sandbox works
                    os.close(pidfd)
                    self.fail(str(exc))
                    return
                ahead = self._ahead = _Ahead(pid, pidfd, self.limits, group)
            elif not (self._emptied or self._stale):
                continue
            stale, self._stale, emptied, self._emptied = self._stale, [], self._emptied, []
            with trio.CancelScope(shield=True):  # bounded work, and nothing may leak
                verdict = await trio.to_thread.run_sync(
                    self._make_ready, ahead, stale, emptied, limiter=self.limiter
                )
            if ahead is not None:
                ahead.ready = verdict.problem is None
                ahead.done.set()
            verdict.apply(self)

    def _make_ready(
        self, ahead: _Ahead | None, stale: list[_Ahead], emptied: list[CommandGroup]
    ) -> _Verdict:
        """In a worker thread: remove the `emptied` cgroups and discard the `stale` spares;
        then the cgroups of `ahead`, made, and its spare in them once it is vetted (else the
        cgroups removed)."""
        _remove(emptied)
        for old in stale:
            old.discard()
        if ahead is None:
            return _Verdict(None)
        limits = ahead.limits
        try:
            ahead.group.create(memory=limits.memory_bytes, pids=limits.pids, cpus=limits.cpus)
        except OSError as exc:
            ahead.group.remove()
            return _Verdict(f"cgroups could not be made: {exc}")
        verdict = self.vet(ahead.pid, ahead.pidfd, ahead.group, self.group)
        if verdict.problem is not None:
            ahead.group.kill()
            ahead.group.remove()
        return verdict

    def vet(self, pid: int, pidfd: int, group: CommandGroup, source: CommandGroup) -> _Verdict:
        """In a worker thread: check that `pid` (`pidfd`'s) is a fresh fork of the
        supervisor's (its child, still in `source`: the sandbox's own cgroup, or those it was
        made ready in) with what it inherits unchanged, and move it into `group`."""
        if pid <= 0:
            return _Verdict(ENDED)
        status = read(f"/proc/{pid}/status")
        parent = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")), "")
        first = source.procs_files[0]
        if parent != str(self.supervisor_pid) or str(pid) not in read(first).split():
            if not status or select.select([pidfd], [], [], 0)[0]:
                return _Verdict(ENDED)
            why = f"its supervisor named process {pid}, not a fork of its own"
            return _Verdict(why, fails=True)
        # A command runs as the supervisor's uid, so it may have changed the supervisor's
        # limits (prlimit) or scheduling (nice, SCHED_IDLE, CPU affinity), which every later
        # fork would inherit: another task's commands would run with them. Such a sandbox is
        # replaced; a process that has them never runs.
        worn = None
        if _inherited(self.supervisor_pid) != self.inherited:
            worn = _CHANGED
        if not (inherited := _inherited(pid, pidfd)):
            return _Verdict(ENDED, worn=worn)
        if inherited != self.inherited:
            return _Verdict("its process's limits were changed by another command", worn=_CHANGED)
        try:
            for path in group.procs_files:
                with open(path, "w", encoding="ascii") as f:
                    f.write(str(pid))
        except OSError as exc:
            why = f"the command's process could not join its cgroup: {exc}"
            return _Verdict(why, worn=worn)
        if select.select([pidfd], [], [], 0)[0]:
            return _Verdict(ENDED, worn=worn)
        return _Verdict(None, worn=worn)

    def _destroy(self) -> None:
        """Kill the sandbox (its launch process first: --die-with-parent takes the supervisor,
        whose end as pid 1 takes every process in the sandbox), reap it, free its cgroups."""
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it has exited already
        if not self.group.kill():
            logger.error(
                "processes of a warm sandbox survived its cgroup kill: %s",
                ", ".join(self.group.procs_files),
            )
        os.waitpid(self.pid, 0)
        self.group.remove()
        _remove(self._emptied)
        for ahead in [*self._stale, *([self._ahead] if self._ahead else [])]:
            ahead.discard()  # its spare died with the sandbox's pid 1
        if self._announced >= 0:
            os.close(self._announced)
        self.sock.close()
        os.close(self.pidfd)
        os.close(self.stderr)

    # --- commands -----------------------------------------------------------------------------

    async def request(self, fds: list[int]) -> tuple[int, _Pending]:
        """Send a spawn request with `fds`; its id and where its answers will be."""
        if self.failure is not None:
            raise WarmFailure(self.failure)
        ident = self._next_id
        self._next_id += 1
        self._pending[ident] = pending = _Pending()
        message = [json.dumps({"op": "spawn", "id": ident}).encode()]
        while True:
            try:
                socket.send_fds(self.sock, message, fds, socket.MSG_DONTWAIT)
                return ident, pending
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
            except OSError as exc:
                del self._pending[ident]
                self.fail(f"its socket failed: {exc}")
                raise WarmFailure(self.failure or str(exc)) from None

    def discard_later(self, ahead: _Ahead) -> None:
        """`ahead` will not be used: its cgroups are removed with the next spare's making, or
        as the sandbox ends."""
        self._stale.append(ahead)

    def expect(self, limits: Limits) -> None:
        """Make its next spare ready for commands with `limits` (those of its last command)."""
        if self.limits is None or _shape(self.limits) != _shape(limits):
            self.limits = limits
        self._wanted = True
        self._announce.set()

    def forget(self, ident: int) -> None:
        """The command `ident` is over: drop its exchange (and a pidfd nobody took)."""
        pending = self._pending.pop(ident, None)
        if pending is not None and pending.pidfd >= 0:
            os.close(pending.pidfd)
            pending.pidfd = -1
        if pending is not None and pending.ahead is not None:
            self.discard_later(pending.ahead)
            pending.ahead = None


class _WarmChild(_Child):
    """A command in a warm sandbox, as `process._pump` reads it: its pipes, its pidfd (the
    exit, seen from the host) and its exit status (from the supervisor)."""

    def __init__(
        self, pid: int, pidfd: int, pipes: dict[int, str], pending: _Pending, command: WarmCommand
    ) -> None:
        self.pid = pid  #: host pid, and the group id of its session
        self.pidfd = pidfd
        self.returncode: int | None = None
        self.pipes = pipes
        self.failure: str | None = None
        self._pending = pending
        self._command = command
        self.ready = select.epoll(3)
        for fd in (*pipes, pidfd):
            self.ready.register(fd, select.EPOLLIN)

    def poll(self) -> int | None:
        return self.returncode

    async def wait(self) -> int:
        """The exit status, once the supervisor reports it; then the command's cgroups are
        emptied: what it left running ends with it (and releases its pipes)."""
        if self.returncode is not None:
            return self.returncode
        pending, sandbox = self._pending, self._command.sandbox
        if not pending.exited.is_set():
            with trio.move_on_after(EXIT_REPORT_S):
                await pending.exited.wait()
            if not pending.exited.is_set():
                sandbox.fail(f"its supervisor did not report an exit within {EXIT_REPORT_S:g}s")
                await pending.exited.wait()  # set as the sandbox ends
        if pending.status is None:
            self.failure = pending.error or sandbox.failure or "the warm sandbox ended"
        if self._command.occupied():
            await trio.to_thread.run_sync(self._command.group.kill, limiter=self._command.limiter)
        self.returncode = -signal.SIGKILL if pending.status is None else pending.status
        return self.returncode


@dataclass(slots=True)
class WarmCommand:
    """One command to run in `sandbox`, in its own cgroups (`group`, made by the launch)."""

    sandbox: WarmSandbox
    argv: list[str]
    env: dict[str, str]  #: exactly the command's environment
    cwd: str
    limits: Limits
    group: CommandGroup
    limiter: trio.CapacityLimiter
    failures: list[str] = field(default_factory=list)  #: why the sandbox failed it

    async def run(
        self, capture: Capture, kill_grace: float, watch: Watch | None, watch_after: float
    ) -> int:
        """Run the command to its end, as `process.run_process` would; its exit status.

        Cancellation: its cgroups are killed and its exit awaited (shielded) first.
        """
        try:
            child = await self._start_any()
        except WarmFailure as exc:
            self.failures.append(str(exc))
            return EXIT_NOT_STARTED
        except OSError as exc:  # out of descriptors, say: the command did not start
            self.failures.append(f"the command could not be started: {exc}")
            return EXIT_NOT_STARTED
        try:
            await _pump(child, capture, kill_grace, watch, watch_after)
        finally:
            with trio.CancelScope(shield=True):
                if child.returncode is None:  # timed out, cancelled, or stopped by `watch`
                    await trio.to_thread.run_sync(self.group.kill, limiter=self.limiter)
                    await child.wait()
            child.close()
            self.sandbox.keep(_kept(self.group))  # its cgroups are empty now
        if child.failure is not None:
            self.failures.append(child.failure)
        assert child.returncode is not None
        return child.returncode

    def occupied(self) -> bool:
        """Whether a process is left in the command's cgroups (every process of the command is
        in each of them: one list is enough). Read on the event loop, as the pipes are: a
        short list the kernel makes, no disk."""
        return bool(read(self.group.procs_files[0]).strip())

    def _request(self) -> bytes:
        return json.dumps(
            {"argv": self.argv, "env": self.env, "cwd": self.cwd, "rlimits": rlimits(self.limits)}
        ).encode()

    async def _start_any(self) -> _WarmChild:
        """`_start`, tried again with another process while the one forked for the command was
        killed before it was let go (by a command of the workspace), STARTS times at most."""
        for _ in range(STARTS - 1):
            try:
                return await self._start()
            except NotStarted:
                pass
        return await self._start()

    async def _start(self) -> _WarmChild:
        """Have the supervisor fork the command, move it into its cgroups, let it go."""
        sandbox = self.sandbox
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        go_r, go_w = os.pipe()
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # over fs.pipe-max-size: the default
                pass
        body = os.memfd_create("wsrunner-spawn")
        given = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), out_w, err_w, go_r, body]
        ident = -1
        try:
            os.write(body, self._request())
            ident, pending = await sandbox.request(given)
            for fd in given:  # the supervisor has its own copies now
                os.close(fd)
            given = []
            with trio.move_on_after(REPLY_S):
                await pending.started.wait()
            if not pending.started.is_set():
                sandbox.fail(f"its supervisor did not answer within {REPLY_S:g}s")
                raise WarmFailure(sandbox.failure)
            if pending.error is not None:
                # Its supervisor cannot fork (a command may have lowered its limits): the next
                # command gets a new sandbox instead of this answer again.
                sandbox.wear(f"its supervisor could not start a command: {pending.error}")
                raise WarmFailure(f"the command could not be started: {pending.error}")
            pidfd, pending.pidfd = pending.pidfd, -1
            try:
                pid = await self._join(pidfd, pending)
                try:
                    os.write(go_w, b"g")
                except BrokenPipeError:
                    raise NotStarted(ENDED) from None
                try:  # forked ahead, it waited where the workspace's commands could stop it
                    signal.pidfd_send_signal(pidfd, signal.SIGCONT)
                except ProcessLookupError:
                    pass  # it ended already: its exit is reported as any other
            except BaseException:
                os.close(pidfd)
                raise
            return _WarmChild(pid, pidfd, {out_r: "stdout", err_r: "stderr"}, pending, self)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            if ident >= 0:
                sandbox.forget(ident)
            raise
        finally:
            os.close(go_w)  # EOF before the go byte: the forked process exits, unstarted
            for fd in given:
                os.close(fd)

    async def _join(self, pidfd: int, pending: _Pending) -> int:
        """Have the command's process (`pidfd`'s) in the command's cgroups: those it was made
        ready in (`pending.ahead`), or new ones; its host pid."""
        sandbox = self.sandbox
        sandbox.expect(self.limits)
        ahead, pending.ahead = pending.ahead, None
        if ahead is not None:
            try:
                await ahead.done.wait()
            except BaseException:
                sandbox.discard_later(ahead)
                raise
            if ahead.ready and _shape(ahead.limits) == _shape(self.limits) and not self.group.dirs:
                self.group.dirs, ahead.group.dirs = ahead.group.dirs, []
                os.close(ahead.pidfd)
                # What the supervisor's forks inherit was checked as it was made ready; a
                # command may have changed it since. Read on the event loop, as `occupied`.
                if str(ahead.pid) not in read(self.group.procs_files[0]).split():
                    raise NotStarted(ENDED)
                if not (inherited := _inherited(ahead.pid, pidfd)):
                    raise NotStarted(ENDED)
                if inherited != sandbox.inherited:
                    sandbox.wear(_CHANGED)
                    raise WarmFailure("its process's limits were changed by another command")
                sandbox.commands["ahead"] += 1
                return ahead.pid
        with trio.CancelScope(shield=True):  # bounded work, and `ahead` must not leak
            pid, verdict = await trio.to_thread.run_sync(
                self._adopt, pidfd, ahead, limiter=self.limiter
            )
        verdict.apply(sandbox)
        if verdict.problem == ENDED:
            raise NotStarted(ENDED)
        if verdict.problem is not None:
            raise WarmFailure(sandbox.failure if verdict.fails else verdict.problem)
        sandbox.commands["joined"] += 1
        return pid

    def _adopt(self, pidfd: int, ahead: _Ahead | None) -> tuple[int, _Verdict]:
        """In a worker thread: the command's cgroups made, its process vetted and moved into
        them (`WarmSandbox.vet`), out of those it was made ready in with other limits, if it
        was (which are then removed): never back by a pid that may have been reused since."""
        sandbox = self.sandbox
        try:
            pid = _pid_of(pidfd)
            if not self.group.dirs:
                limits = self.limits
                self.group.create(memory=limits.memory_bytes, pids=limits.pids, cpus=limits.cpus)
            source = ahead.group if ahead is not None and ahead.ready else sandbox.group
            return pid, sandbox.vet(pid, pidfd, self.group, source)
        finally:
            if ahead is not None:
                ahead.discard()


_PINNED: Final = 1024**2  #: what a command that left shared memory counts for, at least (`_kept`)
#: The limits each command sets itself (`rlimits`), unlike the rest of /proc/PID/limits.
_SET_PER_COMMAND: Final = ("Max cpu time", "Max file size", "Max open files", "Max core file size")


#: ioprio_get(2), which Python does not wrap, on the architectures whose number is known.
_IOPRIO_GET: Final = {"x86_64": 252, "aarch64": 31}.get(platform.machine())
_libc: Final = ctypes.CDLL(None, use_errno=True)


def _inherited(pid: int, pidfd: int | None = None) -> list[str]:
    """What a command inherits from the supervisor and another process of the same uid may
    change: the lines of /proc/PID/limits (but the header and those each command sets), the
    nice value, scheduling policy and priority, the CPUs allowed and the I/O priority.
    Empty once the process has gone: by the last read, if its `pidfd` is given (a process
    that dies between two reads is not one whose limits were changed)."""
    lines = read(f"/proc/{pid}/limits").splitlines()[1:]
    out = [line for line in lines if not line.startswith(_SET_PER_COMMAND)]
    stat = read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    if len(stat) > 38:  # fields 19 (nice), 40 (rt_priority), 41 (policy)
        out.append(f"nice {stat[16]} priority {stat[37]} policy {stat[38]}")
    status = read(f"/proc/{pid}/status").splitlines()
    out += [line for line in status if line.startswith("Cpus_allowed_list:")]
    if _IOPRIO_GET is not None:
        out.append(f"ioprio {_libc.syscall(_IOPRIO_GET, 1, pid)}")  # IOPRIO_WHO_PROCESS
    if not lines or (pidfd is not None and select.select([pidfd], [], [], 0)[0]):
        return []
    return out


def _kept(group: CommandGroup) -> int:
    """The memory still charged to a command's emptied cgroups: shared memory (files in the
    sandbox's tmpfs mounts, SysV and POSIX shared memory) and kernel memory (their inodes,
    message queues; v1 counts all of it, reclaimable caches included), which a warm sandbox
    keeps after the command. Read on the event loop, as `occupied`: small files the kernel
    makes.

    Shared memory left behind also keeps the removed cgroup's own kernel structures alive
    until the sandbox ends (a page of /tmp is enough; tens of KiB each, more with more
    CPUs), so such a command counts for at least `_PINNED`: a sandbox is replaced after a
    bounded number of them, however little each left."""
    total = shared = 0
    for hierarchy, path in group.dirs:
        if "memory" not in hierarchy.controllers:
            continue
        stat = dict(line.split() for line in read(f"{path}/memory.stat").splitlines())
        shared += int(stat.get("shmem", 0))
        if hierarchy.kind == "v2":
            total += int(stat.get("slab_unreclaimable", 0))
        else:
            total += int(read(f"{path}/memory.kmem.usage_in_bytes").strip() or 0)
    return max(total + shared, _PINNED) if shared else total + shared
