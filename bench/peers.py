"""wsrunner against peer task queues, and against the machine's limits, in one run: one table.

    .venv/bin/python bench/peers.py [--rounds 3] [--tasks 300] [--latency-tasks 100]
                                    [--drain-tasks 10000] [--subscribers 1000] [--only SYSTEM...]
                                    [--workloads throughput latency drain priority fanout
                                                 fairness limits]

Workloads (issue 6):
1. throughput: tasks whose one step runs `true` (a real fork/exec), queued before the worker
   starts, drained at a concurrency of 3 (first start to last end);
2. latency: an idle worker, one task at a time: submit -> start and submit -> done;
3. drain: --drain-tasks queued, time to empty; tasks lost and tasks run twice are counted;
4. priority: 2,000 low tasks draining; once 100 ran, 100 high ones are queued. Counted: low
   tasks started after that and before the last high one started (or finished);
5. fanout (wsrunner only: the peers have no event streams): --subscribers SSE subscribers on 10
   running tasks, from 4 client processes; delivery latency and the daemon's memory;
6. fairness (wsrunner only: the peers' queues have no tenants, so B waits for every task queued
   before it): tenant A (a token) queues 1,000 tasks (`sleep 0.02`) over 10 workspaces, then
   tenant B one: B's wait, and how many of A's tasks started meanwhile (docs/scheduling.md);
7. limits: the same machine's spawn rate (subprocess, posix_spawn, the sandbox chain), Redis
   round trip and PostgreSQL commit, so each figure can be read as a fraction of them.

All wsrunner tasks of the other workloads are in one workspace, `bench`, allowed to run three at
once (`WSRUNNER_WORKSPACE_CONCURRENCY=3`): the peers' jobs have no workspace to wait for.

`<peer>+pg` is the peer whose job also writes a PostgreSQL record of its task when it starts and
when it ends, as wsrunner does (bench/peers/common.py): a comparison at the same durability, in
the column `wsrunner/best +pg`. The full run includes dramatiq+pg and saq+pg; --only can name any
of them.

`dramatiq+pg+bwrap` is dramatiq+pg whose job runs its command as wsrunner runs a cold sandboxed
one (bench/peers/sandbox.py), compared with wsrunner+sandbox in the column `sandbox/best +bwrap`:
the same durability and the same isolation. Per command it pays what wsrunner's cold launch
does: a cgroup in every hierarchy with the bundled policy's memory, pids and CPU limits (made,
then killed and removed, by wsrunner's cgroups.py), the set-up shell joining them and setting the
rlimits, setpriv to a workspace uid (as root), and bubblewrap with wsrunner's profile (its
mounts, new user/pid/net/ipc/uts/mount namespaces, no capabilities), seccomp filter and memfds.
The chain is wsrunner's own, built by its Sandbox for a bench workspace at the round's start
(`export_cold_chain`), so the job does not look up per command what wsrunner's launch does (the
workspace's owner and protected paths) and gets no more than the daemon around it (no command
policy, no quota check, no output capture; as for every peer, `true` runs without a shell).
wsrunner itself starts a command in its workspace's warm sandbox by default; Dramatiq has none,
so every command of this peer builds its sandbox cold.

Every system uses the same Redis (its own database or key prefix) and one worker process (RQ:
its pool of 3 work horses). The peers are installed from PyPI into bench/.venv and
bench/.venv-celery (Celery needs redis-py 6, arq 5) on first use. wsrunner keeps a PostgreSQL
record of every task; it is measured with the sandbox off (policy `require: none`) and on.
Rounds are interleaved; the median and the range of the rounds are printed. Nothing is asserted:
this prints numbers.
"""

from __future__ import annotations

import argparse
import base64
import itertools
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
import trio
from machine import cpu_s, machine_busy_s  # bench/, the script's directory
from sandbox_overhead import Bench

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
# saq 0.26.4 imports typing_extensions without declaring it.
PINS = {
    ".venv": [
        "dramatiq[redis]==2.2.1",
        "saq==0.26.4",
        "typing-extensions==4.16.0",
        "rq==3.0.0",
        "arq==0.28.0",
        "psycopg[binary]==3.3.9",
    ],
    ".venv-celery": ["celery[redis]==5.7.0"],
}


