"""Settings: environment and YAML, with errors that name the key and its source."""

from __future__ import annotations

import pytest

from wsrunner.errors import ConfigError
from wsrunner.settings import GIB, load_settings

BASE = {"DATABASE_URL": "postgresql://x@127.0.0.1/db"}


def test_reference_variables_and_defaults() -> None:
    s = load_settings(environ={**BASE, "WORKER_CONCURRENCY": "7", "WORKSPACE_VOLUME_PATH": "/v",
                               "WORKER_HEALTH_PORT": "9000", "WORKSPACE_DEFAULT_QUOTA_GB": "2"})  # fmt: skip
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
        ("concurrency: [1]\n", "key 'concurrency'"),
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
