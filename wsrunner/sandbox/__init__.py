"""The OS sandbox every command and git operation runs in, and what this host can provide.

Levels, from what the start-up probe finds:

    full     bubblewrap: a fresh root with only system directories (read-only) and the one
             workspace (read-write), private /tmp, new pid/ipc/uts/net/user namespaces, no
             capabilities, no nested user namespaces; plus the workspace's own uid when the
             daemon is root, rlimits and a cgroup per command
    partial  no namespaces, but the workspace's own uid (the daemon is root), rlimits and cgroups
    none     nothing of the above; commands run only if the policy says `require: none`

Each command is started through one exec chain, with no `preexec_fn` (unsafe with threads):

    /bin/sh -c '<join the cgroups; set rlimits; cd>' ... -- setpriv <uid> -- bwrap <profile> -- cmd

The shell joins the per-command cgroups while it is still root, so every process of the
command is limited and can be killed, and changes to the command's working directory (the
daemon starts it with posix_spawn, which has no working directory to give); setpriv drops to the workspace's uid; bwrap builds the
sandbox. Killing bwrap ends the sandbox's pid namespace, and the cgroup is emptied afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final, Literal

import trio

from wsrunner.errors import IsolationUnavailableError
from wsrunner.policy import Limits, SandboxPolicy
from wsrunner.sandbox import cgroups
from wsrunner.sandbox.identity import UidRange, volume_reachable

logger = logging.getLogger(__name__)
Level = Literal["full", "partial", "none"]
LEVELS: Final[dict[str, int]] = {"none": 0, "partial": 1, "full": 2}
#: Read-only system paths of the sandbox; the `-try` ones may be missing on a host.
_SYSTEM_RO: Final = ("/usr",)
_SYSTEM_RO_TRY: Final = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf",
                         "/etc/ld.so.conf.d", "/etc/ssl", "/etc/ca-certificates",
                         "/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf", "/etc/localtime",
                         "/etc/host.conf", "/etc/gai.conf", "/etc/ssh/ssh_config",
                         "/etc/ssh/ssh_config.d", "/etc/mime.types", "/etc/python3",
                         "/etc/python3.11", "/etc/xdg")  # fmt: skip
_MERGED_USR: Final = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
# Joins each cgroup given before `--`, sets the rlimits, then becomes the rest of the argv.
# Runs as root (for cgroup.procs); every value comes in as an argument, none is interpolated.
_SETUP: Final = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
    "ulimit -c 0 || exit 125; "
    # CPU: the soft limit sends SIGXCPU (reported as such), the hard one SIGKILL a bit later.
    '[ "$1" = - ] || { ulimit -S -t "$1" && ulimit -H -t "$(($1 + 5))"; } || exit 125; '
    '[ "$2" = - ] || ulimit -f "$2" || exit 125; [ "$3" = - ] || ulimit -n "$3" || exit 125; '
    # The working directory: the spawn has none (posix_spawn), so its shell goes there.
    'cd -P -- "$4" || exit 125; shift 4; '
)
_LAUNCH: Final = _SETUP + 'exec "$@"'
_SHELL: Final = "/bin/sh"
EXIT_LAUNCH_FAILED: Final = 125


@dataclass(frozen=True, slots=True)
class Isolation:
    """What the probe found: the level, one line per layer, and what keeps it below full."""

    level: Level
    layers: dict[str, str]
    missing: tuple[str, ...]
    bwrap: str | None = None
    setpriv: str | None = None
    uids: UidRange | None = None  #: per-workspace uids (the daemon is root), else None
    cgroups: cgroups.CgroupSupport = field(default_factory=cgroups.CgroupSupport)

    def refusal(self, required: str) -> IsolationUnavailableError | None:
        """The error commands get when this host is below the policy's `require`, else None."""
        if LEVELS[self.level] >= LEVELS[required]:
            return None
        return IsolationUnavailableError(required, self.level, self.missing)


def _bwrap_profile(*, network: bool, passwd_fd: int, group_fd: int, tmp_size: int) -> list[str]:
    args = ["--die-with-parent", "--new-session", "--unshare-all", "--unshare-user",
            "--disable-userns", "--cap-drop", "ALL", "--hostname", "wsrunner"]  # fmt: skip
    if network:
        args.append("--share-net")
    for path in _SYSTEM_RO:
        args += ["--ro-bind", path, path]
    for path in _MERGED_USR:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _SYSTEM_RO_TRY:
        args += ["--ro-bind-try", path, path]
    args += ["--ro-bind-data", str(passwd_fd), "/etc/passwd",
             "--ro-bind-data", str(group_fd), "/etc/group",
             "--proc", "/proc", "--dev", "/dev",
             "--size", str(tmp_size), "--tmpfs", "/tmp", "--tmpfs", "/run"]  # fmt: skip
    return args


