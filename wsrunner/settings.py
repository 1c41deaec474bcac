"""The daemon's configuration: one frozen, typed snapshot built from a YAML file and the environment.

This module is the only reader of `os.environ` and of config files. Each setting has a YAML key
(its field name) and an environment variable; the environment wins. The reference system's
variable names are kept (`WORKER_CONCURRENCY`, `REDIS_URL`, ...). The file is YAML 1.2 read with
positions and strict types (an integer key takes an integer, not `yes` or `8081.9`); environment
values are strings parsed as strictly. Unknown YAML keys, wrong types and out-of-range values are
errors that name the key and where it came from (`file:line:col: key: message` for the file).
"""

from __future__ import annotations

import os
import secrets
import socket
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from wsrunner.errors import ConfigError
from wsrunner.execution.sandbox.identity import UidRange
from wsrunner.payload import WORKSPACE_ID_RE
from wsrunner.policy import bundled_policy

GIB: Final = 1024**3
DEFAULT_UIDS: Final = UidRange(200000, 265535)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every tunable of the daemon. Build it with `load_settings()`."""

    worker_id: str  #: this daemon's name in Redis and in task records
    #: the host whose volume this daemon serves (daemons of one host share it); a workspace's
    #: tasks run on its home host only, unless `volume_shared`
    host_id: str = field(default_factory=socket.gethostname)
    volume_shared: bool = False  #: the volume is shared storage: any daemon may run any task
    #: a workspace whose home host is gone (local volumes): "fail" its tasks, or "wait"
    home_unavailable: str = "fail"
    concurrency: int = 3  #: task slots (WORKER_CONCURRENCY)
    #: tasks of one workspace running at once, on all daemons together (one writer by default)
    workspace_concurrency: int = 1
    workspace_concurrencies: Mapping[str, int] = field(default_factory=dict)  #: per workspace
    #: how long an internal API or tool call that writes waits for a busy workspace (then 423)
    workspace_wait_s: float = 10.0
    #: "embedded" (in-process queue + SQLite in state_dir) or "redis" (Redis + PostgreSQL);
    #: chosen from whether REDIS_URL or DATABASE_URL is set, unless WSRUNNER_BACKEND says
    backend: str = "redis"
    state_dir: Path = Path("/var/lib/wsrunner")  #: STATE_DIRECTORY; the embedded store's home
    redis_url: str = field(default="redis://localhost:6379/0", repr=False)
    redis_prefix: str = "workspace"  #: first part of every Redis key
    database_url: str = field(default="", repr=False)
    database_schema: str = "public"  #: PostgreSQL schema holding wsrunner's tables
    volume_path: Path = Path("/workspaces")  #: WORKSPACE_VOLUME_PATH
    default_quota_bytes: int = 5 * GIB  #: WORKSPACE_DEFAULT_QUOTA_GB, in bytes
    workspace_quotas: Mapping[str, int] = field(default_factory=dict)  #: per-workspace bytes
    #: inodes (files, directories, links...) one workspace may hold (WORKSPACE_DEFAULT_INODE_QUOTA)
    default_inode_quota: int = 1_000_000
    workspace_inode_quotas: Mapping[str, int] = field(default_factory=dict)  #: per workspace
    public_host: str = "0.0.0.0"  #: bind address of the public REST/SSE API (PUBLIC_API_HOST)
    public_port: int = 8080  #: PUBLIC_API_PORT
    health_host: str = "127.0.0.1"  #: bind address of the internal API (WORKER_BIND_HOST)
    health_port: int = 8081  #: WORKER_HEALTH_PORT
    internal_token: str = field(default="", repr=False)  #: WORKER_INTERNAL_TOKEN
    internal_no_auth: bool = False  #: serve the internal API without a token (explicit opt-out)
    max_request_bytes: int = 10 * 1024 * 1024  #: largest HTTP request body accepted
    file_read_cap_bytes: int = 2 * 1024 * 1024  #: largest file the internal API returns
    exec_timeout_max_s: int = 600  #: longest `timeout` an internal /exec may ask for
    sse_keepalive_s: float = 15.0  #: a comment line on idle event streams this often
    clone_hosts: tuple[str, ...] = ("github.com", "gitlab.com", "bitbucket.org")
    clone_schemes: tuple[str, ...] = ("https",)  #: of the clone endpoint; https in production
    git_credentials_file: Path | None = None  #: per-workspace git tokens (credentials.py)
    frontend: str = "frontend"  #: module serving HTTP; "none" runs a worker-only daemon
    heartbeat_interval_s: float = 30.0  #: how often the heartbeat and leases are renewed
    lease_ttl_s: float = 60.0  #: a daemon silent this long is dead; its tasks are re-queued
    reconcile_interval_s: float = 60.0  #: how often PostgreSQL is compared with Redis
    max_attempts: int = 3  #: starts before a task whose daemons keep dying is failed
    shutdown_grace_s: float = 30.0  #: running tasks may finish this long after SIGTERM
    kill_grace_s: float = 5.0  #: SIGTERM to SIGKILL delay for a step's process group
    read_cap_bytes: int = 500_000  #: read_file step
    list_cap_entries: int = 1000  #: list_directory step
    git_schemes: tuple[str, ...] = ("https", "ssh")  #: URL schemes a git_clone step may use
    #: the base command policy; unset: /etc/wsrunner/policy.yaml if present, else the bundled one
    policy_file: Path | None = None
    #: drop-ins applied after it, in file-name order; unset: `policy.d/` next to the base file
    policy_dir: Path | None = None
    sandbox_uids: UidRange = DEFAULT_UIDS  #: per-workspace uids (when the daemon runs as root)
    #: "auto": the best isolation the host offers; "off": none at all, which the policy must
    #: also accept (`require: none`): for trusted single-user setups and benchmarks
    sandbox: str = "auto"
    #: commands (not git) start in a live sandbox per workspace, built once, where the host
    #: allows (full isolation, cgroups, /usr/bin/python3) and their network is `none`
    warm_sandboxes: bool = True
    warm_idle_s: float = 300.0  #: a warm sandbox unused this long is stopped
    warm_max: int = 64  #: warm sandboxes alive at once; the least recently used idle one goes
    log_level: str = "INFO"
    log_format: str = "auto"  #: "json", "text", or "auto" (text on a terminal, else JSON)


#: The installed layout, below `$WSRUNNER_SYSTEM_ROOT` (default `/`; tests point it elsewhere).
SYSTEM_CONFIG: Final = Path("etc/wsrunner")  #: wsrunner.conf, policy.yaml, credentials/
SYSTEM_ENV_FILE: Final = Path("etc/default/wsrunner")  #: the unit's EnvironmentFile=
SYSTEM_STATE: Final = Path("var/lib/wsrunner")  #: the unit's StateDirectory=


def system_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where the installed layout (`etc/wsrunner`, `var/lib/wsrunner`) lives: `/` on a host."""
    env = os.environ if environ is None else environ
    return Path(env.get("WSRUNNER_SYSTEM_ROOT") or "/")


