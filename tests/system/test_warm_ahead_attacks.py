"""Attacks on the cgroups a warm sandbox makes ahead (`WarmSandbox._keep_ahead`), as a tenant.

After a sandbox's first command, the daemon moves the process its supervisor forked for the
next command (the spare) into cgroups of its own with the last command's limits, before any
command asks; a command that gets that spare takes them over (`WarmCommand._join`), any other
makes its own and has its process moved (`_adopt`). Each test attacks that with what a
command of the workspace may do to the spare (same uid, same pid namespace): kill it, over
and over, while other commands start; stop it; change its limits and scheduling; and with
what a tenant decides besides (how full its workspace is). What the tests read from the
host: the cgroups the daemon made (`made`, which records each as it is made), the cgroups a
command ran in (from inside: their names), the daemon's descriptors and CPU time (the test
process is the daemon), and the spare's cgroups and pid.

Three holes this pass found, fixed since (each test failed before): W1, a tenant near its
quota had every command throw away the cgroups made ahead (all the limits were compared, the
file size among them); W2, a spare made ready with other limits was moved back by its pid,
unchecked; W3, a spare killed while it was checked was taken for one a command tampered with,
and wore its sandbox out. W2 and W3 are races: a hook in the daemon (a fixture here) holds
the window open that a busy daemon, or a command killing spares in a loop, opens by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import host_pids, unique_seconds, wait_for
from tests.integration.test_warm import (
    memory_cgroup,
    pool_of,
    run,
    running_cgroup,
    spare_of,
    task,
)
from tests.system.test_warm_attacks import WHERE, reload
from tests.system.test_warm_attacks import _warm as _warm  # the `warm` fixture
from wsrunner.daemon import Daemon
from wsrunner.execution.sandbox import cgroups
from wsrunner.execution.sandbox.warm import WarmCommand, WarmSandbox, _Ahead, _libc

MIB = 1024**2
Made = list[tuple[str, Any, Any, Any]]  #: each command cgroup made: (name, memory, pids, cpus)
#: The limits of the fixture's policy, as the daemon makes a command's cgroups with them.
POLICY_LIMITS = (128 * MIB, 64, None)

#: Kills every spare of its sandbox (not pid 1) for argv[1] seconds, looking again every
#: argv[2] seconds; prints how many kills.
KILL_SPARES = """\
import os, sys, time
head, end, kills = b"/usr/bin/python3\\0-I\\0-S\\0-c\\0", time.monotonic() + float(sys.argv[1]), 0
while time.monotonic() < end:
    time.sleep(float(sys.argv[2]))
    for name in os.listdir("/proc"):
        if name.isdigit() and name != "1":
            try:
                if open(f"/proc/{name}/cmdline", "rb").read().startswith(head):
                    os.kill(int(name), 9)
                    kills += 1
            except OSError:
                pass
print(kills)
"""
#: In a command: waits for the spare its supervisor forked for the next command (not pid 1),
#: then runs argv on it: "$s" is its pid.
ON_THE_SPARE = "until s=$(pgrep -f '^/usr/bin/python3 -I -S -c' | grep -vx 1); do :; done; {change}"


@pytest.fixture(name="made")
def _made(monkeypatch: pytest.MonkeyPatch) -> Made:
    """Each command cgroup the daemon makes, as it makes it: (name, memory, pids, cpus)."""
    made: Made = []
    create = cgroups.CommandGroup.create

    def record(group: cgroups.CommandGroup, *, memory: Any, pids: Any, cpus: Any) -> None:
        made.append((group.name, memory, pids, cpus))
        create(group, memory=memory, pids=pids, cpus=cpus)

    monkeypatch.setattr(cgroups.CommandGroup, "create", record)
    return made


def existing(names: set[str]) -> set[str]:
    """Those of `names` with a directory left in any hierarchy."""
    bases = [h.base for h in cgroups.probe().hierarchies]
    return {n for n in names if any(os.path.exists(os.path.join(b, n)) for b in bases)}


def commands_made(made: Made) -> set[str]:
    return {name for name, *_ in made if name.startswith("cmd-")}


def descriptors() -> int:
    """The daemon's open descriptors (the daemon runs in the test's process)."""
    return len(os.listdir("/proc/self/fd"))


def cpu_seconds() -> float:
    """User and system CPU time of the daemon's process so far (every thread)."""
    times = os.times()
    return times.user + times.system


