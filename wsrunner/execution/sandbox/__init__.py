"""The OS sandbox every command and git operation runs in, and what this host can provide.

Levels, from what the start-up probe finds:

    full     bubblewrap: a fresh root with only system directories (read-only) and the one
             workspace (read-write), private /tmp, new pid/ipc/uts/net/user namespaces, no
             capabilities, no nested user namespaces, a seccomp filter; plus the workspace's
             own uid when the daemon is root, rlimits and a cgroup per command
    partial  no namespaces, but the workspace's own uid (the daemon is root), rlimits and cgroups
    none     nothing of the above; commands run only if the policy says `require: none`

Each command is started through one exec chain, with no `preexec_fn` (unsafe with threads):

    /bin/sh -c '<join the cgroups; set rlimits; cd>' ... -- setpriv <uid> -- bwrap --args FD -- cmd

The shell joins the per-command cgroups while it is still root, so every process of the
command is limited and can be killed, and changes to the command's working directory (the
daemon starts it with posix_spawn, which has no working directory to give); setpriv drops to
the workspace's uid; bwrap builds the sandbox. Killing bwrap ends the sandbox's pid namespace,
and the cgroup is emptied afterwards.

Nothing the tenant chose reaches the part of the chain that runs with more privilege than the
sandbox: the shell, setpriv and bwrap get a fixed environment (`LAUNCH_ENV`); the task's
variables are set by bwrap itself (`--clearenv`, `--setenv`) from its argument file, a memfd,
so no value appears on a command line either. Without bubblewrap, a small unprivileged step
after setpriv reads them from such a file and executes the command with exactly them. The
command holds descriptors 0, 1 and 2 only: bwrap closes its argument, data and seccomp files
before it executes the command.

A command that may (`launch(warm=True)`, the network `none`) starts instead in its workspace's
warm sandbox (`warm.py`), built once through this same chain with a supervisor as its pid 1;
`serve_warm` keeps them (`warm_pool.py`).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Final, Literal

import trio

from wsrunner.errors import IsolationUnavailableError, WorkspaceError
from wsrunner.execution.process import Capture, Watch, run_process
from wsrunner.execution.sandbox import cgroups, seccomp
from wsrunner.execution.sandbox.identity import UidRange, volume_reachable
from wsrunner.execution.sandbox.network import RESOLV_CONF, Egress, Tools, find_tools
from wsrunner.execution.sandbox.warm import (
    PYTHON,
    SUPERVISOR,
    SUPERVISOR_CPUS,
    SUPERVISOR_ENV,
    SUPERVISOR_MEMORY,
    SUPERVISOR_PIDS,
    WarmCommand,
    WarmKey,
    WarmSandbox,
)
from wsrunner.execution.sandbox.warm_pool import WarmPool
from wsrunner.policy import Limits, SandboxPolicy
from wsrunner.workspace import paths

logger = logging.getLogger(__name__)
Level = Literal["full", "partial", "none"]
#: none: an empty network namespace; egress: the internet, never the host (`network`);
#: host: the host's network, loopback included (gives up the host's protection).
NetworkMode = Literal["none", "egress", "host"]
#: The environment of the privileged part of the launch chain: fixed, never the task's.
LAUNCH_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
LEVELS: Final[dict[str, int]] = {"none": 0, "partial": 1, "full": 2}
#: Read-only system paths of the sandbox; the `-try` ones may be missing on a host.
_SYSTEM_RO: Final = ("/usr",)
_SYSTEM_RO_TRY: Final = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/localtime",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/ssh/ssh_config",
    "/etc/ssh/ssh_config.d",
    "/etc/mime.types",
    "/etc/python3",
    "/etc/python3.11",
    "/etc/xdg",
)
_MERGED_USR: Final = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
# Joins each cgroup given before `--`, sets the rlimits, then becomes the rest of the argv.
# Runs as root (for cgroup.procs); every value comes in as an argument, none is interpolated.
_SETUP: Final = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
    "ulimit -c 0 || exit 125; "
    # CPU: the soft limit sends SIGXCPU (reported as such), the hard one SIGKILL a bit later.
    '[ "$1" = - ] || { ulimit -S -t "$1" && ulimit -H -t "$(($1 + 5))"; } || exit 125; '
    '[ "$2" = - ] || ulimit -f "$2" || exit 125; [ "$3" = - ] || ulimit -n "$3" || exit 125; '
    # The working directory: the spawn has none (posix_spawn), so its shell goes there; the
    # daemon's own directory must not show through as OLDPWD.
    'cd -P -- "$4" || exit 125; unset OLDPWD; shift 4; '
)
#: Without bubblewrap: runs after setpriv, as the workspace's uid, changes to the directory
#: argv[2] (unprivileged: the workspace's paths are never resolved as root) and executes the
#: command with exactly the environment in the file at descriptor argv[1] (NAME=value, NUL
#: separated).
_ENV_EXEC: Final = (
    "import os,sys\n"
    "fd=int(sys.argv[1]);data=b''\n"
    "while (c:=os.read(fd,65536)):data+=c\n"
    "os.close(fd)\n"
    "try:os.chdir(sys.argv[2])\n"
    "except OSError as e:sys.stderr.write(f'cd: {e.strerror}: {sys.argv[2]}\\n');sys.exit(125)\n"
    "env=dict(i.split(b'=',1) for i in data.split(b'\\0') if i)\n"
    "env[b'PWD']=os.fsencode(sys.argv[2])\n"
    "os.execvpe(sys.argv[3],sys.argv[3:],env)\n"
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
    seccomp: bytes | None = None  #: the filter's BPF program (full isolation only)
    egress: Tools | None = None  #: what `egress` needs, when this host has it

    def refusal(self, required: str) -> IsolationUnavailableError | None:
        """The error commands get when this host is below the policy's `require`, else None."""
        if LEVELS[self.level] >= LEVELS[required]:
            return None
        return IsolationUnavailableError(required, self.level, self.missing)


