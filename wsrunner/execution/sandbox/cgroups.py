"""A cgroup per command: memory, process count and CPU limits, limit-hit evidence, and kill.

Works on pure cgroup v2 hosts (systemd with `Delegate=yes`) and on hybrid hosts where memory,
pids and cpu are v1 controllers and the v2 tree only offers `cgroup.kill`. Each command gets a
directory `<daemon's cgroup>/wsrunner/<name>` in every hierarchy that has a controller we use;
the launcher writes its own pid into each `cgroup.procs` before anything else runs, so every
process the command starts is counted and can be killed, even one that left its session.

All functions block (sysfs writes): call them from a worker thread.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Final

ROOT: Final = "/sys/fs/cgroup"
PARENT: Final = "wsrunner"
_V1_CONTROLLERS: Final = ("memory", "pids", "cpu")


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """One place per-command groups are made: a v1 controller mount or the v2 tree."""

    kind: str  #: "v1" or "v2"
    base: str  #: <mount>/<daemon's own cgroup>/wsrunner
    controllers: frozenset[str]  #: of memory, pids, cpu handled here
    can_kill: bool = False  #: v2 `cgroup.kill`


@dataclass(frozen=True, slots=True)
class CgroupSupport:
    """What the host lets the daemon do with cgroups; `problems` say why something is missing."""

    hierarchies: tuple[Hierarchy, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset().union(*(h.controllers for h in self.hierarchies))

    @property
    def can_kill(self) -> bool:
        return any(h.can_kill for h in self.hierarchies)

    def describe(self) -> str:
        if not self.hierarchies:
            return "none (" + "; ".join(self.problems) + ")" if self.problems else "none"
        parts = [f"{h.kind}:{'+'.join(sorted(h.controllers)) or 'kill'}" for h in self.hierarchies]
        return ", ".join(parts)


def _own_paths() -> dict[str, str]:
    """hierarchy key ("" for v2, else a controller name) -> this process's cgroup path."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="ascii") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def _try_make(base: str) -> str | None:
    """Create `base` if needed; the reason it cannot be used, or None."""
    try:
        os.makedirs(base, exist_ok=True)
        probe = os.path.join(base, f"probe-{os.getpid()}")
        os.mkdir(probe)
        os.rmdir(probe)
        return None
    except OSError as exc:
        return f"{base}: {exc.strerror}"


def _enable_v2(own: str, wanted: set[str]) -> set[str]:
    """Delegate `wanted` controllers to `own`/wsrunner on a pure v2 host; returns what worked.

    The "no internal processes" rule forbids enabling controllers below a group that holds
    processes, so the daemon first moves itself into a leaf (`own`/daemon), as systemd's
    documentation for `Delegate=yes` asks.
    """
    available = set(read(os.path.join(own, "cgroup.controllers")).split()) & wanted
    if not available:
        return set()
    enabled = set(read(os.path.join(own, "cgroup.subtree_control")).split())
    try:
        if not available <= enabled:
            leaf = os.path.join(own, "daemon")
            os.makedirs(leaf, exist_ok=True)
            with open(os.path.join(own, "cgroup.procs"), encoding="ascii") as f:
                pids = [p for p in f.read().split() if p]
            for pid in pids:  # the daemon and any helper left in the group
                try:
                    with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
                        f.write(pid)
                except ProcessLookupError:
                    pass
            with open(os.path.join(own, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join(f"+{c}" for c in sorted(available)))
        base = os.path.join(own, PARENT)
        os.makedirs(base, exist_ok=True)
        with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join(f"+{c}" for c in sorted(available)))
    except OSError:
        return set()
    return available


