"""The `wsrunner` command as users run it: real process, real exit codes, real /health."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import trio

from tests.conftest import DATABASE_URL, REDIS_URL, exit_code, free_port, wait_for


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsrunner", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unreachable_redis_exits_nonzero_with_one_line(tmp_path) -> None:
    res = run_cli(
        "serve",
        env={
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "DATABASE_URL": DATABASE_URL,
            "WORKSPACE_VOLUME_PATH": str(tmp_path),
        },
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("wsrunner: cannot start: Redis failed")


def test_unreachable_postgres_exits_nonzero(tmp_path) -> None:
    res = run_cli(
        "serve",
        env={
            "REDIS_URL": REDIS_URL,
            "WORKSPACE_VOLUME_PATH": str(tmp_path),
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x",
        },
    )
    assert res.returncode == 1 and "cannot start: PostgreSQL" in res.stderr


def test_invalid_config_exits_2_naming_the_key() -> None:
    res = run_cli("serve", env={"DATABASE_URL": DATABASE_URL, "WORKER_CONCURRENCY": "-1"})
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "wsrunner: invalid configuration: environment variable "
        "WORKER_CONCURRENCY (concurrency): must be at least 1; got '-1'"
    )


def test_empty_internal_token_refuses_to_start(tmp_path, prefix, schema) -> None:
    res = run_cli(
        "serve",
        env={
            "REDIS_URL": REDIS_URL,
            "DATABASE_URL": DATABASE_URL,
            "WSRUNNER_REDIS_PREFIX": prefix,
            "WSRUNNER_DATABASE_SCHEMA": schema,
            "WORKSPACE_VOLUME_PATH": str(tmp_path),
            "WORKER_INTERNAL_TOKEN": "",
            "PUBLIC_API_PORT": "0",
            "WORKER_HEALTH_PORT": "0",
        },
    )
    assert res.returncode == 2
    assert "WORKER_INTERNAL_TOKEN is empty" in res.stderr
    assert "WSRUNNER_INTERNAL_NO_AUTH=true" in res.stderr


async def test_serve_answers_health_and_stops_on_sigterm(tmp_path, prefix, schema) -> None:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": DATABASE_URL,
        "WSRUNNER_REDIS_PREFIX": prefix,
        "WSRUNNER_DATABASE_SCHEMA": schema,
        "WORKSPACE_VOLUME_PATH": str(tmp_path / "v"),
        "WORKER_HEALTH_PORT": str(port),
        "WORKER_ID": "cli-test",
        "WORKER_INTERNAL_TOKEN": "cli-token",
        "PUBLIC_API_HOST": "127.0.0.1",
        "PUBLIC_API_PORT": str(free_port()),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsrunner", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient() as client:

            async def healthy() -> dict | None:
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/health")
                except httpx.TransportError:
                    return None
                return r.json() if r.status_code == 200 else None

            body = await wait_for(healthy, timeout=30, poll=0.1)
        assert body["worker_id"] == "cli-test" and body["concurrency"] == 3
        assert body["active_tasks"] == 0 and body["volume_path"] == str(tmp_path / "v")
        assert body["checks"] == {"redis": "ok", "postgres": "ok", "volume": "ok", "sandbox": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_tokens_create_list_revoke(schema) -> None:
    env = {"DATABASE_URL": DATABASE_URL, "WSRUNNER_DATABASE_SCHEMA": schema}
    made = run_cli(
        "tokens",
        "create",
        "--name",
        "ci bot",
        "--workspace",
        "ws-a",
        "--workspace",
        "ws-b",
        "--json",
        env=env,
    )
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert token["workspaces"] == ["ws-a", "ws-b"] and token["token"].startswith("wsr_")
    plain = run_cli("tokens", "create", "--name", "admin", "--all-workspaces", env=env)
    assert plain.stdout.startswith("wsr_") and "shown only now" in plain.stderr
    listed = run_cli("tokens", "list", env=env)
    assert token["id"] in listed.stdout and "[ws-a,ws-b]" in listed.stdout
    assert "wsr_" not in listed.stdout  # secrets are never listed
    assert run_cli("tokens", "revoke", token["id"], env=env).returncode == 0
    rows = json.loads(run_cli("tokens", "list", "--json", env=env).stdout)
    assert next(r for r in rows if r["id"] == token["id"])["revoked_at"] is not None
    missing = run_cli("tokens", "revoke", "nope", env=env)
    assert missing.returncode == 2 and "no API token with id 'nope'" in missing.stderr
    bad = run_cli("tokens", "create", "--name", "x", "--workspace", "../etc", env=env)
    assert bad.returncode == 2 and "workspaces[0]" in bad.stderr
    usage = run_cli("tokens", "create", "--name", "x", env=env)
    assert usage.returncode == 2 and "--all-workspaces" in usage.stderr


def test_tokens_limits_are_set_changed_one_at_a_time_and_listed(schema) -> None:
    env = {"DATABASE_URL": DATABASE_URL, "WSRUNNER_DATABASE_SCHEMA": schema}
    made = run_cli(
        "tokens",
        "create",
        "--name",
        "agents",
        "--all-workspaces",
        "--max-running",
        "2",
        "--json",
        env=env,
    )
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert (token["max_priority"], token["max_running"], token["max_queued"]) == ("high", 2, None)
    changed = run_cli(
        "tokens",
        "update",
        token["id"],
        "--max-priority",
        "critical",
        "--max-queued",
        "50",
        "--json",
        env=env,
    )
    assert changed.returncode == 0, changed.stderr
    row = json.loads(changed.stdout)  # what was not named stays as it was
    assert (row["max_priority"], row["max_running"], row["max_queued"]) == ("critical", 2, 50)
    cleared = run_cli("tokens", "update", token["id"], "--max-running", "none", env=env)
    assert "up to critical, running no limit, queued 50" in cleared.stdout, cleared.stdout
    assert "running no limit, queued 50" in run_cli("tokens", "list", env=env).stdout
    bad = run_cli("tokens", "update", token["id"], "--max-running", "0", env=env)
    assert bad.returncode == 2 and "expected a positive integer or 'none'" in bad.stderr
    missing = run_cli("tokens", "update", "nope", "--max-running", "1", env=env)
    assert missing.returncode == 2 and "no API token with id 'nope'" in missing.stderr


async def test_serve_logs_json_lines_with_task_ids_and_no_secrets(tmp_path, prefix, schema) -> None:
    public, internal = free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": DATABASE_URL,
        "WSRUNNER_REDIS_PREFIX": prefix,
        "WSRUNNER_DATABASE_SCHEMA": schema,
        "WORKSPACE_VOLUME_PATH": str(tmp_path / "v"),
        "WORKER_HEALTH_PORT": str(internal),
        "WORKER_INTERNAL_TOKEN": "internal-secret-token",
        "PUBLIC_API_HOST": "127.0.0.1",
        "PUBLIC_API_PORT": str(public),
    }
    token = run_cli(
        "tokens", "create", "--name", "logs", "--all-workspaces", env=env
    ).stdout.strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsrunner", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{public}", headers=headers) as c:

            async def submitted() -> str | None:
                try:
                    r = await c.post(
                        "/api/tasks/submit",
                        json={
                            "workspace_id": "ws-log",
                            "steps": [{"action": "execute_command", "command": "echo hi"}],
                        },
                    )
                except httpx.TransportError:
                    return None
                return str(r.json()["task_id"])

            task_id = await wait_for(submitted, timeout=30, poll=0.1)

            async def done() -> bool:
                r = await c.get(f"/api/tasks/{task_id}")
                return bool(r.json()["status"] == "completed")

            await wait_for(done, timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=30))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.decode().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= e.keys() for e in events)
    mine = [e for e in events if e.get("task_id") == task_id]
    assert {e["message"] for e in mine} >= {"task started"} and all(
        e["workspace_id"] == "ws-log" for e in mine
    )
    assert any("Running on" in e["message"] for e in events)  # Hypercorn's lines too
    assert token not in err.decode() and "internal-secret-token" not in err.decode()