def _bwrap_profile(
    *, network: NetworkMode, passwd_fd: int, group_fd: int, tmp_size: int, as_pid_1: bool = False
) -> list[str]:
    args = [
        "--die-with-parent",
        "--new-session",
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--cap-drop",
        "ALL",
        "--hostname",
        "wsrunner",
    ]
    if as_pid_1:  # a warm sandbox's supervisor reaps, and no command can signal pid 1
        args.append("--as-pid-1")
    if network == "host":
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
    args += [
        "--ro-bind-data",
        str(passwd_fd),
        "/etc/passwd",
        "--ro-bind-data",
        str(group_fd),
        "/etc/group",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(tmp_size),
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run",
    ]
    return args


def _data_fd(data: str | bytes) -> int:
    """A memfd (close-on-exec) holding `data`, read from its start by the one who gets it."""
    fd = os.memfd_create("wsrunner-launch")
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _nul_joined(items: Sequence[str]) -> bytes:
    """`items` NUL-terminated, for bwrap's `--args` and the env file; no item may hold NUL."""
    return b"".join(os.fsencode(item) + b"\0" for item in items)


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
    try:
        program: bytes | None = seccomp.build()
        layers["seccomp"] = f"deny list of {len(seccomp.DENIED)} system calls"
    except seccomp.SeccompUnavailableError as exc:
        program = None
        layers["seccomp"] = f"unavailable: {exc}"
    tools = find_tools()
    egress = tools if isinstance(tools, Tools) else None
    layers["egress"] = "slirp4netns" if egress else f"unavailable: {tools}"
    if bwrap is None:
        layers["bwrap"] = "not installed (apt-get install bubblewrap)"
        missing.append("bubblewrap: not installed (apt-get install bubblewrap)")
    elif program is None:
        layers["bwrap"] = "not used: no seccomp filter to give it"
        missing.append(f"seccomp: {layers['seccomp']}")
        bwrap = None
    else:
        isolation = Isolation("full", {}, (), bwrap, setpriv, uids, support, program)
        failure = _try_bwrap(isolation)
        if failure is None:
            layers["bwrap"] = f"{bwrap}: user, pid, net, ipc, uts, mount namespaces"
        else:
            layers["bwrap"] = f"unusable: {failure}"
            missing.append(f"bubblewrap: {failure}")
            bwrap = None
    level: Level = "full" if bwrap else "partial" if uids is not None else "none"
    return Isolation(
        level,
        layers,
        tuple(missing),
        bwrap,
        setpriv,
        uids,
        support,
        program if bwrap else None,
        egress if bwrap else None,
    )