def sandbox_of_workspace(daemon: Daemon, ws: str) -> WarmSandbox:
    (sandbox,) = [s for s in pool_of(daemon).sandboxes() if Path(s.key.root).name == ws]
    return sandbox


async def made_ahead(sandbox: WarmSandbox) -> str:
    """The cgroup the sandbox's spare waits in, once the daemon has moved it there."""

    def ahead() -> str | None:
        try:
            group = memory_cgroup(spare_of(sandbox))
        except (OSError, ValueError):
            return None  # between two spares
        return group.name if group is not None and group.name.startswith("cmd-") else None

    name: str = await wait_for(ahead)
    return name


def groups_of(cgroup_file: str) -> dict[str, str]:
    """A command's /proc/self/cgroup, as hierarchy -> the name of its cgroup there."""
    out = {}
    for line in cgroup_file.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "memory", "pids", "cpu"):
            out[controllers or "unified"] = path.rsplit("/", 1)[-1]
    return out


# --- a command that kills spares -----------------------------------------------------------------


async def test_killing_spares_in_a_loop_leaks_nothing_and_the_next_task_runs_ahead(
    warm: Any, made: Made
) -> None:
    """Each spare killed has the supervisor fork another; the daemon makes cgroups ahead for
    one spare per command that started, not for each (before, a 3 s loop of 5-10k kills had
    it make 906-1065 sets, about 0.3 of a CPU). Nothing may accumulate: no cgroup, no pidfd;
    and a later task's commands run in cgroups made ahead with the policy's limits."""
    daemon = await warm()
    ws = "ws-killer"
    await run(daemon, ws, "true")
    # A task first as well: its first run opens connections (a task's workspace home is
    # recorded in PostgreSQL on first use) that must not count as leaked descriptors below.
    await task(daemon, ws, "true")
    await made_ahead(sandbox_of_workspace(daemon, ws))
    fds, cpu, count = descriptors(), cpu_seconds(), len(made)
    killed = await run(daemon, ws, f"python3 - 3 0 <<'EOF'\n{KILL_SPARES}EOF")
    assert killed["exit_code"] == 0, killed
    spent, churned = cpu_seconds() - cpu, len(made) - count
    print(f"{killed['stdout'].strip()} kills, {churned} cgroups made, daemon CPU {spent:.2f}s")
    assert int(killed["stdout"]) > 10, "the spares were not killed: the attack did not run"
    assert churned <= 2, f"{churned} cgroup sets made for spares no command asked for"
    pool = pool_of(daemon)
    first, second = await task(daemon, ws, "echo next", "echo again")
    assert (first["stdout"], second["stdout"]) == ("next\n", "again\n"), (first, second)
    await made_ahead(sandbox_of_workspace(daemon, ws))
    before = pool.commands["ahead"]
    group, pids_max = await running_cgroup(daemon, ws)
    assert pool.commands["ahead"] == before + 1  # made ahead, as it asked
    assert group.name.startswith("cmd-") and pids_max == "64"
    left = await made_ahead(sandbox_of_workspace(daemon, ws))
    await wait_for(lambda: existing(commands_made(made)) == {left})
    assert descriptors() <= fds + 1, f"the daemon held {fds} descriptors, now {descriptors()}"


