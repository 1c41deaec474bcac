"""Real daemons in their own processes, against real Redis and PostgreSQL, broken on purpose.

`Daemon` runs `python -m wsrunner serve` with its own Redis key prefix and PostgreSQL schema
(the per-test ones of tests/conftest.py), a short lease and grace, and HTTP on free ports.
`PrivateRedis` and `PrivatePostgres` are servers of this test alone, for the scenarios that
restart them: the shared services other tests use are never touched.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from tests.conftest import (
    DATABASE_URL,
    REDIS_URL,
    exit_code,
    free_port,
    traversable,
    wait_for,
)

PERMISSIVE = """\
apiVersion: wsrunner/v1
kind: Policy
metadata: {name: reliability}
spec:
  sandbox: {require: full, network: none}
  limits: {memory: 256MiB, pids: 64, timeoutSeconds: 120, stdoutBytes: 1MiB, stderrBytes: 1MiB}
  rules:
    - {id: anything, action: allow, commands: ["*"]}
"""
TERMINAL = {"completed", "failed", "timed_out", "cancelled"}


class Daemon:
    """One `wsrunner serve` process, with a token for its public API."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.public = f"http://127.0.0.1:{env['PUBLIC_API_PORT']}"
        self.internal = f"http://127.0.0.1:{env['WORKER_HEALTH_PORT']}"
        self.env = env
        self.log = Path(env["WORKSPACE_VOLUME_PATH"]).parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wsrunner", "serve"], env=self.env, stdout=log, stderr=log
            )

    async def ready(self, timeout: float = 30) -> None:
        async with httpx.AsyncClient() as client:

            async def up() -> bool:
                assert self.proc is not None and self.proc.poll() is None, self.logs()
                try:
                    return (await client.get(f"{self.internal}/livez")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(up, timeout=timeout, poll=0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM, and its exit status (a second SIGTERM would mean "stop at once")."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return await exit_code(self.proc, timeout=timeout)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


class Deployment:
    """Daemons that share one Redis prefix, one schema and one volume, and a bearer token."""

    def __init__(
        self, tmp: Path, prefix: str, schema: str, redis_url: str, database_url: str
    ) -> None:
        self.tmp = tmp
        self.volume = tmp / "volume"
        self.volume.mkdir()
        self.volume.chmod(0o711)
        (tmp / "policy.yaml").write_text(PERMISSIVE)
        self.prefix, self.schema = prefix, schema
        self.redis_url, self.database_url = redis_url, database_url
        self.daemons: list[Daemon] = []
        self.token = ""

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
            "WSRUNNER_REDIS_PREFIX": self.prefix,
            "WSRUNNER_DATABASE_SCHEMA": self.schema,
            "WORKSPACE_VOLUME_PATH": str(self.volume),
            "WORKER_ID": name,
            "POLICY_FILE": str(self.tmp / "policy.yaml"),
            "POLICY_DIR": str(self.tmp / "policy.d"),
            "WORKER_INTERNAL_TOKEN": "reliability-internal",
            "PUBLIC_API_HOST": "127.0.0.1",
            "PUBLIC_API_PORT": str(free_port()),
            "WORKER_HEALTH_PORT": str(free_port()),
            "WSRUNNER_HEARTBEAT_INTERVAL": "0.5",
            "WSRUNNER_LEASE_TTL": "2",
            "WSRUNNER_RECONCILE_INTERVAL": "1",
            "WSRUNNER_SHUTDOWN_GRACE": "5",
            "WSRUNNER_KILL_GRACE": "0.5",
            "WORKER_CONCURRENCY": "3",
            # Most tasks here share the workspace ws-1 and are meant to run side by side (the
            # one-writer rule has its own tests in tests/integration/test_turns.py).
            "WSRUNNER_WORKSPACE_CONCURRENCY": "8",
            "LOG_LEVEL": "INFO",
            **extra,
        }

    async def start(self, name: str, **extra: str) -> Daemon:
        daemon = Daemon(name, self.env(name, **extra))
        daemon.start()
        self.daemons.append(daemon)
        await daemon.ready()
        if not self.token:
            made = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "wsrunner",
                    "tokens",
                    "create",
                    "--name",
                    "reliability",
                    "--all-workspaces",
                ],
                env=daemon.env,
                capture_stdout=True,
            )
            self.token = made.stdout.decode().strip()
        return daemon

    def client(self, daemon: Daemon, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=daemon.public,
            timeout=30,
            headers={"Authorization": f"Bearer {self.token}"},
            **kwargs,
        )

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every task record, by id, read straight from PostgreSQL."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            cur.execute(f'SELECT * FROM "{self.schema}".task_executions')
            return {str(r["id"]): r for r in cur.fetchall()}

    async def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            rows = self.rows()
            return rows if all(rows.get(i, {}).get("status") in TERMINAL for i in ids) else None

        try:
            return await wait_for(lambda: trio.to_thread.run_sync(done), timeout=timeout, poll=0.25)
        except BaseException:
            rows = self.rows()
            stuck = {
                i: rows.get(i, {}).get("status")
                for i in ids
                if rows.get(i, {}).get("status") not in TERMINAL
            }
            logs = "\n".join(f"--- {d.name}\n{d.logs()}" for d in self.daemons)
            raise AssertionError(
                f"not terminal: {dict(list(stuck.items())[:10])}\n{logs}"
            ) from None

    async def close(self) -> None:
        for daemon in self.daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


def assert_complete(row: dict[str, Any], *, stdout: str | None = None) -> None:
    """A completed task's record holds everything: times, worker, attempts and step results."""
    assert row["status"] == "completed", (row["status"], row["error_message"])
    assert row["started_at"] and row["completed_at"] and row["worker_id"]
    assert row["execution_time_ms"] is not None and row["attempts"] >= 1
    steps = row["result"]["result"]["steps"]
    assert steps and all("error" not in s["result"] for s in steps), steps
    if stdout is not None:
        assert steps[-1]["result"]["stdout"] == stdout


@pytest.fixture
async def deployment(tmp_path: Path, prefix: str, schema: str) -> AsyncIterator[Deployment]:
    traversable(tmp_path)  # the workspaces' own uids must reach the volume
    dep = Deployment(tmp_path, prefix, schema, REDIS_URL, DATABASE_URL)
    try:
        yield dep
    finally:
        await dep.close()


class PrivatePostgres:
    """A PostgreSQL cluster of one test (initdb as the postgres user), on a free port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsr-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        assert bins, "PostgreSQL server binaries not found under /usr/lib/postgresql"
        self.bin = Path(bins[-1])
        self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.dir / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True)

    def start(self) -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-w",
            "-l",
            str(self.dir / "log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop"
        )

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def unique_id() -> str:
    return uuid.uuid4().hex[:12]