def _try_bwrap(isolation: Isolation) -> str | None:
    """Run `true` through the real launch chain; the error bwrap printed, or None."""
    fds: list[int] = []
    try:
        spec = _command_argv(
            isolation,
            ["/usr/bin/true"],
            uid=isolation.uids.first if isolation.uids else None,
            binds=[],
            cwd="/",
            network="none",
            limits=None,
            procs=[],
            fds=fds,
            env={"PATH": "/usr/bin:/bin"},
        )
        done = subprocess.run(
            spec,
            pass_fds=fds,
            capture_output=True,
            timeout=20,
            cwd="/",
            env=LAUNCH_ENV,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        for fd in fds:
            os.close(fd)
    if done.returncode != 0:
        return done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
    return None


def _command_argv(
    isolation: Isolation,
    argv: Sequence[str],
    *,
    uid: int | None,
    binds: list[tuple[str, str, str]],
    cwd: str,
    network: NetworkMode,
    limits: Limits | None,
    procs: list[str],
    fds: list[int],
    env: Mapping[str, str],
    home: str = "/",
    egress_fds: tuple[int, int] | None = None,
    rlimits: tuple[str, str, str] | None = None,
    as_pid_1: bool = False,
) -> list[str]:
    """The exec chain for `argv` with the task environment `env`; `binds` are (flag, source,
    destination) triples; the descriptors to pass are appended to `fds` (the caller closes them).
    `rlimits` (CPU seconds, 512-byte blocks, files; "-": the daemon's) replace those of
    `limits`; `as_pid_1` makes `argv` the sandbox's pid 1 (a warm sandbox's supervisor)."""
    cpu, fsize, nofile = ("-",) * 3
    if rlimits is not None:
        cpu, fsize, nofile = rlimits
    elif limits is not None:
        cpu, fsize, nofile = (
            str(limits.cpu_s),
            str(max(1, limits.file_size_bytes // 512)),
            str(limits.open_files),
        )
    bwrap = isolation.bwrap if isolation.level == "full" else None
    sandboxed = bwrap is not None
    # bwrap (--chdir) or the unprivileged step after setpriv changes to `cwd`: the root shell
    # goes there itself only when nothing runs with more privilege than the command.
    setup = [*procs, "--", cpu, fsize, nofile, "/" if sandboxed or uid is not None else cwd]
    if uid is None and not sandboxed and len(argv) == 3 and list(argv[:2]) == [_SHELL, "-c"]:
        # No isolation at all (`require: none`): nothing in the chain is more privileged than
        # the command, so the set-up's own shell runs it (one exec of sh fewer), with the
        # task's environment. It sees what `sh -c` would: $0 is /bin/sh, no arguments, line 1.
        return [_SHELL, "-c", _SETUP + argv[2], _SHELL, *setup]
    out = [_SHELL, "-c", _LAUNCH, "wsrunner-launch", *setup]
    if uid is not None:
        assert isolation.setpriv is not None
        out += [
            isolation.setpriv,
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]
    variables = [f"{name}={value}" for name, value in env.items()]
    if bwrap is None:
        # Unprivileged from here on (or as privileged as the daemon, without a uid): a small
        # step sets exactly the task's variables, read from a file, and executes the command.
        fds.append(envfile := _data_fd(_nul_joined(variables)))
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        return [*out, python, "-I", "-S", "-c", _ENV_EXEC, str(envfile), cwd, *argv]
    shown = uid if uid is not None else os.geteuid()
    passwd = _data_fd(f"wsrunner:x:{shown}:{shown}:wsrunner:{home}:/bin/sh\n")
    fds.append(passwd)
    fds.append(group := _data_fd(f"wsrunner:x:{shown}:\n"))
    tmp_size = limits.memory_bytes if limits is not None else 256 * 1024**2
    args = _bwrap_profile(
        network=network, passwd_fd=passwd, group_fd=group, tmp_size=tmp_size, as_pid_1=as_pid_1
    )
    if network == "egress":
        fds.append(resolv := _data_fd(RESOLV_CONF))
        assert egress_fds is not None
        info, block = egress_fds
        args += [
            "--ro-bind-data",
            str(resolv),
            "/etc/resolv.conf",
            "--info-fd",
            str(info),
            "--block-fd",
            str(block),
        ]
    for flag, source, dest in binds:
        args += [flag, source, dest]
    if isolation.seccomp is not None:
        fds.append(program := _data_fd(isolation.seccomp))
        args += ["--seccomp", str(program)]
    args += ["--clearenv"]
    for name, value in env.items():
        args += ["--setenv", name, value]
    args += ["--chdir", cwd, "--remount-ro", "/"]
    fds.append(argfile := _data_fd(_nul_joined(args)))
    return [*out, bwrap, "--args", str(argfile), "--", *argv]


def _identities(binds: list[tuple[str, str, str]]) -> tuple[tuple[str, str, int, int], ...]:
    """(flag, destination, device, inode) of each bind by descriptor: a path replaced since
    (git writes its config by renaming a new file over it) is another warm sandbox's."""
    out = []
    for flag, fd, dest in binds:
        st = os.fstat(int(fd))
        out.append((flag, dest, st.st_dev, st.st_ino))
    return tuple(out)


def _handles(
    root: str, pinned: Sequence[str], protect: Sequence[str], fds: list[int]
) -> list[tuple[str, str, str]]:
    """bwrap binds of the pinned directories (read-write) and protected paths (read-only)
    inside the workspace, each by an O_PATH descriptor opened through no symlink.

    Never a path string: bubblewrap would resolve it again later, following symlinks, and a
    concurrent command of the same workspace could swap one in between (it bound the host's
    root into the sandbox in a review). A path that is gone or has become a symlink since it
    was found is left out: it protects nothing, and the rest still hold. The descriptors are
    appended to `fds` (the caller closes them).
    """
    out: list[tuple[str, str, str]] = []
    with paths.open_root(root) as rfd:
        for flag, wanted in (("--bind-fd", pinned), ("--ro-bind-fd", protect)):
            for path in wanted:
                rel = os.path.relpath(path, root)
                if rel.startswith(".."):
                    raise ValueError(f"{path} is not inside the workspace {root}")
                try:
                    fd = paths.open_handle(rfd, rel)
                except (OSError, WorkspaceError):
                    continue
                fds.append(fd)
                kind = os.fstat(fd).st_mode
                if stat.S_ISDIR(kind) or (flag == "--ro-bind-fd" and stat.S_ISREG(kind)):
                    out.append((flag, str(fd), path))
    return out


@dataclass(slots=True)
class Launch:
    """A command ready to start (it changes to its working directory itself): argv, the fds
    to pass and the environment to start it with (`LAUNCH_ENV`, or the task's without
    isolation), or the warm sandbox to start it in; `limits_hit` is filled when it ends."""

    argv: list[str]
    pass_fds: tuple[int, ...]
    env: dict[str, str]
    limits_hit: list[str] = field(default_factory=list)
    #: why the sandbox's network could not be set up (the command was stopped before it ran)
    network_failures: list[str] = field(default_factory=list)
    warm: WarmCommand | None = None  #: started in the workspace's warm sandbox instead
    #: why the warm sandbox did not start the command, or ended while it ran
    sandbox_failures: list[str] = field(default_factory=list)

    async def run(
        self,
        *,
        capture: Capture,
        kill_grace: float,
        watch: Watch | None = None,
        watch_after: float = 0.0,
    ) -> int:
        """Run the command to its end (`process.run_process`'s contract, either way)."""
        if self.warm is not None:
            return await self.warm.run(capture, kill_grace, watch, watch_after)
        return await run_process(
            self.argv,
            env=self.env,
            capture=capture,
            kill_grace=kill_grace,
            pass_fds=self.pass_fds,
            watch=watch,
            watch_after=watch_after,
        )


class Sandbox:
    """Builds the launch of each command from the probe's findings and the policy's settings."""

    def __init__(self, isolation: Isolation) -> None:
        self.isolation = isolation
        self._limiter = trio.CapacityLimiter(8)
        self._egress = Egress(isolation.egress) if isolation.egress is not None else None
        self.warm: WarmPool | None = None  #: the warm sandboxes, while `serve_warm` runs

    def warm_unavailable(self) -> str | None:
        """Why this host cannot keep warm sandboxes, or None."""
        iso = self.isolation
        if iso.level != "full" or iso.uids is None:
            return "they need full isolation with per-workspace uids"
        if not iso.cgroups.hierarchies:
            return "they need cgroups: nothing else finds what a command left running"
        if not os.access(PYTHON, os.X_OK):
            return f"{PYTHON} (their supervisor's interpreter) is not installed"
        return None

    async def serve_warm(
        self,
        idle_s: float,
        max_alive: int,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep warm sandboxes for the commands that may use one (`launch(warm=True)`) until
        cancelled; then every one is stopped. Returns at once where the host cannot."""
        if (why := self.warm_unavailable()) is not None:
            logger.info("sandbox warm: off (%s)", why)
            task_status.started()
            return
        self.warm = WarmPool(idle_s=idle_s, max_alive=max_alive)
        logger.info(
            "sandbox warm: up to %d workspace sandboxes, each stopped %gs unused", max_alive, idle_s
        )
        try:
            await self.warm.serve(task_status=task_status)
        finally:
            self.warm = None

    @asynccontextmanager
    async def launch(
        self,
        argv: Sequence[str],
        *,
        root: str,
        cwd: str,
        policy: SandboxPolicy,
        limits: Limits,
        network: NetworkMode,
        env: Mapping[str, str],
        protect: Sequence[str] = (),
        pinned: Sequence[str] = (),
        read_only: Sequence[str] = (),
        home: str = "/",
        warm: bool = False,
    ) -> AsyncIterator[Launch]:
        """Prepare `argv` to run in the workspace at `root` with the task environment `env`;
        clean up its cgroup (and its network) afterwards.

        `root` is bound read-write and decides the uid (its owner, a workspace uid); `protect`
        are absolute paths inside it bound read-only, `pinned` directories inside it bound
        read-write onto themselves first (mount points: a command cannot rename or remove them;
        `wsrunner.workspace.protect`); `read_only` are host paths made visible
        read-only (besides `policy.read_only_paths`). `network` is the sandbox's network.
        `warm`: the command may start in the workspace's warm sandbox (`warm.py`), which it
        does while they are served, with the network `none` and no extra `read_only` paths.

        Errors: IsolationUnavailableError when the host is below `policy.require`, or cannot
        give `egress`. A network that could not be attached stops the command before it
        runs, and `Launch.network_failures` says why.
        Cancellation: the cgroup is killed and removed (shielded) before it propagates.
        """
        iso = self.isolation
        if (refused := iso.refusal(policy.require)) is not None:
            raise refused
        if network == "egress" and (self._egress is None or iso.level != "full"):
            why = "needs full isolation" if iso.level != "full" else iso.layers["egress"]
            raise IsolationUnavailableError(policy.require, iso.level, (f"network egress: {why}",))
        group = cgroups.CommandGroup(iso.cgroups, f"cmd-{uuid.uuid4().hex[:12]}")
        pool = self.warm if warm and network == "none" and not read_only else None

        fds: list[int] = []
        kept: list[int] = []  #: the daemon's ends of the egress pipes
        handles: list[tuple[str, str, str]] = []  #: bwrap binds by descriptor (flag, fd, dest)
        found: list[tuple[tuple[int, int], tuple[tuple[str, str, int, int], ...]]] = []

        def create() -> None:
            group.create(memory=limits.memory_bytes, pids=limits.pids, cpus=limits.cpus)

        grouped = False  #: whether the command gets cgroups of its own

        def prepare() -> int | None:
            """The workspace's uid (if workspaces have their own), the command's cgroups (but
            for a warm sandbox's command: it makes its own, or has them made ahead) and
            descriptors of the paths inside the workspace to bind: one worker thread for all."""
            nonlocal grouped
            st = os.stat(root) if iso.uids is not None or pool is not None else None
            owner = None if iso.uids is None or st is None else st.st_uid
            grouped = bool(iso.cgroups.hierarchies) and (iso.uids is None or owner in iso.uids)
            if grouped and pool is None:
                create()
            if pinned or protect:
                handles.extend(_handles(root, pinned, protect, fds))
            if st is not None and pool is not None:  # what the warm sandbox's key holds
                found.append(((st.st_dev, st.st_ino), _identities(handles)))
            return owner

        launch: Launch | None = None
        try:
            uid: int | None = None
            if iso.uids is not None or iso.cgroups.hierarchies or pinned or protect:
                uid = await trio.to_thread.run_sync(prepare, limiter=self._limiter)
            if iso.uids is not None and uid not in iso.uids:
                raise IsolationUnavailableError(
                    policy.require,
                    iso.level,
                    (f"the workspace {root} is not owned by a workspace uid (owner {uid})",),
                )
            binds = [("--bind", root, root), *handles]
            binds += [("--ro-bind-try", p, p) for p in (*policy.read_only_paths, *read_only)]
            if pool is not None and found and grouped:
                root_id, bound = found[0]
                key = WarmKey(
                    root, root_id, uid, policy, limits.memory_bytes, limits.open_files, bound
                )
                start = partial(self._start_warm, key, binds, limits)
                if (sandbox := await pool.acquire(key, start)) is not None:
                    # bubblewrap's --chdir sets PWD in a cold sandbox: the same variables here.
                    exact = {**env, "PWD": cwd}
                    command = WarmCommand(
                        sandbox, list(argv), exact, cwd, limits, group, self._limiter
                    )
                    launch = Launch([], (), {}, warm=command)
                    command.failures = launch.sandbox_failures
                    try:
                        yield launch
                    finally:
                        pool.release(sandbox)
                    return
            if pool is not None and pool.serving:
                pool.commands["cold"] += 1  # it could have run warm
            if grouped and not group.dirs:  # it runs cold after all
                await trio.to_thread.run_sync(create, limiter=self._limiter)
            egress_fds = None
            if network == "egress":
                info_r, info_w = os.pipe()
                block_r, block_w = os.pipe()
                kept += [info_r, block_w]
                fds += [info_w, block_r]
                egress_fds = (info_w, block_r)
            spec = _command_argv(
                iso,
                argv,
                uid=uid,
                binds=binds,
                cwd=cwd,
                network=network,
                limits=limits,
                procs=group.procs_files,
                fds=fds,
                env=env,
                home=home,
                egress_fds=egress_fds,
            )
            # Without isolation a shell command is run by the set-up shell itself (see
            # _command_argv), which then needs the task's environment.
            bare = spec[2] != _LAUNCH
            launch = Launch(spec, tuple(fds), dict(env) if bare else dict(LAUNCH_ENV))
            if network != "egress":
                yield launch
            else:
                assert self._egress is not None
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        self._egress.attach,
                        kept[0],
                        kept[1],
                        policy.egress_allow,
                        launch.network_failures,
                    )
                    try:
                        yield launch
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            for fd in fds + kept:
                os.close(fd)
            # No cgroups (none on this host, or none created): nothing to do. A warm command's
            # were emptied as it ended (`WarmCommand.run`): what they show is read now, and
            # their removal need not hold up its result.
            handed = False  #: to its sandbox, which removes them
            if group.dirs and launch is not None and launch.warm is not None:
                launch.limits_hit = group.limits_hit()
                handed = launch.warm.sandbox.remove_later(group)
            if group.dirs and not handed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        self._finish, group, launch, limiter=self._limiter
                    )

    async def _start_warm(
        self, key: WarmKey, binds: list[tuple[str, str, str]], limits: Limits
    ) -> WarmSandbox:
        """A new warm sandbox for `key`: its supervisor started through the launch chain, as
        a command with the same binds would be, as pid 1 of the sandbox, in cgroups of its own
        (limits of the supervisor's, not the policy's: no command runs there), with the
        daemon's CPU and file size limits (each command sets its own) and room for the files
        of every command in flight."""
        iso = self.isolation
        group = cgroups.CommandGroup(iso.cgroups, f"warm-{uuid.uuid4().hex[:12]}")
        create = partial(
            group.create, memory=SUPERVISOR_MEMORY, pids=SUPERVISOR_PIDS, cpus=SUPERVISOR_CPUS
        )
        argv = [PYTHON, "-I", "-S", "-c", SUPERVISOR]
        rlimits = ("-", "-", str(max(limits.open_files, 1024)))

        def chain(sock: int) -> tuple[list[str], dict[str, str], list[int]]:
            fds: list[int] = []
            try:
                # The binds by descriptor hold the first command's descriptors, which that
                # command closes: the sandbox's bubblewrap is passed copies of its own.
                own = []
                for flag, source, dest in binds:
                    if flag in ("--bind-fd", "--ro-bind-fd"):
                        fds.append(copy := os.dup(int(source)))
                        source = str(copy)
                    own.append((flag, source, dest))
                spec = _command_argv(
                    iso,
                    [*argv, str(sock)],
                    uid=key.uid,
                    binds=own,
                    cwd=key.root,
                    network="none",
                    limits=limits,
                    procs=group.procs_files,
                    fds=fds,
                    env=SUPERVISOR_ENV,
                    home="/tmp",  # each command's HOME is its task's; /tmp is the sandbox's own
                    rlimits=rlimits,
                    as_pid_1=True,
                )
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            return spec, dict(LAUNCH_ENV), fds

        try:
            await trio.to_thread.run_sync(create, limiter=self._limiter)
            return WarmSandbox.spawn(key, group, chain, self._limiter)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(group.remove, limiter=self._limiter)
            raise

    @staticmethod
    def _finish(group: cgroups.CommandGroup, launch: Launch | None) -> None:
        """Empty the command's cgroups, note which limits it hit, and remove them."""
        if not group.dirs:
            return
        if not group.kill():
            logger.error(
                "processes of a finished command survived its cgroup kill: %s",
                ", ".join(group.procs_files),
            )
        if launch is not None:
            launch.limits_hit = group.limits_hit()
        group.remove()