async def test_commands_racing_a_spare_killer_each_run_in_their_own_cgroups(
    warm: Any, made: Made
) -> None:
    """A command kills every spare while other commands of the workspace start: each is
    either refused or killed before it runs (its process was a spare), or runs in cgroups
    of its own, in every hierarchy, made with the policy's limits, never shared, never the
    supervisor's; and the sandbox is never taken for a liar (which would fail its commands)."""
    daemon = await warm(concurrency=4)
    ws = "ws-race"
    await run(daemon, ws, "true")
    sandbox = sandbox_of_workspace(daemon, ws)
    fds = descriptors()
    results = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, daemon, ws, f"python3 - 3 0.01 <<'EOF'\n{KILL_SPARES}EOF")
        await wait_for(lambda: pool_of(daemon).statistics()["active"] == 1)
        for _ in range(30):
            results.append(await run(daemon, ws, "cat /proc/self/cgroup"))
    limits = {name: tuple(rest) for name, *rest in made}
    ran = [groups_of(r["stdout"]) for r in results if r["exit_code"] == 0]
    for result in results:
        if result["exit_code"] != 0:  # refused, or its process (still a spare) was killed
            assert result["stdout"] == "" and result["exit_code"] in (125, -9), result
    for groups in ran:
        assert set(groups) == {"unified", "memory", "pids", "cpu"}, groups
        (name,) = set(groups.values())
        assert name.startswith("cmd-") and limits[name] == POLICY_LIMITS, (name, limits)
    names = [groups["memory"] for groups in ran]
    assert names and len(set(names)) == len(names), f"commands shared cgroups: {names}"
    print(f"{len(ran)} of {len(results)} commands ran; its sandbox worn: {sandbox.worn}")
    assert sandbox.failure is None or sandbox.failure.startswith("replaced"), sandbox.failure
    await run(daemon, ws, "true")  # in a new sandbox, if W3 (below) wore that one out
    left = await made_ahead(sandbox_of_workspace(daemon, ws))
    await wait_for(lambda: existing(commands_made(made)) == {left})
    assert descriptors() <= fds + 1, f"the daemon held {fds} descriptors, now {descriptors()}"


async def test_a_spare_killer_leaves_another_workspaces_commands_alone(
    warm: Any, made: Made
) -> None:
    """One workspace's command kills every spare it sees while another workspace runs
    commands: those all run, each in cgroups of its own with the policy's limits, in a
    sandbox nobody wore out."""
    daemon = await warm(concurrency=4)
    await run(daemon, "ws-calm", "true")
    calm = sandbox_of_workspace(daemon, "ws-calm")
    await made_ahead(calm)
    await run(daemon, "ws-loud", "true")
    results = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, daemon, "ws-loud", f"python3 - 3 0 <<'EOF'\n{KILL_SPARES}EOF")
        await wait_for(lambda: pool_of(daemon).statistics()["active"] == 1)
        for _ in range(20):
            results.append(await run(daemon, "ws-calm", "cat /proc/self/cgroup"))
    assert all(r["exit_code"] == 0 for r in results), results
    limits = {name: tuple(rest) for name, *rest in made}
    names = [groups_of(r["stdout"])["memory"] for r in results]
    assert all(limits[name] == POLICY_LIMITS for name in names), (names, limits)
    assert len(set(names)) == len(names), names
    assert calm.worn is None and calm in pool_of(daemon).sandboxes()


async def test_what_a_command_in_cgroups_made_ahead_leaves_running_ends_with_it(
    warm: Any,
) -> None:
    """The first command of a sandbox makes its own cgroups (tests/integration/test_warm.py
    has it leave processes behind); this one runs in those made ahead and leaves a process in
    a session of its own, an orphan, and one that forks as fast as it can: none outlives it."""
    daemon = await warm()
    ws = "ws-leave"
    await run(daemon, ws, "true")
    await made_ahead(sandbox_of_workspace(daemon, ws))
    away, orphan, forks = unique_seconds(), unique_seconds(), unique_seconds()
    leave = (
        f"setsid sleep {away} & (sleep {orphan} &) ; "
        f"sh -c 'while :; do sleep {forks} & done' >/dev/null 2>&1 & "
        f"until pgrep -f '^sleep {forks}$' >/dev/null; do :; done; echo left"
    )
    before = pool_of(daemon).commands["ahead"]
    result = await run(daemon, ws, leave)
    assert result["stdout"] == "left\n", result
    assert pool_of(daemon).commands["ahead"] == before + 1  # in cgroups made ahead
    assert host_pids(away) == host_pids(orphan) == host_pids(forks) == []
    assert (await run(daemon, ws, "echo next"))["stdout"] == "next\n"


class _DiesAsChecked:
    """The C library as `warm._inherited` calls it (`ioprio_get`, its last look at a
    process, after its limits, scheduling and CPUs), but that the process looked at is
    killed and reaped first, once armed with the supervisor's pid (which is not)."""

    def __init__(self, libc: Any) -> None:
        self.libc = libc
        self.armed: list[int] = []

    def syscall(self, number: int, which: int, pid: int) -> int:
        if self.armed and pid != self.armed[0]:
            self.armed.clear()
            os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
                time.sleep(0.001)
        result: int = self.libc.syscall(number, which, pid)
        return result


