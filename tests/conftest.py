"""Fixtures: real Redis and PostgreSQL, isolated per test by key prefix and schema."""

from __future__ import annotations

# trio_asyncio patches asyncio at import; psycopg must be imported after it.
import trio_asyncio  # noqa: F401  # isort: skip
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import trio
from psycopg import sql

from wsrunner.daemon import Daemon, run_daemon
from wsrunner.errors import NotFoundError
from wsrunner.settings import Settings

# A host with wsrunner installed must not lend its /etc/wsrunner to the tests (nor the tests'
# subprocesses): the installed layout is looked for below this root instead.
os.environ["WSRUNNER_SYSTEM_ROOT"] = "/nonexistent/wsrunner-tests"

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(name="redis_client")
def _redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(name="prefix")
def _prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"wsrtest-{uuid.uuid4().hex[:10]}"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        redis_client.unlink(*keys)


@pytest.fixture(name="schema")
def _schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own; dropped afterwards."""
    name = f"wsrtest_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def traversable(path: Path) -> Path:
    """Let other uids pass through `path` and its parents (pytest makes them 0700), as the
    workspaces' own uids must to reach the volume and file:// remotes."""
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(stat.S_IMODE(mode) | stat.S_IXOTH | stat.S_IXGRP)
    return path


@pytest.fixture(name="settings")
def _settings(tmp_path: Path, prefix: str, schema: str) -> Settings:
    traversable(tmp_path)
    return Settings(
        worker_id=f"test-{uuid.uuid4().hex[:8]}",
        concurrency=2,
        redis_url=REDIS_URL,
        redis_prefix=prefix,
        database_url=DATABASE_URL,
        database_schema=schema,
        volume_path=tmp_path / "volume",
        frontend="none",
        health_port=0,
        heartbeat_interval_s=0.5,
        lease_ttl_s=2.0,
        reconcile_interval_s=1.0,
        shutdown_grace_s=1.0,
        kill_grace_s=0.5,
        git_schemes=("https", "ssh", "file"),
    )


HANG_REPORT_S = 240.0


def _task_tree(task: trio.lowlevel.Task, depth: int = 0) -> list[str]:
    """One line per trio task: its name and where it waits (the innermost frames)."""
    frames, coro = [], task.coro
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            frames.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    lines = ["  " * depth + f"{task.name}  @ " + " > ".join(frames[-5:])]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            lines += _task_tree(child, depth + 1)
    return lines


@pytest.fixture(name="start_daemon")
async def _start_daemon(
    settings: Settings, pytestconfig: pytest.Config
) -> AsyncIterator[Callable[..., Any]]:
    """start_daemon(**overrides) -> Daemon; every daemon started is stopped gracefully after.

    If the test is still running after HANG_REPORT_S, a thread prints the trio task tree to
    stderr (read-only, while trio waits), so a hang says where it waits.
    """
    root = trio.lowlevel.current_root_task()
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def report_hang() -> None:
        tree = "\n".join(["trio tasks of a test running too long:", *_task_tree(root)])
        with capture.global_and_fixture_disabled():
            print(tree, file=sys.stderr, flush=True)

    report = threading.Timer(HANG_REPORT_S, report_hang)
    report.daemon = True
    report.start()
    try:
        async with trio.open_nursery() as nursery:
            started: list[Daemon] = []

            async def start(**overrides: Any) -> Daemon:
                daemon: Daemon = await nursery.start(run_daemon, replace(settings, **overrides))
                started.append(daemon)
                return daemon

            yield start
            for d in started:
                d.stop()
    finally:
        report.cancel()


@pytest.fixture(name="daemon")
async def _daemon(start_daemon: Callable[..., Any]) -> Daemon:
    daemon: Daemon = await start_daemon()
    return daemon


async def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 20.0, poll: float = 0.02
) -> Any:
    """Wait until `await predicate()` (or `predicate()`) is truthy; fail after `timeout` s."""
    with trio.fail_after(timeout):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(poll)


async def exit_code(proc: subprocess.Popen[Any], timeout: float = 20.0) -> int:
    """Wait, without blocking trio, for a child process to exit; its exit status."""
    with trio.fail_after(timeout):
        while proc.poll() is None:
            await trio.sleep(0.05)
    return proc.returncode


async def wait_terminal(daemon: Daemon, task_id: str, timeout: float = 30.0) -> Any:
    async def done() -> Any:
        try:
            rec = await daemon.service.get(task_id)
        except NotFoundError:  # a payload pushed to Redis has a row once a daemon claims it
            return None
        return rec if rec.status.terminal else None

    return await wait_for(done, timeout=timeout)


