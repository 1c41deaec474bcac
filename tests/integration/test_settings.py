"""Settings: environment and YAML, with errors that name the key and its source."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import free_port
from wsrunner.errors import ConfigError
from wsrunner.settings import _SOURCES, GIB, SettingsError, load_settings

BASE = {"DATABASE_URL": "postgresql://x@127.0.0.1/db"}


def test_reference_variables_and_defaults() -> None:
    s = load_settings(
        environ={
            **BASE,
            "WORKER_CONCURRENCY": "7",
            "WORKSPACE_VOLUME_PATH": "/v",
            "WORKER_HEALTH_PORT": "9000",
            "WORKSPACE_DEFAULT_QUOTA_GB": "2",
        }
    )
    assert s.concurrency == 7 and str(s.volume_path) == "/v" and s.health_port == 9000
    assert s.default_quota_bytes == 2 * GIB
    d = load_settings(environ=BASE)
    assert d.concurrency == 3 and d.health_port == 8081 and d.default_quota_bytes == 5 * GIB
    assert d.redis_url == "redis://localhost:6379/0" and d.health_host == "127.0.0.1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKER_CONCURRENCY": "0"}, r"WORKER_CONCURRENCY \(concurrency\): must be at least 1"),
        ({"WORKER_CONCURRENCY": "many"}, "WORKER_CONCURRENCY"),
        ({"WORKER_HEALTH_PORT": "70000"}, "port number"),
        ({"DATABASE_URL": "", "REDIS_URL": "redis://r:6379/0"}, "DATABASE_URL is not set"),
        ({"WSRUNNER_BACKEND": "sqlite"}, "must be one of auto, embedded, redis"),
        ({"WSRUNNER_LEASE_TTL": "1", "WSRUNNER_HEARTBEAT_INTERVAL": "5"}, "must be longer"),
    ],
)
def test_bad_environment_names_the_variable(env, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={**BASE, **env})


def test_yaml_file_and_environment_precedence(tmp_path) -> None:
    f = tmp_path / "wsrunner.yaml"
    f.write_text("concurrency: 5\ndefault_quota_gb: 1\nworkspace_quotas: {ws-a: 1000}\n")
    s = load_settings(f, environ={**BASE, "WORKER_CONCURRENCY": "4"})
    assert (
        s.concurrency == 4 and s.default_quota_bytes == GIB and s.workspace_quotas == {"ws-a": 1000}
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("concurency: 5\n", "unknown key 'concurency'"),
        ("concurrency: [1]\n", ":1:14: concurrency: must be an integer, not a list"),
        ("workspace_quotas: {'../x': 5}\n", "not a valid workspace id"),
        ("- a\n", "expected a mapping"),
        ("a: [\n", "invalid YAML"),
    ],
)
def test_bad_yaml_names_the_key_and_file(tmp_path, text, message) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(f, environ=BASE)
    assert str(f) in str(info.value)


def test_the_backend_follows_what_is_configured(tmp_path) -> None:
    bare = load_settings(environ={"STATE_DIRECTORY": f"{tmp_path}/a:{tmp_path}/b"})
    assert bare.backend == "embedded" and str(bare.state_dir) == f"{tmp_path}/a"
    assert load_settings(environ={"DATABASE_URL": "postgresql://x/y"}).backend == "redis"
    forced = {"DATABASE_URL": "postgresql://x/y", "WSRUNNER_BACKEND": "embedded"}
    assert load_settings(environ=forced).backend == "embedded"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("concurrency: yes\n", "1:14: concurrency: must be an integer, not a string ('yes')"),
        ("health_port: 8081.9\n", "1:14: health_port: must be an integer, not a float (8081.9)"),
        (
            "default_quota_gb: true\n",
            "1:19: default_quota_gb: must be a number, not a boolean (true)",
        ),
        (
            "internal_no_auth: yes\n",
            "1:19: internal_no_auth: must be true or false, not a string ('yes')",
        ),
        ("log_level: 3\n", "1:12: log_level: must be a string, not an integer (3)"),
        ("concurrency: 2\nconcurrency: 3\n", "2:1: invalid YAML: while constructing a mapping"),
    ],
)
def test_yaml_types_are_strict_and_errors_have_positions(tmp_path, text, problem) -> None:
    f = tmp_path / "w.yaml"
    f.write_text(text)
    with pytest.raises(SettingsError) as info:
        load_settings(f, environ=BASE)
    assert info.value.problems[0].startswith(f"{f}:{problem}")


def test_every_problem_of_the_file_is_listed_in_order(tmp_path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("concurrency: yes\nhealth_port: 8081.9\nbogus: 1\ndefault_quota_gb: 2.5\n")
    with pytest.raises(SettingsError) as info:
        load_settings(f, environ=BASE)
    assert [p.split(": ")[:2] for p in info.value.problems] == [
        [f"{f}:1:14", "concurrency"],
        [f"{f}:2:14", "health_port"],
        [f"{f}:3:1", "bogus"],
    ]


def test_numbers_may_be_integers_and_quotas_fractions(tmp_path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("default_quota_gb: 1.5\nlease_ttl_s: 90\ninternal_no_auth: true\n")
    s = load_settings(f, environ=BASE)
    assert s.default_quota_bytes == int(1.5 * GIB) and s.lease_ttl_s == 90.0 and s.internal_no_auth


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("WORKER_CONCURRENCY", "yes"),
        ("WORKER_HEALTH_PORT", "8081.9"),
        ("WORKSPACE_DEFAULT_QUOTA_GB", "true"),
    ],
)
def test_environment_strings_are_parsed_strictly(var, value) -> None:
    with pytest.raises(ConfigError, match=f"environment variable {var} "):
        load_settings(environ={**BASE, var: value})


def test_a_value_in_both_file_and_environment_is_reported_with_both_sources(tmp_path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("concurrency: 5\ninternal_token: from-file\n")
    overrides: list[str] = []
    env = {**BASE, "WORKER_CONCURRENCY": "4", "WORKER_INTERNAL_TOKEN": "from-env"}
    s = load_settings(f, environ=env, overrides=overrides)
    assert s.concurrency == 4 and s.internal_token == "from-env"
    assert overrides == [
        f"concurrency: 4 from environment variable WORKER_CONCURRENCY overrides 5 from {f}:1:14",
        "internal_token: a value from environment variable WORKER_INTERNAL_TOKEN overrides the "
        f"value from {f}:2:17",
    ]


def _wsrunner(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command as users run it, with no settings from this test process's environment."""
    names = {var for var, _ in _SOURCES.values()} | {"WSRUNNER_CONFIG", "CREDENTIALS_DIRECTORY"}
    base = {k: v for k, v in os.environ.items() if k not in names}
    return subprocess.run(
        [sys.executable, "-m", "wsrunner", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_logs_a_value_given_twice_with_both_sources(tmp_path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("concurrency: 5\n")
    res = _wsrunner(
        "serve",
        "--config",
        str(f),
        WORKER_CONCURRENCY="4",
        LOG_FORMAT="text",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        DATABASE_URL=BASE["DATABASE_URL"],
        WORKSPACE_VOLUME_PATH=str(tmp_path / "v"),
    )
    assert res.returncode == 1, res.stderr
    assert (
        f"setting concurrency: 4 from environment variable WORKER_CONCURRENCY overrides 5 "
        f"from {f}:1:14"
    ) in res.stderr


def test_config_check_exits_1_with_located_errors(tmp_path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("concurrency: yes\nhealth_port: 8081.9\ndefault_quota_gb: true\n")
    res = _wsrunner("config", "check", str(f))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [
        f"{f}:1:14: concurrency: must be an integer, not a string ('yes')",
        f"{f}:2:14: health_port: must be an integer, not a float (8081.9)",
        f"{f}:3:19: default_quota_gb: must be a number, not a boolean (true)",
    ]


def test_config_check_says_ok_with_the_file_read(tmp_path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("concurrency: 5\n")
    res = _wsrunner("config", "check", WSRUNNER_CONFIG=str(f), WORKER_CONCURRENCY="4")
    assert res.returncode == 0 and res.stdout == f"ok: {f}\n"
    assert "note: concurrency: 4 from environment variable WORKER_CONCURRENCY" in res.stderr
    bare = _wsrunner("config", "check")
    assert bare.returncode == 0 and bare.stdout == "ok: no settings file (environment only)\n"
    env_error = _wsrunner("config", "check", WORKER_HEALTH_PORT="8081.9")
    assert (
        env_error.returncode == 1 and "environment variable WORKER_HEALTH_PORT" in env_error.stderr
    )