def peer_python(venv: str) -> Path:
    """The venv's python, made first, and given the pins when they changed since."""
    py = ROOT / "bench" / venv / "bin" / "python"
    stamp, wanted = ROOT / "bench" / venv / ".pins", "\n".join(PINS[venv])
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        for pin in PINS[venv]:  # one at a time: pip's resolver trips over them together
            subprocess.run([str(py), "-m", "pip", "install", "-q", pin], check=True)
        stamp.write_text(wanted)
    return py


#: bubblewrap's options whose value is a descriptor, of those wsrunner's launch uses
FD_OPTIONS = {
    "--args",
    "--ro-bind-data",
    "--seccomp",
    "--bind-fd",
    "--ro-bind-fd",
    "--info-fd",
    "--block-fd",
}


def export_cold_chain(tmp: Path) -> Path:
    """wsrunner's cold launch of a command (network none, the bundled policy) in a workspace
    under `tmp`, written as the template bench/peers/sandbox.py runs; its path.

    What is new for every command becomes a token: the command, its cgroup.procs files, and
    each descriptor bubblewrap reads (its data files and the argument file that names them).
    """
    volume = tmp / "volume"
    volume.mkdir(mode=0o711)

    async def launch() -> tuple[Bench, list[str], dict[str, str], dict[int, bytes]]:
        bench = await Bench.open(volume)
        if (refused := bench.sandbox.isolation.refusal("full")) is not None:
            raise refused
        async with bench.launch(["{command}"], network="none") as cold:
            files = {fd: os.pread(fd, os.fstat(fd).st_size, 0) for fd in cold.pass_fds}
            return bench, cold.argv, cold.env, files

    bench, argv, env, files = trio.run(launch)
    argfile = int(argv[argv.index("--args") + 1])
    order = [*(fd for fd in files if fd != argfile), argfile]  # the argument file names the rest
    used: set[int] = set()

    def template(items: list[str]) -> list[str]:
        out = []
        for before, item in itertools.pairwise(["", *items]):
            if before in FD_OPTIONS:
                used.add(fd := int(item))
                item = f"{{fd{order.index(fd)}}}"
            out.append(item)
        return out

    setup = argv[: argv.index("--")]
    procs = [i for i, item in enumerate(setup) if item.endswith("/cgroup.procs")]
    hierarchies = bench.sandbox.isolation.cgroups.hierarchies
    assert len(procs) == len(hierarchies), (procs, hierarchies)
    if procs:
        argv = [*argv[: procs[0]], "{cgroup.procs}", *argv[procs[-1] + 1 :]]
    args = [os.fsdecode(a) for a in files[argfile].split(b"\0")[:-1]]
    spec = {
        "argv": template(argv),
        "env": env,
        "files": [
            {"args": template(args)}
            if fd == argfile
            else {"data": base64.b64encode(files[fd]).decode()}
            for fd in order
        ],
        "cgroups": [
            {
                "kind": h.kind,
                "base": h.base,
                "controllers": sorted(h.controllers),
                "kill": h.can_kill,
            }
            for h in hierarchies
        ],
        "limits": {
            "memory": bench.policy.limits.memory_bytes,
            "pids": bench.policy.limits.pids,
            "cpus": bench.policy.limits.cpus,
        },
    }
    assert used == set(files), f"descriptors not found in the launch: {set(files) - used}"
    (path := tmp / "cold-chain.json").write_text(json.dumps(spec))
    return path


def peer_round(system: str, workload: str, n: int, db: int) -> dict[str, Any]:
    """One round of a peer; `<peer>+pg` is the peer whose job also keeps a PostgreSQL record
    of its task (bench/peers/common.py), in a table of its own, dropped afterwards, and
    `<peer>+pg+bwrap` one whose job also runs its command through wsrunner's cold sandbox."""
    with tempfile.TemporaryDirectory(prefix="wsr-bench-") as tmp:
        os.chmod(tmp, 0o711)  # the workspace's uid goes through
        return _peer_round(system, workload, n, db, Path(tmp))


