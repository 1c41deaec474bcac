"""The installed layout: root's `wsrunner` commands read what the service reads.

A scratch directory stands in for `/` (`WSRUNNER_SYSTEM_ROOT`), holding `etc/wsrunner/` as the
package lays it out. The service is started as the unit starts it: `WSRUNNER_CONFIG` naming the
file and the credentials in `$CREDENTIALS_DIRECTORY`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import DATABASE_URL, exit_code, free_port, traversable, wait_for
from wsrunner.errors import ConfigError
from wsrunner.settings import load_settings


def _layout(root: Path, settings: str, **credentials: str) -> Path:
    """`root/etc/wsrunner/` with `wsrunner.conf` and the given credential files (0600)."""
    etc = root / "etc" / "wsrunner"
    (etc / "credentials").mkdir(parents=True)
    (etc / "credentials").chmod(0o700)
    (etc / "wsrunner.conf").write_text(settings)
    for name, value in credentials.items():
        (etc / "credentials" / name).write_text(value + "\n")
        (etc / "credentials" / name).chmod(0o600)
    return etc


def _wsrunner(
    *args: str, root: Path, user: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it on the host: nothing but PATH in the environment."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(root / "home"),
        "WSRUNNER_SYSTEM_ROOT": str(root),
    }
    return subprocess.run(
        [*(user or []), sys.executable, "-m", "wsrunner", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_tokens_create_uses_the_services_store_and_the_service_accepts_the_token(
    tmp_path: Path, prefix: str, schema: str
) -> None:
    public = free_port()
    health = next(port for port in iter(free_port, None) if port != public)
    etc = _layout(
        tmp_path,
        f"database_schema: {schema}\nredis_prefix: {prefix}\n"
        f"volume_path: {tmp_path / 'workspaces'}\npublic_host: 127.0.0.1\n"
        f"public_port: {public}\nhealth_port: {health}\n",
        **{"database-url": DATABASE_URL, "internal-token": "t" * 32},
    )
    made = _wsrunner("tokens", "create", "--name", "ops", "--all-workspaces", root=tmp_path)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert (
        f"store: PostgreSQL postgres@127.0.0.1:5432/test, schema {schema} (database_url from "
        f"credential database-url in {etc / 'credentials'})"
    ) in made.stderr
    assert not (tmp_path / "home").exists()  # no store of the user's own was made

    # The service, as the unit starts it; systemd copies the credentials to a directory of its own.
    run_credentials = shutil.copytree(etc / "credentials", tmp_path / "run-credentials")
    env = {
        "PATH": os.environ["PATH"],
        "WSRUNNER_SYSTEM_ROOT": str(tmp_path),
        "WSRUNNER_CONFIG": str(etc / "wsrunner.conf"),
        "CREDENTIALS_DIRECTORY": str(run_credentials),
        "STATE_DIRECTORY": str(tmp_path / "var/lib/wsrunner"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsrunner", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{public}") as client:

            async def listed() -> httpx.Response | None:
                assert proc.poll() is None, "the service exited"
                try:
                    return await client.get(
                        "/api/tasks", headers={"Authorization": f"Bearer {token}"}
                    )
                except httpx.TransportError:
                    return None

            answer = await wait_for(listed, timeout=30, poll=0.1)
            assert answer.status_code == 200, answer.text
            stranger = await client.get("/api/tasks", headers={"Authorization": "Bearer wsr_x_y"})
            assert stranger.status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        print(proc.stderr.read().decode() if proc.stderr else "")  # shown if the test failed


def test_without_a_database_the_embedded_store_is_the_services(tmp_path: Path) -> None:
    """No database-url: the service's store is the embedded one in its state directory."""
    _layout(tmp_path, "concurrency: 2\n")
    made = _wsrunner("tokens", "create", "--name", "ops", "--all-workspaces", root=tmp_path)
    assert made.returncode == 0, made.stderr
    store = tmp_path / "var/lib/wsrunner/wsrunner.sqlite3"
    assert f"store: the embedded store {store} (no database_url or redis_url is set)" in made.stderr
    assert store.is_file()
    listed = _wsrunner("tokens", "list", root=tmp_path)
    assert listed.returncode == 0 and " ops " in listed.stdout, listed.stderr


def test_a_user_who_cannot_read_the_installed_configuration_is_refused(tmp_path: Path) -> None:
    """No quiet fallback to a store of the user's own that the service never reads."""
    etc = _layout(tmp_path, "concurrency: 2\n", **{"database-url": DATABASE_URL})
    traversable(tmp_path / "etc")
    etc.chmod(0o750)  # root:wsrunner on a host; this user is in neither
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    refused = _wsrunner(
        "tokens", "create", "--name", "x", "--all-workspaces", root=tmp_path, user=nobody
    )
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"wsrunner: invalid configuration: cannot read config file {etc / 'wsrunner.conf'}: "
        "Permission denied; the installed configuration is the service's: run this as root, "
        "or name settings of your own with --config or WSRUNNER_CONFIG"
    )
    etc.chmod(0o755)  # the settings are readable, the credentials (0700) still are not
    (etc / "wsrunner.conf").chmod(0o644)
    refused = _wsrunner(
        "tokens", "create", "--name", "x", "--all-workspaces", root=tmp_path, user=nobody
    )
    assert refused.returncode == 2
    assert (
        f"cannot read credential internal-token in {etc / 'credentials'}: Permission denied"
        in refused.stderr
    )
    assert not (tmp_path / "home").exists() and not (tmp_path / "var").exists()


def test_the_environment_file_is_read_below_the_environment(tmp_path: Path) -> None:
    """/etc/default/wsrunner is the unit's EnvironmentFile=: above the file, below the environment."""
    _layout(tmp_path, "concurrency: 2\nlog_level: DEBUG\n")
    (tmp_path / "etc/default").mkdir()
    (tmp_path / "etc/default/wsrunner").write_text(
        "# overrides\n\nWORKER_CONCURRENCY='4'\nLOG_LEVEL=\"WARNING\"\nPUBLIC_API_PORT=9000\n"
    )
    notes: list[str] = []
    env = {"WSRUNNER_SYSTEM_ROOT": str(tmp_path), "PUBLIC_API_PORT": "9001"}
    s = load_settings(None, env, require_database=False, overrides=notes)
    assert (s.concurrency, s.log_level, s.public_port) == (4, "WARNING", 9001)
    assert s.state_dir == tmp_path / "var/lib/wsrunner"
    conf, defaults = tmp_path / "etc/wsrunner/wsrunner.conf", tmp_path / "etc/default/wsrunner"
    assert notes == [
        f"concurrency: 4 from {defaults}: WORKER_CONCURRENCY overrides 2 from {conf}:1:14",
        f"log_level: 'WARNING' from {defaults}: LOG_LEVEL overrides 'DEBUG' from {conf}:2:12",
        f"public_port: 9001 from environment variable PUBLIC_API_PORT overrides 9000 from {defaults}: PUBLIC_API_PORT",
    ]
    (tmp_path / "etc/default/wsrunner").write_text("WORKER_CONCURRENCY\n")
    with pytest.raises(ConfigError) as bad:
        load_settings(None, env, require_database=False)
    assert str(bad.value) == f"{defaults}:1: expected KEY=value, got 'WORKER_CONCURRENCY'"