def _data_fd(text: str) -> int:
    """A pipe's read end holding `text` (small: it fits the pipe buffer)."""
    r, w = os.pipe()
    try:
        os.write(w, text.encode())
    finally:
        os.close(w)
    return r


def turned_off() -> Isolation:
    """No isolation, on purpose (WSRUNNER_SANDBOX=off): commands run as the daemon runs them."""
    why = "turned off (WSRUNNER_SANDBOX=off)"
    return Isolation("none", {"sandbox": why}, (why,))


def probe(volume: str, uid_range: UidRange) -> Isolation:
    """Find the isolation this host offers. Blocks (runs bwrap once): use a thread."""
    layers: dict[str, str] = {}
    missing: list[str] = []
    root = os.geteuid() == 0
    setpriv = shutil.which("setpriv") if root else None
    uids = uid_range if root and setpriv else None
    if uids is not None:
        layers["identity"] = f"per-workspace uids {uids.first}-{uids.last}"
    else:
        why = "the daemon is not root" if not root else "setpriv (util-linux) is not installed"
        layers["identity"] = f"the daemon's own uid ({why})"
        missing.append(f"per-workspace uids: {why}")
    if uids is not None and (blocked := volume_reachable(volume)) is not None:
        layers["identity"] += f"; unusable: {blocked}"
        missing.append(f"per-workspace uids: {blocked}")
        uids = None
    support = cgroups.probe()
    layers["cgroups"] = support.describe()
    if not support.controllers >= {"memory", "pids"}:
        missing.append("cgroups: " + ("; ".join(support.problems) or "no memory/pids controller"))
    layers["rlimits"] = "cpu, fsize, nofile, core"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        layers["bwrap"] = "not installed (apt-get install bubblewrap)"
        missing.append("bubblewrap: not installed (apt-get install bubblewrap)")
    else:
        isolation = Isolation("full", {}, (), bwrap, setpriv, uids, support)
        failure = _try_bwrap(isolation)
        if failure is None:
            layers["bwrap"] = f"{bwrap}: user, pid, net, ipc, uts, mount namespaces"
        else:
            layers["bwrap"] = f"unusable: {failure}"
            missing.append(f"bubblewrap: {failure}")
            bwrap = None
    level: Level = "full" if bwrap else "partial" if uids is not None else "none"
    return Isolation(level, layers, tuple(missing), bwrap, setpriv, uids, support)