def _peer_round(system: str, workload: str, n: int, db: int, tmp: Path) -> dict[str, Any]:
    peer, *extras = system.split("+")
    env = {**os.environ, "BENCH_REDIS_URL": f"{REDIS_URL}/{db}", "PYTHONPATH": str(ROOT)}
    if "bwrap" in extras:
        env["BENCH_PEER_SANDBOX"] = str(export_cold_chain(tmp))
    table = None
    if "pg" in extras:
        table = f"bench_peer_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(DATABASE_URL, autocommit=True) as c:
            c.execute(
                f"CREATE TABLE {table} (id TEXT PRIMARY KEY, status TEXT NOT NULL, "  # type: ignore[arg-type]
                "started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ, result JSONB)"
            )
            c.execute(f"CREATE INDEX ON {table} (status)")  # type: ignore[arg-type]
        env |= {"BENCH_PEER_DATABASE_URL": DATABASE_URL, "BENCH_PEER_TABLE": table}
    try:
        out = subprocess.run(
            [str(peer_python(PEERS[peer])), "-m", "bench.peer_round", peer, workload, str(n)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
        )
    finally:
        if table is not None:
            with psycopg.connect(DATABASE_URL, autocommit=True) as c:
                c.execute(f"DROP TABLE {table}")  # type: ignore[arg-type]
    if out.returncode != 0:  # reported in the table, not fatal to the whole run
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{peer} {workload} failed: {out.stderr[-2000:]}", file=sys.stderr)
        return {"skipped": f"failed: {last[:60]}"}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


class Wsrunner:
    """A `wsrunner serve` process on Redis + PostgreSQL, fed like the reference producers."""

    def __init__(self, sandbox: bool, tmp: Path) -> None:
        self.sandbox = sandbox
        self.tmp = tmp
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.schema = f"bench_{uuid.uuid4().hex[:8]}"
        self.r = redis.Redis.from_url(f"{REDIS_URL}/0")
        policy = (ROOT / "policies" / "default.yaml").read_text()
        if not sandbox:
            policy = policy.replace("require: full", "require: none")
        (tmp / "policy.yaml").write_text(policy)
        self.env = {
            **os.environ,
            "REDIS_URL": f"{REDIS_URL}/0",
            "DATABASE_URL": DATABASE_URL,
            "WSRUNNER_REDIS_PREFIX": self.prefix,
            "WSRUNNER_DATABASE_SCHEMA": self.schema,
            "WORKSPACE_VOLUME_PATH": str(tmp / "volume"),
            "WORKER_CONCURRENCY": "3",
            # Every task here is in the workspace `bench`: let it run three at once, as the
            # peers' jobs do (one writer per workspace is measured by the fairness workload).
            "WSRUNNER_WORKSPACE_CONCURRENCY": "3",
            "WSRUNNER_FRONTEND": "none",
            "POLICY_FILE": str(tmp / "policy.yaml"),
            "WSRUNNER_SANDBOX": "auto" if sandbox else "off",
            "LOG_LEVEL": "WARNING",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def push(
        self,
        n: int,
        priority: str = "normal",
        command: str = "true",
        pipe: Any = None,
        *,
        token: str | None = None,
        workspaces: int = 0,
    ) -> list[str]:
        """Queue `n` tasks as the reference producers do (LPUSH), or add the LPUSH to `pipe`;
        with `token`, as that API token's (its tenant), spread over `workspaces` of its own."""
        ids = [str(uuid.uuid4()) for _ in range(n)]
        now = datetime.now(UTC).isoformat()
        payloads = [
            json.dumps(
                {
                    "task_id": t,
                    "task_type": "background_job",
                    "workspace_id": f"{token}-{i % workspaces}" if token else "bench",
                    "priority": priority,
                    "timeout_seconds": 60,
                    "created_at": now,
                    "steps": [{"action": "execute_command", "command": command}],
                    **({"token_id": token} if token else {}),
                }
            )
            for i, t in enumerate(ids)
        ]
        for i in range(0, n, 1000):
            (pipe or self.r).lpush(f"{self.prefix}:tasks:{priority}", *payloads[i : i + 1000])
        return ids

    def start(self, profile: str | None = None, **extra: str) -> None:
        """Start the daemon, with `extra` in its environment; under cProfile into `profile`."""
        self.env.update(extra)
        python = [str(ROOT / ".venv" / "bin" / "python")]
        if profile is not None:
            python += ["-m", "cProfile", "-o", profile]
        self.proc = subprocess.Popen(
            [*python, "-m", "wsrunner", "serve"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

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

    def completed(self) -> int:
        with psycopg.connect(DATABASE_URL, autocommit=True) as c:
            try:
                row = c.execute(
                    f'SELECT count(*) FROM "{self.schema}".task_executions '
                    "WHERE status = 'completed'"
                ).fetchone()
            except psycopg.errors.UndefinedTable:
                return 0
        return int(row[0]) if row else 0

    def throughput(self, n: int) -> dict[str, Any]:
        self.push(n)
        self.start()
        deadline = time.time() + 900
        while (done0 := self.completed()) == 0 and time.time() < deadline:
            time.sleep(0.01)
        busy0 = machine_busy_s()  # from the first end on, as for the peers
        while self.completed() < n and time.time() < deadline:
            time.sleep(0.2)
        busy = machine_busy_s() - busy0
        time.sleep(0.5)
        rows = self.rows()
        done = [r for r in rows if r[1] == "completed"]
        span = (max(r[3] for r in done) - min(r[2] for r in done)).total_seconds()
        return {
            "tasks_per_s": len(done) / span,
            "lost": n - len(done),
            "machine_cpu_ms_per_task": busy / max(1, n - done0) * 1000,
            "run_twice": sum(1 for r in rows if r[4] > 1),
        }

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

    def priority(self, n_low: int) -> dict[str, Any]:
        low = self.push(n_low, "low")
        self.start()
        while self.completed() < 100:
            time.sleep(0.01)
        t_high = time.time()
        # The highs and a look at the low queue in one MULTI: lows still queued then were
        # claimed after the highs were visible (the low queue is FIFO, pushed in order).
        with self.r.pipeline(transaction=True) as pipe:
            high = set(self.push(100, "high", pipe=pipe))
            pipe.llen(f"{self.prefix}:tasks:low")  # not yet read into the line
            pipe.get(f"{self.prefix}:turns:low:count")  # in the line (docs/scheduling.md)
            *_, arrived, in_line = pipe.execute()
        low_left = int(arrived) + int(in_line or 0)
        claimed_after = set(low[len(low) - int(low_left) :])
        while True:
            rows = {r[0]: r for r in self.rows()}
            if all(rows.get(t, (0, ""))[1] == "completed" for t in high):
                break
            time.sleep(0.05)
        last_start = max(rows[t][2].timestamp() for t in high)
        last_done = max(rows[t][3].timestamp() for t in high)
        lows = [rows[t][2].timestamp() for t in low if t in rows and rows[t][2] is not None]
        lows = [v for v in lows if v > t_high]
        after = [rows[t][2].timestamp() for t in claimed_after if t in rows and rows[t][2]]
        return {
            "low_before_last_high_start": sum(v < last_start for v in lows),
            "low_before_last_high_done": sum(v < last_done for v in lows),
            "low_claimed_after_high_pushed_started_first": sum(v < last_start for v in after),
        }

    def fairness(self, n: int) -> dict[str, Any]:
        """Tenant A (a token, 10 workspaces) queues `n` tasks, then tenant B one: how long B
        waits, and how many of A's start meanwhile. First in, first out, B would wait for
        all `n`."""
        a_tasks = self.push(n, command="sleep 0.02", token="aaaaaaaaaaaa", workspaces=10)
        self.start(WSRUNNER_WORKSPACE_CONCURRENCY="1")
        while self.completed() < 30:
            time.sleep(0.01)
        pushed = time.time()
        [b_task] = self.push(1, token="bbbbbbbbbbbb", workspaces=1)
        while True:
            rows = {r[0]: r for r in self.rows()}
            if rows.get(b_task, (0, ""))[1] == "completed":
                break
            time.sleep(0.01)
        b_start = rows[b_task][2].timestamp()
        a_runs = [
            (rows[t][3] - rows[t][2]).total_seconds()
            for t in a_tasks
            if rows.get(t, (0, ""))[1] == "completed"
        ]
        return {
            "b_wait_ms": (b_start - pushed) * 1000,
            "a_started_meanwhile": sum(
                1
                for t in a_tasks
                if t in rows and rows[t][2] and pushed < rows[t][2].timestamp() < b_start
            ),
            "a_task_ms": statistics.median(a_runs) * 1000,
            "a_left_when_b_started": sum(
                1
                for t in a_tasks
                if t not in rows or not rows[t][2] or rows[t][2].timestamp() > b_start
            ),
        }

    def fanout(self, subscribers: int, clients: int = 4) -> dict[str, Any]:
        """SSE subscribers on 10 running tasks that print a line every 50 ms for 6 s."""
        port = _free_port()
        self.start(
            WSRUNNER_FRONTEND="frontend",
            PUBLIC_API_PORT=str(port),
            PUBLIC_API_HOST="127.0.0.1",
            WORKER_HEALTH_PORT=str(_free_port()),
            WORKER_INTERNAL_TOKEN="bench",
            WORKER_CONCURRENCY="10",
        )
        token = subprocess.run(
            [
                str(ROOT / ".venv" / "bin" / "wsrunner"),
                "tokens",
                "create",
                "--name",
                "bench",
                "--all-workspaces",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert self.proc is not None
        time.sleep(1.0)
        idle_rss = _rss(self.proc.pid)
        cpu0, wall0 = cpu_s(f"/proc/{self.proc.pid}/stat"), time.monotonic()
        ids = self.push(
            10, command="i=0; while [ $i -lt 120 ]; do echo line $i; sleep 0.05; i=$((i+1)); done"
        )
        while (states := [r[1] for r in self.rows()]).count("running") < 10:
            if any(s not in ("queued", "running") for s in states):
                raise RuntimeError(f"fanout: a task ended before the subscribers came: {states}")
            time.sleep(0.02)
        per = subscribers // clients
        outs = [self.tmp / f"sse-{k}.json" for k in range(clients)]
        procs = [
            subprocess.Popen(
                [
                    str(ROOT / ".venv" / "bin" / "python"),
                    str(ROOT / "bench" / "sse_clients.py"),
                    str(out),
                    "127.0.0.1",
                    str(port),
                    token,
                    str(per),
                    *ids,
                ]
            )
            for out in outs
        ]
        peak = idle_rss
        while any(p.poll() is None for p in procs):
            peak = max(peak, _rss(self.proc.pid))
            time.sleep(0.1)
        results = [json.loads(out.read_text()) for out in outs]
        daemon_cpu = (cpu_s(f"/proc/{self.proc.pid}/stat") - cpu0) / (time.monotonic() - wall0)
        latencies = sorted(x for r in results for x in r["latencies_ms"])
        return {
            "connected": sum(r["connected"] for r in results),
            "ended": sum(r["ended"] for r in results),
            "errors": sum(len(r["errors"]) for r in results),
            "events": len(latencies),
            **quantiles("delivery", latencies),
            "daemon_cpu_share": daemon_cpu,
            "idle_rss_mib": idle_rss / 2**20,
            "peak_rss_mib": peak / 2**20,
        }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def quantiles(name: str, values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        f"{name}_p50_ms": statistics.median(values),
        f"{name}_p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))],
    }


def wsrunner_round(sandbox: bool, workload: str, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="wsr-bench-") as tmp:
        os.chmod(tmp, 0o711)
        w = Wsrunner(sandbox, Path(tmp))
        try:
            run = {
                "throughput": w.throughput,
                "drain": w.throughput,
                "latency": w.latency,
                "priority": w.priority,
                "fanout": w.fanout,
                "fairness": w.fairness,
            }[workload]
            return run(n)
        finally:
            w.stop()


def limits(runs: int = 300) -> dict[str, float]:
    """What the machine allows, measured now: spawns per second, Redis and PostgreSQL round trips."""
    out: dict[str, float] = {}
    t = time.perf_counter()
    for _ in range(runs):
        subprocess.run(["/bin/true"], check=True)
    out["subprocess_spawns_per_s"] = runs / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(runs):
        pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
        os.waitpid(pid, 0)
    out["posix_spawns_per_s"] = runs / (time.perf_counter() - t)
    chain = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "python"),
            str(ROOT / "bench" / "sandbox_overhead.py"),
            "--runs",
            "100",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out["sandbox_spawns_per_s"] = 1000 / json.loads(chain.stdout)["sandbox_median_ms"]
    r = redis.Redis.from_url(f"{REDIS_URL}/0")
    samples = []
    for _ in range(2000):
        t = time.perf_counter()
        r.ping()
        samples.append(time.perf_counter() - t)
    out["redis_roundtrip_us"] = statistics.median(samples) * 1e6
    with psycopg.connect(DATABASE_URL) as c:
        c.execute("CREATE TEMP TABLE bench_commit (x int)")
        c.commit()
        samples = []
        for _ in range(500):
            t = time.perf_counter()
            c.execute("INSERT INTO bench_commit VALUES (1)")
            c.commit()
            samples.append(time.perf_counter() - t)
    out["postgres_commit_us"] = statistics.median(samples) * 1e6
    return out


WORKLOADS = ["throughput", "latency", "drain", "priority", "fanout", "fairness", "limits"]
#: What each workload reports, in the table: (key, label, lower is better, format)
METRICS: dict[str, list[tuple[str, str, bool, str]]] = {
    "throughput": [
        ("tasks_per_s", "tasks/s, concurrency 3", False, ".1f"),
        ("machine_cpu_ms_per_task", "machine CPU ms per task", True, ".2f"),
    ],
    "latency": [
        ("start_p50_ms", "submit -> start p50 ms", True, ".2f"),
        ("start_p99_ms", "submit -> start p99 ms", True, ".2f"),
        ("done_p50_ms", "submit -> done p50 ms", True, ".2f"),
        ("done_p99_ms", "submit -> done p99 ms", True, ".2f"),
    ],
    "drain": [
        ("tasks_per_s", "drain tasks/s", False, ".1f"),
        ("machine_cpu_ms_per_task", "drain: machine CPU ms per task", True, ".2f"),
        ("lost", "drain: lost", True, "d"),
        ("run_twice", "drain: run twice", True, "d"),
    ],
    "priority": [
        (
            "low_claimed_after_high_pushed_started_first",
            "low claimed after the highs, started first",
            True,
            "d",
        ),
        ("low_before_last_high_start", "low started before last high started", True, "d"),
        ("low_before_last_high_done", "low started before last high finished", True, "d"),
    ],
    "fanout": [
        ("delivery_p50_ms", "SSE delivery p50 ms", True, ".1f"),
        ("delivery_p99_ms", "SSE delivery p99 ms", True, ".1f"),
        ("connected", "SSE subscribers connected", False, "d"),
        ("peak_rss_mib", "daemon peak RSS MiB", True, ".0f"),
    ],
    "fairness": [
        ("b_wait_ms", "fairness: B's wait ms (A queued 1,000)", True, ".1f"),
        ("a_started_meanwhile", "fairness: A's tasks started meanwhile", True, "d"),
        ("a_left_when_b_started", "fairness: A's tasks still waiting then", False, "d"),
        ("a_task_ms", "fairness: one A task, start to end ms", True, ".1f"),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--latency-tasks", type=int, default=100)
    parser.add_argument("--drain-tasks", type=int, default=10_000)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--only", nargs="*", help="systems to run (default: all)")
    parser.add_argument("--workloads", nargs="*", default=WORKLOADS, choices=WORKLOADS)
    args = parser.parse_args()
    # The two fastest peers again with the same PostgreSQL record as wsrunner (any `<peer>+pg`
    # can be named with --only), and Dramatiq's again with wsrunner's sandbox too.
    systems = ["wsrunner", "wsrunner+sandbox", *PEERS, "dramatiq+pg", "saq+pg", "dramatiq+pg+bwrap"]
    if args.only:
        known = dict.fromkeys([*systems, *(f"{p}+pg" for p in PEERS)])
        systems = [s for s in known if s in args.only]
    sizes = {
        "throughput": args.tasks,
        "latency": args.latency_tasks,
        "drain": args.drain_tasks,
        "priority": 2000,
        "fanout": args.subscribers,
        "fairness": 1000,
    }
    rounds = {"drain": 1, "priority": 1, "fanout": 1, "fairness": 1}  # long ones: once
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    machine: dict[str, float] = {}
    for rnd in range(args.rounds):
        for workload in [w for w in args.workloads if w != "limits"]:
            if rnd >= rounds.get(workload, args.rounds):
                continue
            for i, system in enumerate(systems):  # interleaved: every system in every round
                if system.startswith("wsrunner"):
                    if workload in ("fanout", "fairness") and system.endswith("sandbox"):
                        continue  # the sandbox changes nothing about event delivery, or turns
                    res = wsrunner_round(system.endswith("sandbox"), workload, sizes[workload])
                elif workload == "fanout":
                    continue
                elif workload == "fairness":  # a peer's queue has no tenants: B is last
                    res = {"skipped": "first in, first out: B waits for all of A's tasks"}
                elif workload == "drain" and system == "arq":
                    # Its default 0.5 s poll delay gives 6 tasks/s: 10,000 would take 28 minutes.
                    res = {"skipped": "arq: 6 tasks/s at its default poll delay"}
                else:
                    res = peer_round(system, workload, sizes[workload], db=5 + i)
                results.setdefault((system, workload), []).append(res)
                print(
                    f"round {rnd + 1} {workload:10} {system:17} "
                    + " ".join(
                        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in res.items()
                        if k not in ("peer", "workload", "n")
                    ),
                    file=sys.stderr,
                    flush=True,
                )
        if rnd == 0 and "limits" in args.workloads:
            machine = limits()
            print(f"limits {machine}", file=sys.stderr, flush=True)
    print_table(systems, results, machine, args)


def print_table(
    systems: list[str],
    results: dict[tuple[str, str], list[dict[str, Any]]],
    machine: dict[str, float],
    args: argparse.Namespace,
) -> None:
    print(
        f"\n{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
        f"median of {args.rounds} rounds [range] where a workload ran more than once"
    )
    peers = [s for s in systems if not s.startswith("wsrunner")]
    # Each ratio column: its label, which wsrunner, and the peers it is compared with.
    columns = [
        ("wsrunner/best peer", "wsrunner", [s for s in peers if "+" not in s]),
        # the peers given the same record
        ("wsrunner/best +pg", "wsrunner", [s for s in peers if s.endswith("+pg")]),
        # ... and the same sandbox
        ("sandbox/best +bwrap", "wsrunner+sandbox", [s for s in peers if s.endswith("+bwrap")]),
    ]
    columns = [c for c in columns if c[2]]
    head = f"{'metric':40}" + "".join(f"{s:>20}" for s in [*systems, *(c[0] for c in columns)])
    print(head)
    for workload, metrics in METRICS.items():
        for key, label, lower, fmt in metrics:
            cells, medians = [], {}
            for system in systems:
                values = [r[key] for r in results.get((system, workload), []) if key in r]
                if not values:
                    skipped = [r.get("skipped") for r in results.get((system, workload), [])]
                    cells.append("n/a" if any(skipped) else "-")
                    continue
                med = statistics.median(values)
                medians[system] = med
                text = format(med, fmt) if fmt != "d" else str(int(med))
                if len(values) > 1 and fmt != "d":
                    text += f" [{format(min(values), fmt)}-{format(max(values), fmt)}]"
                cells.append(text)
            if not any(c not in ("-", "n/a") for c in cells):
                continue
            ratios = [
                _ratio(medians, ours, group, lower=lower, fmt=fmt) for _, ours, group in columns
            ]
            print(f"{label:40}" + "".join(f"{c:>20}" for c in [*cells, *ratios]))
    for key, value in machine.items():
        print(f"{'machine: ' + key:40}{value:>20.1f}")
    if "drain" in args.workloads:
        print(
            f"(drain: {args.drain_tasks} tasks; priority: 2,000 low then 100 high; "
            f"fanout: {args.subscribers} subscribers on 10 tasks)"
        )


def _ratio(medians: dict[str, float], ours: str, group: list[str], *, lower: bool, fmt: str) -> str:
    """The median of `ours` over the best of `group`'s ("" when there is nothing to compare)."""
    best = [medians[p] for p in group if p in medians]
    if not best or ours not in medians or fmt == "d":
        return ""
    top = min(best) if lower else max(best)
    return f"{medians[ours] / top:.2f}" if top else ""


if __name__ == "__main__":
    main()
