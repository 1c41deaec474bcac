"""Drain N queued `true` tasks through one wsrunner daemon; print tasks/s and its CPU per task.

    .venv/bin/python bench/drain.py 2000                 # sandbox off, concurrency 3
    .venv/bin/python bench/drain.py 2000 --sandbox
    .venv/bin/python bench/drain.py 3000 --py-spy out.txt   # also record py-spy's raw stacks
    .venv/bin/python bench/drain.py 3000 --profile out.prof # the daemon under cProfile

The quick A/B check behind the step-by-step table in docs/benchmarks.md: the daemon is the one
`peers.py` runs (Redis + PostgreSQL, its own prefix and schema, removed afterwards). Tasks/s is
taken from the PostgreSQL records (first start to last end). CPU per task is the daemon
process's (all its threads, not its children's), from the first completed task on, so the
start-up is left out; "loop" is the share of it spent by the main thread, where trio runs.
A second line splits the whole machine's CPU per task over the same span by who spent it: the
daemon, the commands it ran (its reaped children), its directory helper, PostgreSQL, Redis
(their processes), and the rest (the kernel's threads, anything else running).

With --profile, a third line counts, per task over the whole run, what does not depend on how
busy the machine was: the daemon's Python function calls, trio's reschedules (passes of a task
through the scheduler) and cancel scopes entered. Its times are cProfile's (several times the
real ones); the counts are exact, so two commits compare on them in one run each.
"""

from __future__ import annotations

import argparse
import os
import pstats
import runpy
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from machine import cpu_s, machine_busy_s  # bench/, the script's directory

HERE = Path(__file__).resolve().parent
# peers.py's own names (the bench/peers/ package hides it from a plain import).
peers = runpy.run_path(str(HERE / "peers.py"))
Wsrunner = peers["Wsrunner"]


def _named(*names: str) -> list[int]:
    """Pids of the processes whose command name is one of `names`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() in names:
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def _helpers(pid: int) -> list[int]:
    """Pids of the daemon's directory helper (its children started from any of its threads)."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            for child in map(int, f.read().split()):
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as c:
                        if b"wsrunner.workspace.fshelper" in c.read():
                            found.append(child)
                except OSError:
                    continue
    return found


def _split(daemon_pid: int, helpers: list[int]) -> dict[str, float]:
    """CPU seconds so far, by who spent it (see the module's docstring)."""
    return {
        "machine": machine_busy_s(),
        "daemon": cpu_s(f"/proc/{daemon_pid}/stat"),
        "commands": cpu_s(f"/proc/{daemon_pid}/stat", children=True),
        "helper": sum(cpu_s(f"/proc/{p}/stat") for p in helpers),
        "postgres": sum(cpu_s(f"/proc/{p}/stat") for p in _named("postgres")),
        "redis": sum(cpu_s(f"/proc/{p}/stat") for p in _named("redis-server")),
    }


def _counts(profile: str, tasks: int) -> str:
    """Per task: Python calls, trio reschedules and cancel scopes entered, from a cProfile file."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]

    def calls(module: str, name: str) -> int:
        return sum(v[1] for (f, _, n), v in stats.items() if f.endswith(module) and n == name)

    total = sum(v[1] for v in stats.values())
    reschedules = calls("trio/_core/_run.py", "reschedule")
    scopes = calls("trio/_core/_run.py", "_close")  # CancelScope._close: one per scope
    return (
        f"per task: {total / tasks:.0f} Python calls, {reschedules / tasks:.1f} reschedules, "
        f"{scopes / tasks:.1f} cancel scopes (cProfile, whole run)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", type=int)
    parser.add_argument("--sandbox", action="store_true")
    parser.add_argument("--py-spy", metavar="FILE", help="py-spy record --format raw into FILE")
    parser.add_argument("--profile", metavar="FILE", help="run the daemon under cProfile into FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Wsrunner(args.sandbox, Path(tmp))
        try:
            daemon.push(args.tasks)
            daemon.start(profile=args.profile)
            while daemon.completed() == 0:
                time.sleep(0.05)
            spy = None
            if args.py_spy:
                exe = shutil.which("py-spy") or str(HERE.parent / ".venv" / "bin" / "py-spy")
                spy = subprocess.Popen(
                    [
                        exe,
                        "record",
                        "--format",
                        "raw",
                        "--rate",
                        "250",
                        "--output",
                        args.py_spy,
                        "--pid",
                        str(daemon.proc.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            pid = daemon.proc.pid
            loop_stat = f"/proc/{pid}/task/{pid}/stat"  # the main thread, where trio runs
            loop0, done0, helpers = cpu_s(loop_stat), daemon.completed(), _helpers(pid)
            split0 = _split(pid, helpers)
            while daemon.completed() < args.tasks:
                time.sleep(0.1)
            loop = cpu_s(loop_stat) - loop0
            split = {k: v - split0[k] for k, v in _split(pid, helpers).items()}
            cpu = split["daemon"]
            split["rest"] = split["machine"] - sum(v for k, v in split.items() if k != "machine")
            if spy is not None:
                spy.send_signal(2)
                spy.wait()
            rows = daemon.rows()
            done = [r for r in rows if r[1] == "completed"]
            span = (max(r[3] for r in done) - min(r[2] for r in done)).total_seconds()
            # A short drain can be over before the first measurement: then nothing is measured
            # (n = 0), which must not end the script.
            n = max(1, args.tasks - done0)
            print(
                f"{len(done) / span:.1f} tasks/s, {cpu / n * 1000:.2f} ms "
                f"daemon CPU per task (loop {loop / max(cpu, 1e-9):.0%}), "
                f"{args.tasks - len(done)} lost, "
                f"{sum(1 for r in rows if r[4] > 1)} run twice"
            )
            print(
                "CPU ms per task: " + ", ".join(f"{k} {v / n * 1000:.2f}" for k, v in split.items())
            )
        finally:
            daemon.stop()
        if args.profile:
            print(_counts(args.profile, args.tasks))


if __name__ == "__main__":
    main()
