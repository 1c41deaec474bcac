"""The wire format of a queued task: parse a JSON payload into a TaskSpec and write it back.

The shape is the reference system's (`LPUSH workspace:tasks:{priority} <json>`), so producers
written for it work unchanged. Parsing is strict about what we execute (steps, paths, limits) and
tolerant of extra top-level keys older producers send (`agent_id`, `prompt`, `resources`, ...).
Every error names the path of the offending field, e.g. `steps[2].timeout`.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from wsrunner.errors import IdempotencyConflictError, ValidationError
from wsrunner.models import (
    JSON,
    CreateDirectory,
    Credentials,
    ExecuteCommand,
    GitClone,
    GitPull,
    ListDirectory,
    Priority,
    ReadFile,
    Step,
    TaskSpec,
    WriteFile,
)

MAX_STEPS: Final = 100
MIN_TASK_TIMEOUT_S: Final = 10
MAX_TASK_TIMEOUT_S: Final = 3600
MAX_COMMAND_CHARS: Final = 65_536
MAX_PATH_CHARS: Final = 4096
MAX_CONTENT_BYTES: Final = 10 * 1024 * 1024  # one write_file step
MAX_DESCRIPTION_CHARS: Final = 1000
MAX_KEY_CHARS: Final = 255

#: A workspace id becomes a directory name: a letter or digit first (so never `.` or `..`),
#: then letters, digits, `_`, `-` and `.`; no `/`, no NUL, nothing a shell would expand.
WORKSPACE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: git ref names we accept for `branch`: what git allows, minus anything that reads as an option.
BRANCH_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
#: Variables a task may not set. The runner's own (they keep the task inside its workspace);
#: and those that make the loader, libc, a shell at start-up or git run code or read files
#: the task chose. They only ever reach the sandbox, but a program there that trusts its
#: environment (git, a shell) must not be steered by the payload either.
RESERVED_ENV: Final = frozenset({
    "PATH", "HOME", "PWD", "OLDPWD", "TMPDIR", "WORKSPACE_ID", "TASK_ID", "LANG", "LC_ALL",
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
    "NIS_PATH", "NLSPATH", "RES_OPTIONS", "TZDIR", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS",
    "IFS", "CDPATH", "PS4", "PROMPT_COMMAND",
})  # fmt: skip
#: Prefixes of variable names a task may not set (the loader, malloc, git, ssh, wsrunner).
RESERVED_ENV_PREFIXES: Final = ("LD_", "MALLOC_", "GIT_", "SSH_", "WSRUNNER_", "BASH_FUNC_")


def validate_workspace_id(value: object, field: str = "workspace_id") -> str:
    """Return `value` if it is a safe workspace id, else raise ValidationError naming `field`."""
    if not isinstance(value, str) or not WORKSPACE_ID_RE.fullmatch(value) or ".." in value:
        raise ValidationError(
            field,
            "expected 1-128 characters of letters, digits, '_', '-' or '.', starting with a "
            f"letter or digit, got {_shown(value)}",
        )
    return value


def validate_task_id(value: object, field: str = "task_id") -> str:
    """Return the canonical (lower-case, hyphenated) form of a UUID task id."""
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise ValidationError(field, f"expected a UUID, got {_shown(value)}")


def parse_task(obj: object, *, task_id: str | None = None) -> TaskSpec:
    """Validate a decoded payload (or API body) and return the TaskSpec it describes.

    Args:
        obj: the decoded JSON object.
        task_id: the id to use when `obj` has none (the submit path assigns one).

    Raises:
        ValidationError: naming the first offending field and what was expected.
    """
    r = _Reader(obj, "")
    steps_raw = r.get("steps", list, required=True)
    if not steps_raw:
        raise ValidationError("steps", "expected at least 1 step, got an empty list")
    if len(steps_raw) > MAX_STEPS:
        raise ValidationError("steps", f"expected at most {MAX_STEPS} steps, got {len(steps_raw)}")
    if task_id is None or "task_id" in r.obj:
        task_id = validate_task_id(r.obj.get("task_id"))
    priority = r.get("priority", str) or "normal"
    try:
        prio = Priority(priority)
    except ValueError:
        raise ValidationError(
            "priority", f"expected one of critical, high, normal, low, got {_shown(priority)}"
        ) from None
    timeout = r.get_int("timeout_seconds", MIN_TASK_TIMEOUT_S, MAX_TASK_TIMEOUT_S)
    creds = r.get("credentials", dict)
    return TaskSpec(
        task_id=task_id,
        workspace_id=validate_workspace_id(r.obj.get("workspace_id")),
        steps=tuple(_parse_step(s, f"steps[{i}]") for i, s in enumerate(steps_raw)),
        priority=prio,
        timeout_seconds=300 if timeout is None else timeout,
        stop_on_error=bool(r.get("stop_on_error", bool)),
        task_type=r.get_str("task_type", max_chars=50) or "background_job",
        idempotency_key=r.get_str("idempotency_key", max_chars=MAX_KEY_CHARS),
        correlation_id=r.get_str("correlation_id", max_chars=MAX_KEY_CHARS),
        credentials=None if creds is None else _parse_credentials(creds),
    )


def to_payload(spec: TaskSpec, *, created_at: datetime | None = None) -> JSON:
    """The queue payload for `spec`, in the reference system's shape (credentials included)."""
    payload: JSON = {
        "task_id": spec.task_id,
        "task_type": spec.task_type,
        "workspace_id": spec.workspace_id,
        "agent_id": None,
        "priority": spec.priority.value,
        "timeout_seconds": spec.timeout_seconds,
        "stop_on_error": spec.stop_on_error,
        "steps": [step_to_json(s) for s in spec.steps],
        "created_at": (created_at or datetime.now(UTC)).isoformat(),
    }
    if spec.idempotency_key is not None:
        payload["idempotency_key"] = spec.idempotency_key
    if spec.correlation_id is not None:
        payload["correlation_id"] = spec.correlation_id
    if spec.credentials is not None:
        c = spec.credentials
        payload["credentials"] = {
            k: v
            for k, v in {
                "ssh_private_key": c.ssh_private_key,
                "git_name": c.git_name,
                "git_email": c.git_email,
                "env_vars": dict(c.env_vars) or None,
            }.items()
            if v is not None
        }
    return payload


