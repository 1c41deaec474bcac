"""Drain N queued `true` tasks through one wsrunner daemon; print tasks/s and its CPU per task.

    .venv/bin/python bench/drain.py 2000                 # sandbox off, concurrency 3
    .venv/bin/python bench/drain.py 2000 --sandbox
    .venv/bin/python bench/drain.py 3000 --py-spy out.txt   # also record py-spy's raw stacks

The quick A/B check behind the step-by-step table in docs/benchmarks.md: the daemon is the one
`peers.py` runs (Redis + PostgreSQL, its own prefix and schema, removed afterwards). Tasks/s is
taken from the PostgreSQL records (first start to last end). CPU per task is the daemon
process's (all its threads, not its children's), from the first completed task on, so the
start-up is left out; "loop" is the share of it spent by the main thread, where trio runs.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# peers.py's own names (the bench/peers/ package hides it from a plain import).
peers = runpy.run_path(str(HERE / "peers.py"))
Wsrunner, cpu_s = peers["Wsrunner"], peers["_cpu_s"]


def _thread_cpu_s(pid: int, tid: int) -> float:
    """CPU seconds (user + system) thread `tid` of process `pid` has used."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", type=int)
    parser.add_argument("--sandbox", action="store_true")
    parser.add_argument("--py-spy", metavar="FILE", help="py-spy record --format raw into FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Wsrunner(args.sandbox, Path(tmp))
        try:
            daemon.push(args.tasks)
            daemon.start()
            while daemon.completed() == 0:
                time.sleep(0.05)
            spy = None
            if args.py_spy:
                exe = shutil.which("py-spy") or str(HERE.parent / ".venv" / "bin" / "py-spy")
                spy = subprocess.Popen([exe, "record", "--format", "raw", "--rate", "250",
                                        "--output", args.py_spy, "--pid", str(daemon.proc.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            pid = daemon.proc.pid
            cpu0, loop0, done0 = cpu_s(pid), _thread_cpu_s(pid, pid), daemon.completed()
            while daemon.completed() < args.tasks:
                time.sleep(0.1)
            cpu, loop = cpu_s(pid) - cpu0, _thread_cpu_s(pid, pid) - loop0
            if spy is not None:
                spy.send_signal(2)
                spy.wait()
            rows = daemon.rows()
            done = [r for r in rows if r[1] == "completed"]
            span = (max(r[3] for r in done) - min(r[2] for r in done)).total_seconds()
            print(f"{len(done) / span:.1f} tasks/s, {cpu / (args.tasks - done0) * 1000:.2f} ms "
                  f"daemon CPU per task (loop {loop / cpu:.0%}), {args.tasks - len(done)} lost, "
                  f"{sum(1 for r in rows if r[4] > 1)} run twice")  # fmt: skip
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