def probe() -> CgroupSupport:
    """Find where per-command groups can be made, and with which controllers."""
    try:
        own = _own_paths()
    except OSError as exc:
        return CgroupSupport(problems=(f"/proc/self/cgroup: {exc.strerror}",))
    hierarchies: list[Hierarchy] = []
    problems: list[str] = []
    # The v2 tree: /sys/fs/cgroup itself (pure v2) or /sys/fs/cgroup/unified (hybrid).
    for mount in (ROOT, os.path.join(ROOT, "unified")):
        if "" in own and os.path.exists(os.path.join(mount, "cgroup.controllers")):
            own_dir = os.path.join(mount, own[""].lstrip("/"))
            try:
                ctrls = _enable_v2(own_dir, set(_V1_CONTROLLERS))
            except OSError:
                ctrls = set()
            base = os.path.join(own_dir, PARENT)
            if (why := _try_make(base)) is None:
                kill = os.path.exists(os.path.join(base, "cgroup.kill"))
                hierarchies.append(Hierarchy("v2", base, frozenset(ctrls), kill))
            else:
                problems.append(why)
            break
    have = set().union(*(h.controllers for h in hierarchies)) if hierarchies else set()
    for ctrl in _V1_CONTROLLERS:
        mount = os.path.join(ROOT, ctrl)
        if (
            ctrl in have
            or ctrl not in own
            or not os.path.exists(os.path.join(mount, "cgroup.procs"))
        ):
            continue
        base = os.path.join(mount, own[ctrl].lstrip("/"), PARENT)
        if (why := _try_make(base)) is None:
            hierarchies.append(Hierarchy("v1", base, frozenset({ctrl})))
        else:
            problems.append(why)
    missing = set(_V1_CONTROLLERS) - set().union(*(h.controllers for h in hierarchies))
    if missing:
        problems.append(f"no {', '.join(sorted(missing))} controller available")
    return CgroupSupport(tuple(hierarchies), tuple(problems))


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def read(path: str) -> str:
    """A small file the kernel makes (cgroup, /proc), whole; "" if it cannot be read. Without
    Python's buffered text layers, which cost as much as the system calls: a warm command reads
    a dozen such files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _field(text: str, key: str) -> int:
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.strip().isdigit():
            return int(v)
    return 0


@dataclass(slots=True)
class CommandGroup:
    """The groups of one command, in every hierarchy; made, limited, inspected and removed."""

    support: CgroupSupport
    name: str
    dirs: list[tuple[Hierarchy, str]] = field(default_factory=list)

    def create(self, *, memory: int | None, pids: int | None, cpus: float | None) -> None:
        for h in self.support.hierarchies:
            path = os.path.join(h.base, self.name)
            os.mkdir(path)
            self.dirs.append((h, path))
            if h.kind == "v1":
                if "memory" in h.controllers and memory:
                    _write(os.path.join(path, "memory.limit_in_bytes"), str(memory))
                    try:  # no swap either, where swap accounting exists
                        _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(memory))
                    except OSError:
                        pass
                if "pids" in h.controllers and pids:
                    _write(os.path.join(path, "pids.max"), str(pids))
                if "cpu" in h.controllers and cpus:
                    _write(os.path.join(path, "cpu.cfs_period_us"), "100000")
                    _write(os.path.join(path, "cpu.cfs_quota_us"), str(int(cpus * 100000)))
            else:
                if "memory" in h.controllers and memory:
                    _write(os.path.join(path, "memory.max"), str(memory))
                    _write(os.path.join(path, "memory.swap.max"), "0")
                    _write(os.path.join(path, "memory.oom.group"), "1")
                if "pids" in h.controllers and pids:
                    _write(os.path.join(path, "pids.max"), str(pids))
                if "cpu" in h.controllers and cpus:
                    _write(os.path.join(path, "cpu.max"), f"{int(cpus * 100000)} 100000")

    @property
    def procs_files(self) -> list[str]:
        """The `cgroup.procs` files the launcher writes its pid into."""
        return [os.path.join(path, "cgroup.procs") for _, path in self.dirs]

    def limits_hit(self) -> list[str]:
        """Which limits stopped something: "memory" (an OOM kill), "pids" (a refused fork)."""
        hit = []
        for h, path in self.dirs:
            if "memory" in h.controllers:
                if h.kind == "v1":
                    killed = _field(read(os.path.join(path, "memory.oom_control")), "oom_kill")
                else:
                    killed = _field(read(os.path.join(path, "memory.events")), "oom_kill")
                if killed:
                    hit.append("memory")
            if "pids" in h.controllers and _field(read(os.path.join(path, "pids.events")), "max"):
                hit.append("pids")
        return hit

    def _pids(self) -> set[int]:
        found: set[int] = set()
        for _, path in self.dirs:
            found |= {int(p) for p in read(os.path.join(path, "cgroup.procs")).split()}
        return found

    def kill(self, deadline_s: float = 2.0) -> bool:
        """Kill every process left in the groups; True when they are empty."""
        end = time.monotonic() + deadline_s
        for h, path in self.dirs:
            if h.can_kill:
                try:
                    _write(os.path.join(path, "cgroup.kill"), "1")
                except OSError:
                    pass
        while pids := self._pids():
            for pid in pids:  # v1 has no cgroup.kill: signal each member until none is left
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def remove(self) -> None:
        for _, path in reversed(self.dirs):
            for _ in range(50):  # a just-killed process can keep the group busy for a moment
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)
        self.dirs.clear()
