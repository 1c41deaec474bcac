"""The benchmark scripts still run against the code they measure: a few runs each, no numbers
asserted (benchmarks are never timed assertions). An internal API change once broke one of them
unnoticed until a full benchmark run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_the_sandbox_start_up_script_runs() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "sandbox_overhead.py"), "--runs", "2",
                           "--json"], capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["level"] in ("full", "partial", "none")


def test_the_drain_script_runs_every_task_once() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "drain.py"), "30"], capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tasks/s" in done.stdout and "0 lost, 0 run twice" in done.stdout, done.stdout
