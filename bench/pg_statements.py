"""What PostgreSQL spends on the two statements of every task (start, end), without the daemon.

    .venv/bin/python bench/pg_statements.py [--tasks 3000] [--async-commit] [--drop-index NAME]

Runs the daemon's own `start_task` and `finish_task` statements (prepared, as `wsrunner.backends.postgres.libpq`
runs them) for --tasks new task ids, one connection, in a schema of its own made by the
migrations (removed afterwards), and prints the server process's CPU time and the wall time per
task. `--async-commit` sets synchronous_commit=off for the session (the commits then skip the
WAL flush; the daemon never does this); `--drop-index` leaves an index out, to see its share.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

import psycopg
from machine import cpu_s  # bench/, the script's directory

from wsrunner.backends.postgres.store import Q

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "wsrunner" / "backends" / "postgres" / "sql" / "migrations"
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
CONFIGURATION = json.dumps({"steps": [{"action": "execute_command", "command": "true"}]})
RESULT = json.dumps(
    {
        "status": "completed",
        "execution_time_ms": 2,
        "result": {
            "steps": [
                {
                    "step": 1,
                    "action": "execute_command",
                    "result": {
                        "exit_code": 0,
                        "stdout": "",
                        "stderr": "",
                        "duration_ms": 1,
                        "truncated": False,
                    },
                }
            ],
            "workspace_id": "bench",
            "repos_cached": [],
        },
    }
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--async-commit", action="store_true")
    parser.add_argument("--drop-index", action="append", default=[], metavar="NAME")
    args = parser.parse_args()
    schema = f"bench_pg_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            with psycopg.connect(
                DATABASE_URL, autocommit=True, options=f"-c search_path={schema}"
            ) as conn:
                migrations = sorted(MIGRATIONS.glob("*.sql"))
                if not migrations:
                    raise SystemExit(f"no migrations in {MIGRATIONS}")
                for migration in migrations:
                    conn.execute(migration.read_text())  # type: ignore[arg-type]
                for index in args.drop_index:
                    conn.execute(f'DROP INDEX "{index}"')  # type: ignore[arg-type]
                if args.async_commit:
                    conn.execute("SET synchronous_commit = off")
                print(
                    _run(conn, args.tasks),
                    "|",
                    "async commit" if args.async_commit else "synchronous commit",
                    "| without: " + (", ".join(args.drop_index) or "-"),
                )
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _run(conn: psycopg.Connection, tasks: int) -> str:  # type: ignore[type-arg]
    pg = conn.pgconn
    for name in (b"start_task", b"finish_task"):
        prepared = pg.prepare(name, Q[name.decode()].encode())
        if prepared.status != psycopg.pq.ExecStatus.COMMAND_OK:
            raise SystemExit((prepared.error_message or b"").decode())
    server = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
    cpu0, wall0 = cpu_s(f"/proc/{server}/stat"), time.perf_counter()
    for _ in range(tasks):
        tid = str(uuid.uuid4()).encode()
        for name, params in (
            (
                b"start_task",
                [
                    tid,
                    b"w1",
                    b"30",
                    b"{queued}",
                    b"bench",
                    b"background_job",
                    CONFIGURATION.encode(),
                    b"normal",
                    b"60",
                    None,
                    None,
                    None,
                    b"/v/bench",
                ],
            ),
            (b"finish_task", [tid, b"completed", b"{running}", b"w1", RESULT.encode(), None, b"2"]),
        ):
            res = pg.exec_prepared(name, params)
            if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
                raise SystemExit((res.error_message or b"").decode())
    cpu, wall = cpu_s(f"/proc/{server}/stat") - cpu0, time.perf_counter() - wall0
    return (
        f"{tasks} tasks: PostgreSQL CPU {cpu / tasks * 1000:.3f} ms per task, "
        f"wall {wall / tasks * 1000:.3f} ms per task (two statements, two commits)"
    )


if __name__ == "__main__":
    main()