def git_repo(path: Path, files: dict[str, str], message: str = "first") -> str:
    """A git repository at `path` with `files` committed on `main`; returns its file:// URL."""
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    for name, text in files.items():
        (path / name).write_text(text)
    subprocess.run(["git", "-C", str(path), "add", "."], check=True)
    subprocess.run(["git", "-C", str(path), "commit", "-qm", message], check=True, env=env)
    return f"file://{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_seconds() -> str:
    """A `sleep` duration no other test uses, to find its processes from the host."""
    return f"{1000 + secrets.randbelow(8000)}.{secrets.randbelow(10**6):06d}"


def host_pids(token: str) -> list[int]:
    """Host pids of live processes with `token` as one of their arguments.

    Commands run in their own pid namespace, so what they could write about themselves ($$)
    means nothing on the host; their arguments are what the host can see.
    """
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry.name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if token.encode() in args and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def cmd(command: str, **extra: Any) -> dict[str, Any]:
    return {"action": "execute_command", "command": command, **extra}


def task_body(*steps: dict[str, Any], workspace_id: str = "ws-1", **extra: Any) -> dict[str, Any]:
    return {"workspace_id": workspace_id, "steps": list(steps), **extra}


def raw_payload(**overrides: Any) -> str:
    payload = {
        "task_id": str(uuid.uuid4()),
        "task_type": "background_job",
        "workspace_id": "ws-raw",
        "agent_id": None,
        "priority": "normal",
        "timeout_seconds": 60,
        "steps": [cmd("echo hello")],
        "created_at": "2026-11-24T00:00:00+00:00",
    }
    payload.update(overrides)
    return json.dumps(payload)


INTERNAL_TOKEN = "internal-test-token-0123456789"


@dataclass
class Api:
    """A daemon serving both HTTP APIs on free ports, with an all-workspaces bearer token."""

    daemon: Daemon
    public: str  #: base URL of the public API
    internal: str  #: base URL of the internal API
    token: str

    def client(self, token: str | None = None, **kw: Any) -> httpx.AsyncClient:
        """A client of the public API, authenticated with `token` (default: the test's own)."""
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.AsyncClient(base_url=self.public, headers=headers, timeout=30, **kw)

    def internal_client(self, **kw: Any) -> httpx.AsyncClient:
        headers = {"X-Internal-Token": INTERNAL_TOKEN}
        return httpx.AsyncClient(base_url=self.internal, headers=headers, timeout=60, **kw)


async def start_api(start_daemon: Callable[..., Any], **overrides: Any) -> Api:
    """A daemon serving both APIs on free loopback ports, and a token for every workspace;
    `overrides` are its settings'."""
    settings: dict[str, Any] = {
        "frontend": "frontend",
        "public_host": "127.0.0.1",
        "public_port": 0,
        "health_port": 0,
        "internal_token": INTERNAL_TOKEN,
        "sse_keepalive_s": 0.5,
    }
    daemon: Daemon = await start_daemon(**{**settings, **overrides})
    _, token = await daemon.service.tokens.create("tests", None)
    public, internal = daemon.urls
    return Api(daemon, public, internal, token)


@pytest.fixture(name="api")
async def _api(start_daemon: Callable[..., Any]) -> Api:
    return await start_api(start_daemon)


async def submit_and_wait(
    client: httpx.AsyncClient, workspace_id: str, steps: list[dict[str, Any]], timeout: float = 120
) -> dict[str, Any]:
    """Submit a task through the public API (`client` holds the token) and wait for its end;
    its record."""
    r = await client.post("/api/tasks/submit", json={"workspace_id": workspace_id, "steps": steps})
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]

    async def ended() -> dict[str, Any] | None:
        body: dict[str, Any] = (await client.get(f"/api/tasks/{task_id}")).json()
        return body if body["status"] in ("completed", "failed", "timed_out") else None

    record: dict[str, Any] = await wait_for(ended, timeout=timeout, poll=0.1)
    return record


@contextmanager
def git_http_server(directory: Path, password: str, seen: list[str] | None = None) -> Iterator[str]:
    """A dumb-HTTP git server for the repositories in `directory` that demands `password`
    (user x-access-token); its host:port. Paths asked for are appended to `seen`."""
    import base64
    import http.server

    expected = "Basic " + base64.b64encode(f"x-access-token:{password}".encode()).decode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(directory), **kw)

        def do_GET(self) -> None:
            if seen is not None:
                seen.append(self.path)
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class PrivateRedis:
    """A redis-server of one test, on a free port, keeping nothing on disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # all data gone: it keeps nothing on disk
            self.proc.wait()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()