def _try_bwrap(isolation: Isolation) -> str | None:
    """Run `true` through the real launch chain; the error bwrap printed, or None."""
    spec = _command_argv(isolation, ["/usr/bin/true"], uid=isolation.uids.first if isolation.uids
                         else None, binds=[], cwd="/", network=False, limits=None,
                         procs=[], fds=[])  # fmt: skip
    try:
        done = subprocess.run(spec, pass_fds=spec.fds, capture_output=True, timeout=20, cwd="/",
                              env={"PATH": "/usr/bin:/bin"}, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        for fd in spec.fds:
            os.close(fd)
    if done.returncode != 0:
        return done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
    return None


class _Argv(list[str]):
    fds: list[int]


def _command_argv(isolation: Isolation, argv: Sequence[str], *, uid: int | None,
                  binds: list[tuple[str, str]], cwd: str, network: bool, limits: Limits | None,
                  procs: list[str], fds: list[int], home: str = "/") -> _Argv:  # fmt: skip
    """The exec chain for `argv`; `binds` are (flag, path) pairs, `fds` collects fds to pass."""
    cpu, fsize, nofile = ("-",) * 3
    if limits is not None:
        cpu, fsize, nofile = (str(limits.cpu_s), str(max(1, limits.file_size_bytes // 512)),
                              str(limits.open_files))  # fmt: skip
    bwrap = isolation.bwrap if isolation.level == "full" else None
    sandboxed = bwrap is not None
    setup = [*procs, "--", cpu, fsize, nofile, "/" if sandboxed else cwd]  # bwrap does --chdir
    if uid is None and not sandboxed and len(argv) == 3 and list(argv[:2]) == [_SHELL, "-c"]:
        # A shell command with nothing to exec in between: the set-up's own shell runs it (one
        # exec of sh fewer). It sees what `sh -c` would: $0 is /bin/sh, no arguments, line 1.
        out = _Argv([_SHELL, "-c", _SETUP + argv[2], _SHELL, *setup])
        out.fds = fds
        return out
    out = _Argv([_SHELL, "-c", _LAUNCH, "wsrunner-launch", *setup])
    if uid is not None:
        assert isolation.setpriv is not None
        out += [isolation.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]  # fmt: skip
    if bwrap is not None:
        shown = uid if uid is not None else os.geteuid()
        passwd = _data_fd(f"wsrunner:x:{shown}:{shown}:wsrunner:{home}:/bin/sh\n")
        group = _data_fd(f"wsrunner:x:{shown}:\n")
        fds += [passwd, group]
        tmp_size = limits.memory_bytes if limits is not None else 256 * 1024**2
        out += [bwrap, *_bwrap_profile(network=network, passwd_fd=passwd,
                                                 group_fd=group, tmp_size=tmp_size)]  # fmt: skip
        for flag, path in binds:
            out += [flag, path, path]
        out += ["--chdir", cwd, "--remount-ro", "/", "--"]
    out += list(argv)
    out.fds = fds
    return out


@dataclass(slots=True)
class Launch:
    """A command ready to start (it changes to its working directory itself): argv, fds to
    pass; `limits_hit` is filled when it ends."""

    argv: list[str]
    pass_fds: tuple[int, ...]
    limits_hit: list[str] = field(default_factory=list)


class Sandbox:
    """Builds the launch of each command from the probe's findings and the policy's settings."""

    def __init__(self, isolation: Isolation) -> None:
        self.isolation = isolation
        self._limiter = trio.CapacityLimiter(8)

    @asynccontextmanager
    async def launch(self, argv: Sequence[str], *, root: str, cwd: str, policy: SandboxPolicy,
                     limits: Limits, network: bool, protect: Sequence[str] = (),
                     pinned: Sequence[str] = (), read_only: Sequence[str] = (),
                     home: str = "/") -> AsyncIterator[Launch]:  # fmt: skip
        """Prepare `argv` to run in the workspace at `root`; clean up its cgroup afterwards.

        `protect` are absolute paths inside the workspace bound read-only, `pinned` directories
        inside it bound read-write onto themselves first (mount points: a command cannot rename
        or remove them; `wsrunner.protect`); `read_only` are host paths made visible read-only
        (besides `policy.read_only_paths`).

        Errors: IsolationUnavailableError when the host is below `policy.require`.
        Cancellation: the cgroup is killed and removed (shielded) before it propagates.
        """
        iso = self.isolation
        if (refused := iso.refusal(policy.require)) is not None:
            raise refused
        group = cgroups.CommandGroup(iso.cgroups, f"cmd-{uuid.uuid4().hex[:12]}")

        def prepare() -> int | None:
            """The workspace's uid (if workspaces have their own) and the command's cgroups:
            one worker thread for both."""
            owner = None if iso.uids is None else os.stat(root).st_uid
            if iso.cgroups.hierarchies and (iso.uids is None or owner in iso.uids):
                group.create(memory=limits.memory_bytes, pids=limits.pids, cpus=limits.cpus)
            return owner

        fds: list[int] = []
        launch: Launch | None = None
        try:
            uid: int | None = None
            if iso.uids is not None or iso.cgroups.hierarchies:
                uid = await trio.to_thread.run_sync(prepare, limiter=self._limiter)
            if iso.uids is not None and uid not in iso.uids:
                raise IsolationUnavailableError(
                    policy.require,
                    iso.level,
                    (f"the workspace {root} is not owned by a workspace uid (owner {uid})",),
                )
            binds = [("--bind", root)]
            binds += [("--bind", p) for p in pinned]  # before the read-only binds inside them
            binds += [("--ro-bind", p) for p in protect]
            binds += [("--ro-bind-try", p) for p in (*policy.read_only_paths, *read_only)]
            spec = _command_argv(iso, argv, uid=uid, binds=binds, cwd=cwd, network=network,
                                 limits=limits, procs=group.procs_files, fds=fds, home=home)  # fmt: skip
            launch = Launch(list(spec), tuple(fds))
            yield launch
        finally:
            for fd in fds:
                os.close(fd)
            if group.dirs:  # no cgroups (none on this host, or none created): nothing to do
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        self._finish, group, launch, limiter=self._limiter
                    )

    @staticmethod
    def _finish(group: cgroups.CommandGroup, launch: Launch | None) -> None:
        """Empty the command's cgroups, note which limits it hit, and remove them."""
        if not group.dirs:
            return
        if not group.kill():
            logger.error("processes of a finished command survived its cgroup kill: %s",
                         ", ".join(group.procs_files))  # fmt: skip
        if launch is not None:
            launch.limits_hit = group.limits_hit()
        group.remove()
