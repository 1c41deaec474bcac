"""wsrunner against peer task queues, on this machine, in one run: one table at the end.

    .venv/bin/python bench/peers.py [--rounds 3] [--tasks 300] [--latency-tasks 100]

Workloads (issue 6, 1 and 2): throughput of tasks whose one step runs `true` (a real fork/exec)
at a concurrency of 3, the queue filled before the worker starts; and latency with an idle
worker, one task at a time: submit -> start and submit -> done. Every system uses the same Redis
(its own database or key prefix) and one worker process (RQ: its pool of 3 work horses). The
peers are installed from PyPI into bench/.venv and bench/.venv-celery (Celery needs redis-py 6,
arq 5) on first use. wsrunner keeps a PostgreSQL record of every task; it is measured with the
sandbox off (policy `require: none`) and on. Rounds are interleaved; the median and the range of
the rounds are printed. Nothing is asserted: this prints numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
PEERS = {
    "arq": ".venv",
    "saq": ".venv",
    "dramatiq": ".venv",
    "rq": ".venv",
    "celery": ".venv-celery",
}
PINS = {".venv": ["dramatiq[redis]==2.2.1", "saq==0.26.4", "rq==3.0.0", "arq==0.28.0"],
        ".venv-celery": ["celery[redis]==5.7.0"]}  # fmt: skip


def peer_python(venv: str) -> Path:
    py = ROOT / "bench" / venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
        for pin in PINS[venv]:  # one at a time: pip's resolver trips over them together
            subprocess.run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    return py


def peer_round(peer: str, workload: str, n: int, db: int) -> dict[str, Any]:
    out = subprocess.run([str(peer_python(PEERS[peer])), "-m", "bench.peer_round", peer, workload,
                          str(n)], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "BENCH_REDIS_URL": f"{REDIS_URL}/{db}",
                              "PYTHONPATH": str(ROOT)})  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


class Wsrunner:
    """A `wsrunner serve` process on Redis + PostgreSQL, fed like the reference producers."""

    def __init__(self, sandbox: bool, tmp: Path) -> None:
        self.sandbox = sandbox
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.schema = f"bench_{uuid.uuid4().hex[:8]}"
        self.r = redis.Redis.from_url(f"{REDIS_URL}/0")
        policy = (ROOT / "policies" / "default.yaml").read_text()
        if not sandbox:
            policy = policy.replace("require: full", "require: none")
        (tmp / "policy.yaml").write_text(policy)
        self.env = {**os.environ, "REDIS_URL": f"{REDIS_URL}/0", "DATABASE_URL": DATABASE_URL,
                    "WSRUNNER_REDIS_PREFIX": self.prefix, "WSRUNNER_DATABASE_SCHEMA": self.schema,
                    "WORKSPACE_VOLUME_PATH": str(tmp / "volume"), "WORKER_CONCURRENCY": "3",
                    "WSRUNNER_FRONTEND": "none", "POLICY_FILE": str(tmp / "policy.yaml"),
                    "WSRUNNER_SANDBOX": "auto" if sandbox else "off", "LOG_LEVEL": "WARNING"}  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def push(self, n: int) -> list[str]:
        ids = [str(uuid.uuid4()) for _ in range(n)]
        now = datetime.now(UTC).isoformat()
        payloads = [json.dumps({"task_id": t, "task_type": "background_job", "workspace_id": "bench",
                                "priority": "normal", "timeout_seconds": 60, "created_at": now,
                                "steps": [{"action": "execute_command", "command": "true"}]})
                    for t in ids]  # fmt: skip
        for i in range(0, n, 1000):
            self.r.lpush(f"{self.prefix}:tasks:normal", *payloads[i : i + 1000])
        return ids

    def start(self) -> None:
        self.proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), *(["/tmp/prof/timed.py"] if os.environ.get("WSR_TIMED") else ["-m", "wsrunner", "serve"])],
                                     env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        keys = list(self.r.scan_iter(f"{self.prefix}:*", count=1000))
        if keys:
            self.r.unlink(*keys)
        with psycopg.connect(DATABASE_URL, autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    def rows(self, ids: list[str] | None = None) -> list[tuple[Any, ...]]:
        try:
            with psycopg.connect(DATABASE_URL, autocommit=True) as c:
                return c.execute(
                    f'SELECT id::text, status, started_at, completed_at, attempts FROM "{self.schema}".task_executions'
                ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []

    def throughput(self, n: int) -> dict[str, Any]:
        self.push(n)
        self.start()
        deadline = time.time() + 900
        while sum(1 for r in self.rows() if r[1] == "completed") < n and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        rows = self.rows()
        done = [r for r in rows if r[1] == "completed"]
        span = (max(r[3] for r in done) - min(r[2] for r in done)).total_seconds()
        return {"tasks_per_s": len(done) / span, "lost": n - len(done),
                "run_twice": sum(1 for r in rows if r[4] > 1)}  # fmt: skip

    def latency(self, n: int) -> dict[str, Any]:
        self.start()
        sent: dict[str, float] = {}
        for i in range(-5, n):
            [tid] = self.push(1)
            t0 = time.time()
            deadline = t0 + (60 if i < 0 else 30)
            key = f"{self.prefix}:task:{tid}:status"
            while self.r.hget(key, "status") != b"completed":
                if time.time() > deadline:
                    raise TimeoutError(f"wsrunner: task {tid} did not finish")
                time.sleep(0.0002)
            if i >= 0:
                sent[tid] = t0
        rows = {r[0]: r for r in self.rows()}
        start = [(rows[t][2].timestamp() - t0) * 1000 for t, t0 in sent.items()]
        done = [(rows[t][3].timestamp() - t0) * 1000 for t, t0 in sent.items()]
        return {**quantiles("start", start), **quantiles("done", done)}


def quantiles(name: str, values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {f"{name}_p50_ms": statistics.median(values),
            f"{name}_p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))]}  # fmt: skip


def wsrunner_round(sandbox: bool, workload: str, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="wsr-bench-") as tmp:
        os.chmod(tmp, 0o711)
        w = Wsrunner(sandbox, Path(tmp))
        try:
            return w.throughput(n) if workload == "throughput" else w.latency(n)
        finally:
            w.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--latency-tasks", type=int, default=100)
    parser.add_argument("--only", nargs="*", help="systems to run (default: all)")
    args = parser.parse_args()
    systems = ["wsrunner", "wsrunner+sandbox", *PEERS]
    if args.only:
        systems = [s for s in systems if s in args.only]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for workload, n in (("throughput", args.tasks), ("latency", args.latency_tasks)):
            for i, system in enumerate(systems):  # interleaved: every system in every round
                if system.startswith("wsrunner"):
                    res = wsrunner_round(system.endswith("sandbox"), workload, n)
                else:
                    res = peer_round(system, workload, n, db=5 + i)
                results.setdefault((system, workload), []).append(res)
                print(f"round {rnd + 1} {workload:10} {system:17} "
                      + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in res.items() if k not in ("peer", "workload", "n")),
                      file=sys.stderr, flush=True)  # fmt: skip
    print(
        f"\n{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} CPUs, {args.rounds} rounds; "
        f"throughput: {args.tasks} tasks, concurrency 3; latency: {args.latency_tasks} tasks one at a time"
    )
    print(
        f"{'system':18} {'tasks/s median [range]':>28} {'lost':>5} {'twice':>5} "
        f"{'submit->start p50/p99 ms':>26} {'submit->done p50/p99 ms':>25}"
    )
    best = {}
    for system in systems:
        tp = results.get((system, "throughput"), [])
        lat = results.get((system, "latency"), [])
        rates = [r["tasks_per_s"] for r in tp]
        med = statistics.median(rates) if rates else float("nan")
        best[system] = med
        s50 = statistics.median(r["start_p50_ms"] for r in lat) if lat else float("nan")
        s99 = statistics.median(r["start_p99_ms"] for r in lat) if lat else float("nan")
        d50 = statistics.median(r["done_p50_ms"] for r in lat) if lat else float("nan")
        d99 = statistics.median(r["done_p99_ms"] for r in lat) if lat else float("nan")
        lost = sum(r.get("lost", 0) for r in tp)
        twice = sum(r.get("run_twice") or 0 for r in tp)
        print(
            f"{system:18} {med:>10.1f} [{min(rates):.1f}-{max(rates):.1f}]".ljust(48)
            + f"{lost:>5} {twice:>5} {s50:>12.2f} / {s99:<10.2f} {d50:>10.2f} / {d99:<10.2f}"
        )
    peers = {k: v for k, v in best.items() if not k.startswith("wsrunner")}
    if peers and "wsrunner" in best:
        top = max(peers, key=lambda k: peers[k])
        print(f"\nthroughput ratio wsrunner/{top} (best peer): {best['wsrunner'] / peers[top]:.2f}"
              + (f"; with the sandbox: {best['wsrunner+sandbox'] / peers[top]:.2f}"
                 if "wsrunner+sandbox" in best else ""))  # fmt: skip


if __name__ == "__main__":
    main()