def policy_paths(settings: Settings) -> tuple[Path, Path]:
    """The base policy file and the drop-in directory the settings designate."""
    system = system_root() / SYSTEM_CONFIG / "policy.yaml"
    base = settings.policy_file or (system if system.exists() else bundled_policy())
    # policy.d next to the base file, even before it exists: a reload picks up a new one.
    return base, settings.policy_dir or base.parent / "policy.d"


def default_worker_id() -> str:
    """Unique per process and readable: host, pid and a random suffix (pid 1 is common)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _host_id(v: Any) -> str:
    s = str(v)
    if not WORKSPACE_ID_RE.fullmatch(s):
        raise ValueError(
            "must be 1-128 letters, digits, '_', '-' or '.', starting with one of the first two"
        )
    return s


def _home_unavailable(v: Any) -> str:
    s = str(v).strip().lower()
    if s not in ("fail", "wait"):
        raise ValueError("must be fail or wait")
    return s


def _backend(v: Any) -> str:
    s = str(v).strip().lower()
    if s not in ("auto", "embedded", "redis"):
        raise ValueError("must be one of auto, embedded, redis")
    return s


def _sandbox_mode(v: Any) -> str:
    s = str(v).strip().lower()
    if s not in ("auto", "off"):
        raise ValueError("must be auto or off")
    return s


def _state_dir(v: Any) -> Path:
    # systemd may pass several directories separated by ':'; the first is ours.
    return Path(str(v).split(":", 1)[0])


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/wsrunner")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "wsrunner"


def _positive_int(v: Any) -> int:
    n = int(v)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _positive_float(v: Any) -> float:
    x = float(v)
    if not x > 0:
        raise ValueError("must be greater than 0")
    return x


def _port(v: Any) -> int:
    n = int(v)
    if not 0 <= n <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return n


def _gb_to_bytes(v: Any) -> int:
    gb = float(v)
    if not gb > 0:
        raise ValueError("must be a number of GB greater than 0")
    return int(gb * GIB)


def _per_workspace(unit: str) -> Callable[[Any], dict[str, int]]:
    """A converter of a mapping of workspace id to a positive number of `unit`."""

    def convert(v: Any) -> dict[str, int]:
        if not isinstance(v, dict):
            raise ValueError(f"must be a mapping of workspace id to {unit}")
        out = {}
        for ws, n in v.items():
            if not isinstance(ws, str) or not WORKSPACE_ID_RE.fullmatch(ws):
                raise ValueError(f"{ws!r} is not a valid workspace id")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"the value of {ws!r} must be a positive number of {unit}")
            out[ws] = n
        return out

    return convert


def _names(v: Any) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a comma-separated list or a list of names")
    return tuple(s.strip().lower() for s in items if s.strip())


def _flag(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ValueError("must be true or false")


def _identifier(v: Any) -> str:
    s = str(v)
    if not s.replace("_", "").isalnum() or s[0].isdigit():
        raise ValueError("must be a SQL identifier (letters, digits, '_')")
    return s


def _level(v: Any) -> str:
    s = str(v).upper()
    if s not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return s


def _log_format(v: Any) -> str:
    s = str(v).lower()
    if s not in {"auto", "json", "text"}:
        raise ValueError("must be one of auto, json, text")
    return s


#: field name -> (environment variable, converter). The YAML key is the field name.
_SOURCES: Final[Mapping[str, tuple[str, Callable[[Any], Any]]]] = {
    "worker_id": ("WORKER_ID", str),
    "host_id": ("WSRUNNER_HOST_ID", _host_id),
    "volume_shared": ("WSRUNNER_VOLUME_SHARED", _flag),
    "home_unavailable": ("WSRUNNER_HOME_UNAVAILABLE", _home_unavailable),
    "concurrency": ("WORKER_CONCURRENCY", _positive_int),
    "workspace_concurrency": ("WSRUNNER_WORKSPACE_CONCURRENCY", _positive_int),
    "workspace_concurrencies": ("", _per_workspace("tasks")),
    "workspace_wait_s": ("WSRUNNER_WORKSPACE_WAIT", _positive_float),
    "redis_url": ("REDIS_URL", str),
    "backend": ("WSRUNNER_BACKEND", _backend),
    "state_dir": ("STATE_DIRECTORY", _state_dir),
    "redis_prefix": ("WSRUNNER_REDIS_PREFIX", str),
    "database_url": ("DATABASE_URL", str),
    "database_schema": ("WSRUNNER_DATABASE_SCHEMA", _identifier),
    "volume_path": ("WORKSPACE_VOLUME_PATH", Path),
    "default_quota_bytes": ("WORKSPACE_DEFAULT_QUOTA_GB", _gb_to_bytes),
    "workspace_quotas": ("", _per_workspace("bytes")),
    "default_inode_quota": ("WORKSPACE_DEFAULT_INODE_QUOTA", _positive_int),
    "workspace_inode_quotas": ("", _per_workspace("inodes")),
    "health_host": ("WORKER_BIND_HOST", str),
    "health_port": ("WORKER_HEALTH_PORT", _port),
    "internal_token": ("WORKER_INTERNAL_TOKEN", str),
    "internal_no_auth": ("WSRUNNER_INTERNAL_NO_AUTH", _flag),
    "public_host": ("PUBLIC_API_HOST", str),
    "public_port": ("PUBLIC_API_PORT", _port),
    "max_request_bytes": ("WSRUNNER_MAX_REQUEST_BYTES", _positive_int),
    "file_read_cap_bytes": ("WSRUNNER_FILE_READ_CAP", _positive_int),
    "exec_timeout_max_s": ("WSRUNNER_EXEC_TIMEOUT_MAX", _positive_int),
    "sse_keepalive_s": ("WSRUNNER_SSE_KEEPALIVE", _positive_float),
    "clone_hosts": ("WSRUNNER_CLONE_HOSTS", _names),
    "clone_schemes": ("WSRUNNER_CLONE_SCHEMES", _names),
    "git_credentials_file": ("WSRUNNER_GIT_CREDENTIALS_FILE", Path),
    "frontend": ("WSRUNNER_FRONTEND", str),
    "heartbeat_interval_s": ("WSRUNNER_HEARTBEAT_INTERVAL", _positive_float),
    "lease_ttl_s": ("WSRUNNER_LEASE_TTL", _positive_float),
    "reconcile_interval_s": ("WSRUNNER_RECONCILE_INTERVAL", _positive_float),
    "max_attempts": ("WSRUNNER_MAX_ATTEMPTS", _positive_int),
    "shutdown_grace_s": ("WSRUNNER_SHUTDOWN_GRACE", _positive_float),
    "kill_grace_s": ("WSRUNNER_KILL_GRACE", _positive_float),
    "read_cap_bytes": ("WSRUNNER_READ_CAP", _positive_int),
    "list_cap_entries": ("WSRUNNER_LIST_CAP", _positive_int),
    "git_schemes": ("WSRUNNER_GIT_SCHEMES", _names),
    "policy_file": ("POLICY_FILE", Path),
    "policy_dir": ("POLICY_DIR", Path),
    "sandbox_uids": ("WSRUNNER_SANDBOX_UIDS", UidRange.parse),
    "sandbox": ("WSRUNNER_SANDBOX", _sandbox_mode),
    "warm_sandboxes": ("WSRUNNER_WARM_SANDBOXES", _flag),
    "warm_idle_s": ("WSRUNNER_WARM_IDLE", _positive_float),
    "warm_max": ("WSRUNNER_WARM_MAX", _positive_int),
    "log_level": ("LOG_LEVEL", _level),
    "log_format": ("LOG_FORMAT", _log_format),
}

#: YAML spelling of the quota in GB, as the environment variable has it.
_YAML_ALIASES: Final[dict[str, str]] = {"default_quota_gb": "default_quota_bytes"}
#: Settings whose values are never shown (in errors they are, as the operator typed them).
_SECRETS: Final = frozenset(f.name for f in fields(Settings) if not f.repr)


class SettingsError(ConfigError):
    """A settings file is invalid; `problems` are `file:line:col: key: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_database: bool = True,
    overrides: list[str] | None = None,
    origins: dict[str, str] | None = None,
) -> Settings:
    """Build the settings from `config_file` (YAML, optional) and then `environ`.

    `config_file` defaults to `$WSRUNNER_CONFIG`, else the installed `/etc/wsrunner/wsrunner.conf`
    when there is one. With the installed file, the command also reads what the unit hands the
    service: the credentials beside it (`/etc/wsrunner/credentials/`, unless systemd passes
    `$CREDENTIALS_DIRECTORY`) and `/etc/default/wsrunner`; so `wsrunner tokens create` run by
    root writes to the store the service reads, and a user who cannot read them gets an error,
    never a quiet fallback to a store of their own.

    Raises ConfigError naming the key and source (SettingsError, listing every problem, for the
    file). `require_database` False: for commands that never reach PostgreSQL (`policy`).
    `overrides`, if given, receives one line per setting given differently in more than one
    place, naming both (the caller logs them once logging is set up); `origins` receives each
    setting's source (`file:line:col`, `credential NAME`, `environment variable NAME`).
    """
    env = os.environ if environ is None else environ
    path = settings_file(config_file, env)
    system = _system_config(path, env)
    values: dict[str, Any] = {}
    origins = {} if origins is None else origins
    notes = [] if overrides is None else overrides

    def give(name: str, value: Any, origin: str) -> None:
        if name in origins and values[name] != value:
            secret = name in _SECRETS
            old = "the value" if secret else repr(_shown(values[name]))
            new = "a value" if secret else repr(_shown(value))
            notes.append(f"{name}: {new} from {origin} overrides {old} from {origins[name]}")
        values[name], origins[name] = value, origin

    if path is not None:
        for name, (value, origin) in _read_yaml(path).items():
            give(name, value, origin)
    credentials = env.get("CREDENTIALS_DIRECTORY") or None
    if credentials is None and system is not None and _present(system / "credentials"):
        credentials = str(system / "credentials")
    for name, (value, origin) in _read_credentials(credentials).items():
        give(name, value, origin)
    layers = [(env, "environment variable {}")]
    if system is not None:  # the unit's EnvironmentFile=, below the environment as under systemd
        env_file = system_root(env) / SYSTEM_ENV_FILE
        layers.insert(0, (_read_env_file(env_file), f"{env_file}: {{}}"))
    for variables, place in layers:
        for name, (var, convert) in _SOURCES.items():
            if var and variables.get(var, "") != "":
                where = place.format(var)
                give(name, _convert(name, variables[var], convert, where), where)
    values.setdefault("worker_id", default_worker_id())
    if system is not None:
        values.setdefault("state_dir", system_root(env) / SYSTEM_STATE)  # the unit's
        if _present(system / "policy.yaml"):
            values.setdefault("policy_file", system / "policy.yaml")
    values.setdefault("state_dir", _default_state_dir())
    backend = values.get("backend", "auto")
    if backend == "auto":  # neither REDIS_URL nor DATABASE_URL given: run on our own
        values["backend"] = (
            "redis" if values.get("database_url") or "redis_url" in values else "embedded"
        )
    settings = Settings(**values)
    if require_database and settings.backend == "redis" and not settings.database_url:
        raise ConfigError(
            "DATABASE_URL is not set: expected a PostgreSQL URL such as "
            "postgresql://user@127.0.0.1:5432/dbname (environment or `database_url` in the config)"
        )
    if settings.lease_ttl_s <= settings.heartbeat_interval_s:
        raise ConfigError(
            f"lease_ttl_s ({settings.lease_ttl_s}) must be longer than heartbeat_interval_s "
            f"({settings.heartbeat_interval_s}), or every daemon would look dead between beats"
        )
    return settings


def settings_file(
    config_file: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The YAML file `load_settings` reads: `config_file`, else `$WSRUNNER_CONFIG`, else the
    installed `/etc/wsrunner/wsrunner.conf` if there is one, else none."""
    env = os.environ if environ is None else environ
    path = config_file or env.get("WSRUNNER_CONFIG") or None
    if path is not None:
        return Path(path)
    installed = system_root(env) / SYSTEM_CONFIG / "wsrunner.conf"
    return installed if _present(installed) else None


def _system_config(path: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The installed configuration directory if `path` is its settings file, else None."""
    system = system_root(environ) / SYSTEM_CONFIG
    if path is None or os.path.abspath(path.parent) != os.path.abspath(system):
        return None
    return system


def _present(path: Path) -> bool:
    """Whether `path` exists; one we may not look at counts (reading it then says why not)."""
    try:
        path.stat()
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _unreadable(what: str, exc: OSError) -> ConfigError:
    """The error for a file or directory of the configuration we may not read, with the fix."""
    hint = ""
    if isinstance(exc, PermissionError):
        hint = (
            "; the installed configuration is the service's: run this as root, or name "
            "settings of your own with --config or WSRUNNER_CONFIG"
        )
    return ConfigError(f"cannot read {what}: {exc.strerror}{hint}")


def _read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines of a systemd EnvironmentFile= (comments, blank lines, quotes)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise _unreadable(str(path), exc) from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ConfigError(f"{path}:{n}: expected KEY=value, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def _shown(value: Any) -> Any:
    """A value as the operator would write it (paths and tuples as text)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return value


#: systemd credential name (LoadCredential=) -> setting; they beat the YAML file, not the env.
_CREDENTIALS: Final = {
    "internal-token": "internal_token",
    "database-url": "database_url",
    "redis-url": "redis_url",
}


def _read_credentials(directory: str | None) -> dict[str, tuple[Any, str]]:
    """Secrets systemd passed as credentials: files in $CREDENTIALS_DIRECTORY, not variables,
    so the commands the daemon runs never inherit them."""
    out: dict[str, tuple[Any, str]] = {}
    if not directory:
        return out
    for cred, name in _CREDENTIALS.items():
        try:
            text = (Path(directory) / cred).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _unreadable(f"credential {cred} in {directory}", exc) from None
        if text:
            where = f"credential {cred} in {directory}"
            out[name] = (_convert(name, text, _SOURCES[name][1], where), where)
    return out


def _convert(name: str, raw: Any, convert: Callable[[Any], Any], where: str) -> Any:
    try:
        return convert(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} ({name}): {exc or 'invalid value'}; got {raw!r}") from None


_HINTS: Final = typing.get_type_hints(Settings)
_TEXT: Final = (str, Path, Path | None, UidRange)


def _wrong_type(name: str, value: Any) -> str | None:
    """Why a YAML `value` cannot be setting `name` (None: its type is right).

    YAML has types, so they are checked: an integer setting takes an integer, not a float, a
    boolean or a string; a number setting takes an integer or a float. Lists and mappings are
    left to their converters, which check their items.
    """
    hint = float if name == "default_quota_bytes" else _HINTS[name]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if hint is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, want = number and isinstance(value, int), "an integer"
    elif hint is float:
        ok, want = number, "a number"
    elif hint in _TEXT:
        ok, want = isinstance(value, str), "a string"
    else:
        return None
    return None if ok else f"must be {want}, not {_yaml_type(value)}"


def _yaml_type(value: Any) -> str:
    """`value`'s YAML type and the value, for messages: "a float (8081.9)"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    for kind, name in (
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (dict, "a mapping"),
        (list, "a list"),
    ):
        if isinstance(value, kind):
            return f"{name} ({value!r})" if kind in (int, float, str) else name
    return type(value).__name__


def _plain(node: Any) -> Any:
    """ruamel's node types as plain Python values (its scalars subclass int, float and str)."""
    if isinstance(node, dict):
        return {_plain(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, ScalarBoolean):  # an anchored boolean: an int subclass in ruamel
        return bool(node)
    for kind in (bool, int, float, str):
        if isinstance(node, kind):
            return kind(node)
    return node


def _read_yaml(path: Path) -> dict[str, tuple[Any, str]]:
    """Setting -> (value, `file:line:col`) of a YAML 1.2 file; SettingsError lists every problem.

    ruamel.yaml, as for the policy: YAML 1.2 (`yes` is a string, not true), no duplicate keys,
    and a position for every value.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _unreadable(f"config file {path}", exc) from None
    except UnicodeDecodeError as exc:
        raise SettingsError([f"{path}: invalid YAML: not UTF-8 ({exc.reason})"]) from None
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        data = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p).split("\n")[0]
        raise SettingsError([f"{where}: invalid YAML: {problem.strip()}"]) from None
    except Exception as exc:  # ruamel raises a few unmarked errors (bad characters, ...)
        raise SettingsError([f"{path}: invalid YAML: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, CommentedMap):
        raise SettingsError([f"{path}:1:1: expected a mapping of settings at the top level"])
    # The quota is spelled in GB in YAML, as in the environment.
    known = (set(_SOURCES) - set(_YAML_ALIASES.values())) | set(_YAML_ALIASES)
    out: dict[str, tuple[Any, str]] = {}
    problems: list[str] = []
    for key, node in data.items():
        if key not in known:
            line, col = data.lc.key(key)
            problems.append(
                f"{path}:{line + 1}:{col + 1}: {key}: unknown key {str(key)!r}; "
                f"expected one of {', '.join(sorted(known))}"
            )
            continue
        line, col = data.lc.value(key)
        where = f"{path}:{line + 1}:{col + 1}"
        name: str = _YAML_ALIASES.get(key, key)
        raw = _plain(node)
        if (wrong := _wrong_type(name, raw)) is not None:
            problems.append(f"{where}: {key}: {wrong}")
            continue
        try:
            out[name] = (_SOURCES[name][1](raw), where)
        except (TypeError, ValueError) as exc:
            problems.append(f"{where}: {key}: {exc or 'invalid value'}; got {raw!r}")
    if problems:
        raise SettingsError(problems)
    return out
