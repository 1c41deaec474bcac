"""The benchmark scripts still run against the code they measure: a few runs each, no numbers
asserted (benchmarks are never timed assertions). An internal API change once broke one of them
unnoticed until a full benchmark run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_sandbox_start_up_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "sandbox_overhead.py"), "--runs", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["level"] in ("full", "partial", "none")


def test_the_drain_script_runs_every_task_once_and_counts_under_cprofile(tmp_path: Path) -> None:
    profile = tmp_path / "daemon.prof"
    done = subprocess.run(
        [sys.executable, str(BENCH / "drain.py"), "30", "--profile", str(profile)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tasks/s" in done.stdout and "0 lost, 0 run twice" in done.stdout, done.stdout
    counts = re.search(
        r"per task: (\d+) Python calls, ([\d.]+) reschedules, ([\d.]+) cancel "
        r"scopes",
        done.stdout,
    )
    assert counts is not None, done.stdout
    assert all(float(n) > 0 for n in counts.groups()), done.stdout


def test_the_postgresql_statements_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "pg_statements.py"), "--tasks", "5", "--async-commit"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "5 tasks: PostgreSQL CPU" in done.stdout and "async commit" in done.stdout, done.stdout


def test_the_two_clients_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "clients.py"), "--calls", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(done.stdout)) == 4, done.stdout
