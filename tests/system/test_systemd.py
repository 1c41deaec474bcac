"""The systemd unit and the notify protocol, checked without systemd as PID 1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import DATABASE_URL, REDIS_URL, exit_code, free_port, traversable
from wsrunner.settings import _SOURCES, load_settings

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "wsrunner.service"
#: `systemd-analyze security --offline` exposure the unit must stay at or under (0 best, 10 worst).
#: It runs as root (per-workspace uids) and needs user and mount namespaces for bubblewrap;
#: 3.9 before the network mode `egress` added four capabilities (docs/security.md).
EXPOSURE_MAX = 4.7

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def _runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here (verify checks it)."""
    unit = tmp_path / "wsrunner.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/wsrunner", "/usr/bin/true"))
    return unit


@needs_systemd_analyze
def test_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(_runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    # verify exits 0 even for unknown keys; they only show on stderr.
    assert done.returncode == 0 and done.stderr == "", done.stderr


@needs_systemd_analyze
def test_unit_exposure_is_under_the_threshold(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            f"--threshold={int(EXPOSURE_MAX * 10)}",
            str(_runnable_copy(tmp_path)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    last = done.stdout.strip().splitlines()[-1]
    exposure = float(last.split("level for wsrunner.service:")[1].split()[0])
    assert exposure <= EXPOSURE_MAX and done.returncode == 0, done.stdout[-2000:]


def test_unit_does_not_restart_on_a_configuration_error() -> None:
    """A configuration error exits 2 (tests/system/test_cli.py checks that): restarting cannot fix it."""
    service = UNIT.read_text().split("[Service]", 1)[1].split("\n[", 1)[0]
    keys = [
        line.partition("=")[::2]
        for line in service.splitlines()
        if "=" in line and not line.startswith("#")
    ]
    assert ("Restart", "on-failure") in keys
    assert ("RestartPreventExitStatus", "2") in keys


def _service_keys() -> list[tuple[str, str]]:
    service = UNIT.read_text().split("[Service]", 1)[1].split("\n[", 1)[0]
    return [
        line.partition("=")[::2]
        for line in service.splitlines()
        if "=" in line and not line.startswith("#")
    ]


def test_unit_sets_no_setting_over_the_settings_file() -> None:
    """A variable wins over wsrunner.conf: the unit must not set one an operator cannot see."""
    settings_variables = {var for var, _ in _SOURCES.values() if var}
    assigned = [value.partition("=")[0] for key, value in _service_keys() if key == "Environment"]
    assert assigned and not set(assigned) & settings_variables, assigned


def test_unit_checks_settings_and_policy_before_a_reload() -> None:
    keys = _service_keys()
    assert [v for k, v in keys if k == "ExecReload"] == [
        "/usr/bin/wsrunner config check",
        "/usr/bin/wsrunner policy check",
        "/bin/kill -HUP $MAINPID",
    ]
    # Not ExecStartPre=: its failure is restarted despite RestartPreventExitStatus=; `serve`
    # checks both itself and exits 2 (below).
    assert not [v for k, v in keys if k == "ExecStartPre"]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "wsrunner.conf",
            "concurrency: yes\nhealth_port: 1.5\n",
            [
                "{f}:1:14: concurrency: must be an integer, not a string ('yes')",
                "{f}:2:14: health_port: must be an integer, not a float (1.5)",
            ],
        ),
        (
            "policy.yaml",
            "version: 1\n",
            ["{f}:1:1: version: unknown key (not in the wsrunner/v1 schema)"],
        ),
    ],
)
def test_serve_checks_what_the_unit_does_not_and_exits_2(
    tmp_path: Path, name: str, text: str, expected: list[str]
) -> None:
    """The start-time check the unit leaves to `serve`: every located problem, then exit 2."""
    bad = tmp_path / name
    bad.write_text(text)
    env = {
        "PATH": os.environ["PATH"],
        "STATE_DIRECTORY": str(tmp_path / "state"),
        "WORKSPACE_VOLUME_PATH": str(tmp_path / "v"),
        "WSRUNNER_SYSTEM_ROOT": str(tmp_path),
    }
    env["WSRUNNER_CONFIG" if name == "wsrunner.conf" else "POLICY_FILE"] = str(bad)
    done = subprocess.run(
        [sys.executable, "-m", "wsrunner", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert all(line.format(f=bad) in lines for line in expected), done.stderr


def test_credentials_directory_supplies_secrets(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "internal-token").write_text("from-credential\n")
    (creds / "database-url").write_text("postgresql://x@db/y")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "REDIS_URL": "redis://r:6379/1"}
    s = load_settings(None, env)
    assert (s.internal_token, s.database_url) == ("from-credential", "postgresql://x@db/y")
    assert s.redis_url == "redis://r:6379/1"  # none given as credential: the environment's
    env["WORKER_INTERNAL_TOKEN"] = "explicit"
    assert load_settings(None, env).internal_token == "explicit"  # the environment wins


async def test_notify_protocol_ready_watchdog_reload_stopping(
    tmp_path: Path, prefix: str, schema: str
) -> None:
    traversable(tmp_path)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await listener.bind(str(tmp_path / "notify.sock"))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "internal-token").write_text("cred-token")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "WORKER_INTERNAL_TOKEN"}
    env.update(
        {
            "REDIS_URL": REDIS_URL,
            "DATABASE_URL": DATABASE_URL,
            "WSRUNNER_REDIS_PREFIX": prefix,
            "WSRUNNER_DATABASE_SCHEMA": schema,
            "WORKSPACE_VOLUME_PATH": str(tmp_path / "v"),
            "WORKER_HEALTH_PORT": str(port),
            "PUBLIC_API_HOST": "127.0.0.1",
            "PUBLIC_API_PORT": str(free_port()),
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
            "WATCHDOG_USEC": "400000",
            "CREDENTIALS_DIRECTORY": str(creds),
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsrunner", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    messages: list[dict[str, str]] = []

    async def receive() -> dict[str, str]:
        data = await listener.recv(4096)
        msg = dict(line.split("=", 1) for line in data.decode().splitlines())
        messages.append(msg)
        return msg

    async def until(key: str) -> dict[str, str]:
        with trio.fail_after(30):
            while True:
                msg = await receive()
                if key in msg:
                    return msg

    try:
        ready = await until("READY")
        assert ready["MAINPID"] == str(proc.pid) and "isolation full" in ready["STATUS"]
        # Ready means serving: the internal API answers, with the token from the credential.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            r = await c.get("/workspaces/ws-1/files", headers={"X-Internal-Token": "cred-token"})
            assert r.status_code == 404, r.text  # past authentication: no such workspace yet
            r = await c.get("/workspaces/ws-1/files", headers={"X-Internal-Token": "other"})
            assert r.status_code == 401
        before = len([m for m in messages if "WATCHDOG" in m])
        with trio.fail_after(5):
            while len([m for m in messages if "WATCHDOG" in m]) < before + 3:
                await receive()  # every 0.2 s: half of WATCHDOG_USEC
        proc.send_signal(signal.SIGHUP)
        reloading = await until("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        again = await until("READY")
        assert again["STATUS"].endswith(" loaded")
        proc.send_signal(signal.SIGTERM)
        stopping = await until("STOPPING")
        assert stopping["STATUS"].startswith("stopping")
        assert await exit_code(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        listener.close()
    order = [
        next(k for k in ("READY", "RELOADING", "STOPPING", "WATCHDOG") if k in m) for m in messages
    ]
    assert order.index("READY") < order.index("RELOADING") < order.index("STOPPING")