def request_hash(spec: TaskSpec, configuration: JSON) -> str | None:
    """A stable digest of what was asked for, to tell a retried submit from a different one;
    None for a task without an idempotency key (nothing is ever compared with it)."""
    if spec.idempotency_key is None:
        return None
    blob = json.dumps([spec.workspace_id, spec.priority.value, configuration], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_idempotent_replay(spec: TaskSpec, digest: str | None,
                            existing: Mapping[str, Any]) -> None:  # fmt: skip
    """Raise if `existing` (a stored row that took `spec`'s place) holds `spec`'s idempotency
    key for a different request; a same-key, same-body retry is fine."""
    key = spec.idempotency_key
    if (
        key is not None
        and existing["idempotency_key"] == key
        and existing["request_hash"] != digest
    ):
        raise IdempotencyConflictError(
            f"idempotency key {key!r} was already used in workspace {spec.workspace_id} "
            f"for task {existing['id']} with a different request"
        )


def to_configuration(spec: TaskSpec) -> JSON:
    """What the durable record keeps of `spec`: everything needed to re-run it, minus secrets."""
    return {
        "steps": [step_to_json(s, redact=True) for s in spec.steps],
        "timeout_seconds": spec.timeout_seconds,
        "stop_on_error": spec.stop_on_error,
        "has_credentials": spec.credentials is not None,
    }


def step_to_json(step: Step, *, redact: bool = False) -> JSON:
    """The wire form of one step; with `redact`, user:password in clone URLs is removed."""
    out: JSON = {"action": step.action}
    for name in step.__dataclass_fields__:
        if name == "action":
            continue
        value = getattr(step, name)
        if value is None:
            continue
        if redact and isinstance(step, GitClone) and name == "repo":
            value = redact_url(value)
        out[name] = value
    return out


def redact_url(url: str) -> str:
    """`url` without the userinfo part (`https://token@host/x` -> `https://host/x`)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url)


# --- internals --------------------------------------------------------------------------------


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES: Final = {str: "a string", int: "an integer", bool: "a boolean", list: "a list",
                      dict: "an object", float: "a number"}  # fmt: skip


@dataclass(slots=True)
class _Reader:
    """Typed access to one JSON object, raising errors that carry the field path."""

    raw: object
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.raw, dict):
            raise ValidationError(self.path, f"expected an object, got {_shown(self.raw)}")

    @property
    def obj(self) -> dict[str, Any]:
        assert isinstance(self.raw, dict)
        return self.raw

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type, *, required: bool = False) -> Any:
        value = self.obj.get(key)
        if value is None:
            if required:
                raise ValidationError(self.field(key), f"is required ({_TYPE_NAMES[kind]})")
            return None
        # bool is an int subclass: `true` is not a valid timeout.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValidationError(
                self.field(key), f"expected {_TYPE_NAMES[kind]}, got {_shown(value)}"
            )
        return value

    def get_str(
        self, key: str, *, required: bool = False, max_chars: int = MAX_PATH_CHARS
    ) -> str | None:
        value: str | None = self.get(key, str, required=required)
        if value is not None:
            if required and not value.strip():
                raise ValidationError(self.field(key), "must not be empty")
            if len(value) > max_chars:
                raise ValidationError(
                    self.field(key), f"expected at most {max_chars} characters, got {len(value)}"
                )
            if "\x00" in value:
                raise ValidationError(self.field(key), "must not contain a NUL character")
        return value

    def get_int(self, key: str, lo: int, hi: int) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValidationError(
                self.field(key), f"expected an integer from {lo} to {hi}, got {_shown(value)}"
            )
        return value

    def check_keys(self, allowed: frozenset[str]) -> None:
        for key in self.obj:
            if key not in allowed:
                raise ValidationError(
                    self.field(key), f"unknown field; expected one of {', '.join(sorted(allowed))}"
                )


def validate_branch(value: object, field: str = "branch") -> str:
    """Return `value` if it is a branch name we pass to git, else raise ValidationError."""
    if not isinstance(value, str) or not BRANCH_RE.fullmatch(value) or ".." in value:
        raise ValidationError(
            field,
            "expected a branch name of letters, digits, '.', '_', '/' or '-', not starting "
            f"with '-', got {_shown(value)}",
        )
    return value


def _branch(r: _Reader) -> str | None:
    branch = r.get_str("branch", max_chars=255)
    return None if branch is None else validate_branch(branch, r.field("branch"))


def _parse_step(raw: object, path: str) -> Step:
    r = _Reader(raw, path)
    action = r.get_str("action", required=True, max_chars=32)
    if action == "shell":  # the reference accepted this alias
        action = "execute_command"
    parser = _STEP_PARSERS.get(action or "")
    if parser is None:
        raise ValidationError(
            r.field("action"),
            f"expected one of {', '.join(sorted(_STEP_PARSERS))}, got {_shown(action)}",
        )
    fields, build = parser
    r.check_keys(fields | {"action", "description"})
    description = r.get_str("description", max_chars=MAX_DESCRIPTION_CHARS)
    return build(r, description)


def _exec(r: _Reader, description: str | None) -> Step:
    timeout = r.obj.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 1 <= timeout <= MAX_TASK_TIMEOUT_S
    ):
        raise ValidationError(
            r.field("timeout"),
            f"expected a number of seconds from 1 to {MAX_TASK_TIMEOUT_S}, got {_shown(timeout)}",
        )
    command = r.get_str("command", required=True, max_chars=MAX_COMMAND_CHARS)
    assert command is not None
    return ExecuteCommand(
        command=command,
        cwd=r.get_str("cwd") or ".",
        timeout=120.0 if timeout is None else float(timeout),
        description=description,
    )


def _clone(r: _Reader, description: str | None) -> Step:
    repo = r.get_str("repo", required=True)
    assert repo is not None
    if repo.startswith("-"):
        raise ValidationError(r.field("repo"), "expected a repository URL, not an option")
    shallow = r.get("shallow", bool)
    return GitClone(
        repo=repo,
        branch=_branch(r),
        shallow=True if shallow is None else shallow,
        description=description,
    )


def _pull(r: _Reader, description: str | None) -> Step:
    name = r.get_str("repo_name", required=True, max_chars=255)
    assert name is not None
    if "/" in name or name.startswith((".", "-")):
        raise ValidationError(
            r.field("repo_name"), f"expected the name of a directory in repos/, got {_shown(name)}"
        )
    return GitPull(repo_name=name, branch=_branch(r), description=description)


def _path(r: _Reader, *, required: bool = True) -> str:
    return r.get_str("path", required=required) or "."


def _write(r: _Reader, description: str | None) -> Step:
    content = r.get("content", str, required=True)
    if len(content) > MAX_CONTENT_BYTES:  # characters <= bytes; checked again when encoded
        raise ValidationError(
            r.field("content"), f"expected at most {MAX_CONTENT_BYTES} bytes, got more"
        )
    return WriteFile(path=_path(r), content=content, description=description)


_STEP_PARSERS: Final[Mapping[str, tuple[frozenset[str], Callable[[_Reader, str | None], Step]]]] = {
    "execute_command": (frozenset({"command", "cwd", "timeout"}), _exec),
    "git_clone": (frozenset({"repo", "branch", "shallow"}), _clone),
    "git_pull": (frozenset({"repo_name", "branch"}), _pull),
    "read_file": (frozenset({"path"}), lambda r, d: ReadFile(path=_path(r), description=d)),
    "write_file": (frozenset({"path", "content"}), _write),
    "list_directory": (
        frozenset({"path"}),
        lambda r, d: ListDirectory(path=_path(r, required=False), description=d),
    ),
    "create_directory": (
        frozenset({"path"}),
        lambda r, d: CreateDirectory(path=_path(r), description=d),
    ),
}


def _parse_credentials(raw: object) -> Credentials:
    r = _Reader(raw, "credentials")
    r.check_keys(frozenset({"ssh_private_key", "git_name", "git_email", "env_vars"}))
    ident = {}
    for key in ("git_name", "git_email"):
        value = r.get_str(key, max_chars=255)
        # A newline in a gitconfig value would inject arbitrary config (core.sshCommand ...).
        if value is not None and any(ord(ch) < 32 or ch == "\x7f" for ch in value):
            raise ValidationError(r.field(key), "must not contain control characters")
        ident[key] = value
    env_raw = r.get("env_vars", dict) or {}
    env: dict[str, str] = {}
    for name, value in env_raw.items():
        where = f"credentials.env_vars.{name}"
        if not ENV_NAME_RE.fullmatch(name):
            raise ValidationError(where, "expected a variable name of letters, digits and '_'")
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
            raise ValidationError(
                where, "this variable is reserved: wsrunner sets it, or it makes the loader, "
                "libc, a shell or git run code the task chose; not allowed are "
                f"{', '.join(p + '*' for p in RESERVED_ENV_PREFIXES)} and "
                f"{', '.join(sorted(RESERVED_ENV))}",
            )  # fmt: skip
        if not isinstance(value, str) or "\x00" in value:
            raise ValidationError(where, "expected a string without NUL characters")
        env[name] = value
    return Credentials(
        ssh_private_key=r.get_str("ssh_private_key", max_chars=65_536),
        git_name=ident["git_name"],
        git_email=ident["git_email"],
        env_vars=env,
    )
