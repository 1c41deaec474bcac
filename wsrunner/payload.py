"""The wire format of a queued task: parse a JSON payload into a TaskSpec and write it back.

The shape is the reference system's (`LPUSH workspace:tasks:{priority} <json>`), so producers
written for it work unchanged. `wsrunner.taskshape` holds the shape, as the models that validate
every payload and API body and that the OpenAPI documents show: strict about what we execute
(steps, paths, limits), tolerant of extra top-level keys older producers send (`agent_id`,
`prompt`, `resources`, ...). Every error names the path of the offending field, e.g.
`steps[2].timeout`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, get_args, get_origin

import pydantic
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from wsrunner import taskshape
from wsrunner.errors import IdempotencyConflictError, ValidationError
from wsrunner.models import JSON, GitClone, Step, TaskSpec
from wsrunner.taskshape import canonical_uuid, shown

#: A workspace id becomes a directory name: a letter or digit first (so never `.` or `..`),
#: then letters, digits, `_`, `-` and `.`; no `/`, no NUL, nothing a shell would expand.
#: (`validate_workspace_id` also refuses `..`; `taskshape.WORKSPACE_ID_PATTERN` is the same
#: rule as one JSON Schema pattern.)
WORKSPACE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: git ref names we accept for `branch`: what git allows, minus anything that reads as an option.
BRANCH_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")


def validate_workspace_id(value: object, field: str = "workspace_id") -> str:
    """Return `value` if it is a safe workspace id, else raise ValidationError naming `field`."""
    if not isinstance(value, str) or not WORKSPACE_ID_RE.fullmatch(value) or ".." in value:
        raise ValidationError(
            field,
            "expected 1-128 characters of letters, digits, '_', '-' or '.', starting with a "
            f"letter or digit, got {shown(value)}",
        )
    return value


def validate_task_id(value: object, field: str = "task_id") -> str:
    """Return the canonical (lower-case, hyphenated) form of a UUID task id."""
    canonical = canonical_uuid(value)
    if canonical is None:
        raise ValidationError(field, f"expected a UUID, got {shown(value)}")
    return canonical


def parse_task(obj: object, *, task_id: str | None = None) -> TaskSpec:
    """Validate a decoded payload (or API body) and return the TaskSpec it describes.

    Args:
        obj: the decoded JSON object.
        task_id: the id to use when `obj` has none (the submit path assigns one).

    Raises:
        ValidationError: naming the first offending field and what was expected.
    """
    task = _check(obj)
    if task.task_id is not None:
        task_id = task.task_id
    elif task_id is None or (isinstance(obj, dict) and "task_id" in obj):
        raise ValidationError("task_id", "expected a UUID, got None")
    return TaskSpec(
        task_id=task_id,
        workspace_id=task.workspace_id,
        steps=tuple(step.to_step() for step in task.steps),
        priority=task.priority,
        timeout_seconds=task.timeout_seconds,
        stop_on_error=task.stop_on_error,
        task_type=task.task_type,
        idempotency_key=task.idempotency_key,
        correlation_id=task.correlation_id,
        credentials=None if task.credentials is None else task.credentials.to_credentials(),
        token_id=task.token_id,
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
    if spec.token_id is not None:
        payload["token_id"] = spec.token_id
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


def check_idempotent_replay(
    spec: TaskSpec, digest: str | None, existing: Mapping[str, Any]
) -> None:
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
        **({"token_id": spec.token_id} if spec.token_id is not None else {}),
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


def validate_branch(value: object, field: str = "branch") -> str:
    """Return `value` if it is a branch name we pass to git, else raise ValidationError."""
    if not isinstance(value, str) or not BRANCH_RE.fullmatch(value) or ".." in value:
        raise ValidationError(
            field,
            "expected a branch name of letters, digits, '.', '_', '/' or '-', not starting "
            f"with '-', got {shown(value)}",
        )
    return value


# --- pydantic's errors, as ours ---------------------------------------------------------------


def _check(obj: object) -> taskshape.QueuedTask:
    """`obj` validated as a queued task; the first error as a ValidationError."""
    try:
        return taskshape.QueuedTask.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise _translate(exc.errors(include_url=False)) from None


def _translate(errors: list[ErrorDetails]) -> ValidationError:
    """Our error for the first of pydantic's: the field's path and what it expected. An unknown
    key goes first, as its name is the likelier mistake (`comand`, then `command` is missing)."""
    first = errors[0]
    container = first["loc"][:-1]
    chosen = next(
        (e for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] == container),
        first,
    )
    return _error(chosen)


_GENERIC: Final[Mapping[str, str]] = {
    "string_type": "expected a string, got {value}",
    "bool_type": "expected a boolean, got {value}",
    "list_type": "expected a list, got {value}",
    "dict_type": "expected an object, got {value}",
    "model_type": "expected an object, got {value}",
    "model_attributes_type": "expected an object, got {value}",
    "string_too_short": "must not be empty",
    "string_too_long": "expected at most {max_length} characters, got {length}",
}
_NOUNS: Final[Mapping[object, str]] = {
    str: "a string",
    list: "a list",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    dict: "an object",
}


def _error(error: ErrorDetails) -> ValidationError:
    kind, value, context = error["type"], error["input"], error.get("ctx") or {}
    path, owner, info = _locate(error["loc"])
    if kind in ("union_tag_not_found", "union_tag_invalid"):  # a step's `action`
        action = value.get("action") if isinstance(value, dict) else None
        return ValidationError(f"{path}.action", _action_message(action))
    if kind == "wsrunner":
        key = context.get("key")
        return ValidationError(path if key is None else f"{path}.{key}", context["message"])
    says = _says(info)
    if kind == "missing":
        value = None
    if says is not None and says.expected is not None:
        return ValidationError(path, f"expected {says.expected}, got {shown(value)}")
    if kind == "missing":
        return ValidationError(path, f"is required ({_noun(info)})")
    if kind == "extra_forbidden" and owner is not None:
        expected = ", ".join(sorted(owner.model_fields))
        return ValidationError(path, f"unknown field; expected one of {expected}")
    if kind == "string_pattern_mismatch" and "\x00" in value:
        return ValidationError(path, "must not contain a NUL character")
    template = (says.messages if says else {}).get(kind) or _GENERIC.get(kind)
    if template is None:
        return ValidationError(path, error["msg"])
    length = len(value) if isinstance(value, str | list | dict) else None
    return ValidationError(path, template.format(value=shown(value), length=length, **context))


def _action_message(action: object) -> str:
    """The error of a step whose `action` names no step (the order of checks of a string)."""
    if action is None:
        return "is required (a string)"
    if not isinstance(action, str):
        return f"expected a string, got {shown(action)}"
    if not action.strip():
        return "must not be empty"
    if len(action) > 32:
        return f"expected at most 32 characters, got {len(action)}"
    if "\x00" in action:
        return "must not contain a NUL character"
    return f"expected one of {', '.join(taskshape.ACTIONS)}, got {shown(action)}"


def _locate(loc: tuple[int | str, ...]) -> tuple[str, type[BaseModel] | None, FieldInfo | None]:
    """The field path of an error's location (`steps[2].timeout`), the model whose field or
    key it is, and the field (None for a key the model does not have)."""
    path, owner, info = "", None, None
    model: type[BaseModel] | None = taskshape.QueuedTask
    tag_next = False
    for part in loc:
        if isinstance(part, int):  # an item of `steps`; pydantic names its model next
            path, tag_next = f"{path}[{part}]", True
        elif tag_next:
            model, tag_next = taskshape.STEP_MODELS.get(part), False
        else:
            owner, info = model, model.model_fields.get(part) if model else None
            path = f"{path}.{part}" if path else part
            model = _model_of(info)
    return path, owner, info


def _model_of(info: FieldInfo | None) -> type[BaseModel] | None:
    """The model a field holds (`credentials`), if it holds one."""
    annotation = None if info is None else info.annotation
    for candidate in get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _says(info: FieldInfo | None) -> taskshape.Says | None:
    """The field's `Says`, also from inside an optional type (`Branch | None`)."""
    if info is None:
        return None
    found = [m for m in info.metadata if isinstance(m, taskshape.Says)]
    for arg in get_args(info.annotation):
        found += [m for m in getattr(arg, "__metadata__", ()) if isinstance(m, taskshape.Says)]
    return found[0] if found else None


def _noun(info: FieldInfo | None) -> str:
    annotation = None if info is None else info.annotation
    return _NOUNS.get(get_origin(annotation) or annotation, "a value")