@pytest.fixture(name="dies_as_checked")
def _dies_as_checked(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """arm(supervisor): the next process but `supervisor` that the daemon checks for what it
    inherits dies between two of its reads (a command killing spares in a loop lands there by
    itself: the loop above wore its sandbox out in some runs)."""
    libc = _DiesAsChecked(_libc)
    monkeypatch.setattr("wsrunner.execution.sandbox.warm._libc", libc)
    return libc.armed.append


async def test_a_spare_killed_as_it_is_checked_is_ended_not_tampered_with(
    warm: Any, dies_as_checked: Callable[[int], None]
) -> None:
    """The spare made ready for the next command is killed as the command takes it over,
    between two reads of what it inherits: nothing of the command ran, so it runs in another
    process, and the sandbox, which nobody tampered with, serves on."""
    daemon = await warm()
    ws = "ws-checked"
    first = await run(daemon, ws, WHERE)
    sandbox = sandbox_of_workspace(daemon, ws)
    await made_ahead(sandbox)
    dies_as_checked(sandbox.supervisor_pid)
    result = await run(daemon, ws, "echo again")
    assert result["stdout"] == "again\n" and result["exit_code"] == 0, result
    assert sandbox.worn is None, f"a spare killed as it was checked wore its sandbox: {result}"
    assert (await run(daemon, ws, WHERE))["stdout"] == first["stdout"]


# --- what a command does to the spare that waits for the next one ---------------------------------


@pytest.mark.parametrize(
    ("change", "show"),
    [
        ("prlimit --pid $s --as=150000000:150000000 --nproc=20:20", "ulimit -v; ulimit -p"),
        (
            "chrt -i -p 0 $s && renice -n 19 -p $s && taskset -p 1 $s",
            "chrt -p $$ | head -n 1 | cut -d: -f2; nice; taskset -p $$ | cut -d: -f2",
        ),
        ("ionice -c 3 -p $s", "ionice -p $$"),
        # Those each command sets itself: lowered hard limits cannot be raised again.
        (
            "prlimit --pid $s --nofile=16:16 --cpu=1:1 --fsize=1024:1024",
            "ulimit -n; ulimit -t; ulimit -f",
        ),
    ],
)
async def test_what_a_command_sets_on_the_waiting_spare_never_reaches_a_later_task(
    warm: Any, change: str, show: str
) -> None:
    """The spare waits, in cgroups made ahead, for the next command, which may be another
    task's; a command may change its limits and scheduling (same uid) and end. No later
    command may run with them: the one that gets that spare is refused, or starts in a
    sandbox that replaced this one."""
    daemon = await warm()
    ws = "ws-taint-spare"
    before = await run(daemon, ws, f"{WHERE}; {show}")
    await made_ahead(sandbox_of_workspace(daemon, ws))
    changed = await run(daemon, ws, ON_THE_SPARE.format(change=f"{{ {change}; }} >/dev/null"))
    assert changed["exit_code"] == 0, changed
    for _ in range(3):
        (later,) = await task(daemon, ws, f"{WHERE}; {show}")
        if later["exit_code"] != 0:  # the spare that was changed: it never runs a command
            assert later["stdout"] == "", later
            continue
        assert later["stdout"].split()[1:] == before["stdout"].split()[1:], later
    assert later["exit_code"] == 0, later


async def test_a_stopped_spare_starts_the_next_command_in_its_cgroups_made_ahead(
    warm: Any,
) -> None:
    """A command stops the waiting spare and ends: the next task's command still runs, in the
    cgroups made for it ahead (the daemon continues the process as it lets it go)."""
    daemon = await warm()
    ws = "ws-stop-spare"
    await run(daemon, ws, "true")
    sandbox = sandbox_of_workspace(daemon, ws)
    await made_ahead(sandbox)
    stopped = await run(daemon, ws, ON_THE_SPARE.format(change="kill -STOP $s && echo stopped"))
    assert stopped["stdout"] == "stopped\n", stopped
    spare = spare_of(sandbox)
    await wait_for(lambda: Path(f"/proc/{spare}/stat").read_text().split(") ")[1][0] == "T")
    ahead = await made_ahead(sandbox)
    (later,) = await task(daemon, ws, "cat /proc/self/cgroup")
    assert later["exit_code"] == 0, later
    assert set(groups_of(later["stdout"]).values()) == {ahead}, (ahead, later)


# --- what the tenant decides besides -------------------------------------------------------------


async def test_a_workspace_near_its_quota_still_runs_in_cgroups_made_ahead(warm: Any) -> None:
    """The file-size limit is no cgroup's; a command whose memory, pids and CPU limits are
    those made ahead runs in them, however full its workspace is. Here each file the tenant
    writes shrinks the room it has under a 4 MiB quota, so each command has another limit on
    the size of a file (which it sets itself, as it starts)."""
    ws = "ws-full"
    daemon = await warm(workspace_quotas={ws: 4 * MIB})
    await run(daemon, ws, "true")
    pool, sizes = pool_of(daemon), set()
    for n in range(3):
        await daemon.service.workspace.write_file(ws, f"grow-{n}", "x" * 5000)
        await made_ahead(sandbox_of_workspace(daemon, ws))
        before = dict(pool.commands)
        result = await run(daemon, ws, "ulimit -f")
        assert result["exit_code"] == 0, result
        sizes.add(result["stdout"])
        assert pool.commands["ahead"] == before.get("ahead", 0) + 1, (
            f"with {result['stdout'].strip()} blocks of file size (the quota's room) the "
            f"command made its own cgroups and moved its process back out of those made "
            f"ahead: {dict(pool.commands)}"
        )
    assert len(sizes) == 3, sizes  # each command had another file-size limit


@pytest.fixture(name="pid_taker")
def _pid_taker(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Widens the window of `WarmCommand._adopt` (the worker thread a command of other limits
    waits for: a busy daemon's is long): before it runs, the spare the command got, made ready
    ahead, is killed (as any command of the workspace may) and once it is reaped, a process
    of the host takes its pid (as the host's pid counter wrapping, 32768 here, would have it;
    here /proc/sys/kernel/ns_last_pid). Yields the processes that took one."""
    taken: list[subprocess.Popen[bytes]] = []
    adopt = WarmCommand._adopt

    def take(spare: int) -> None:
        os.kill(spare, signal.SIGKILL)
        end = time.monotonic() + 5
        while os.path.exists(f"/proc/{spare}") and time.monotonic() < end:
            time.sleep(0.001)
        for _ in range(100):  # another process of the host may fork in between: again
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(spare - 1))
            taker = subprocess.Popen(["sleep", unique_seconds()])
            if taker.pid == spare:
                taken.append(taker)
                return
            taker.kill()
            taker.wait()

    def widened(command: WarmCommand, pidfd: int, ahead: _Ahead | None) -> Any:
        if ahead is not None and ahead.ready and not taken:
            take(ahead.pid)
        return adopt(command, pidfd, ahead)

    monkeypatch.setattr(WarmCommand, "_adopt", widened)
    yield taken
    for taker in taken:
        taker.kill()
        taker.wait()


async def test_a_spare_moved_out_of_cgroups_made_ahead_is_moved_by_its_pid_only_while_it_lives(
    warm: Any, tmp_path: Path, pid_taker: list[subprocess.Popen[bytes]]
) -> None:
    """A command whose limits are not those of the cgroups made ahead (a policy reloaded)
    gets the spare waiting in them; the spare is killed and its pid taken by a process of the
    host before the daemon moves it out: that process stays where it is."""
    daemon = await warm()
    ws = "ws-reuse"
    await run(daemon, ws, "true")
    sandbox = sandbox_of_workspace(daemon, ws)
    await made_ahead(sandbox)
    await reload(daemon, tmp_path / "policy.yaml", pids=48)  # the next command: other limits
    ours = memory_cgroup(os.getpid())
    result = await run(daemon, ws, "echo again")
    # Its first process was killed before it started; it ran in another.
    assert result["stdout"] == "again\n", result
    assert len(pid_taker) == 1, "no process of the host could take the spare's pid"
    (taker,) = pid_taker
    group = memory_cgroup(taker.pid)
    assert group == ours, (
        f"host process {taker.pid}, which took the pid of the killed spare, was moved into "
        f"{group}, the warm sandbox's own cgroups"
    )
    assert (await run(daemon, ws, "echo next"))["stdout"] == "next\n"
    assert taker.poll() is None, "the process that took the spare's pid was killed"
