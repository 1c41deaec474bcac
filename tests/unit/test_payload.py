"""Payload and request validation: every error names the field and what was expected."""

from __future__ import annotations

import itertools
import json
import uuid

import pytest
from pydantic import TypeAdapter

from tests.conftest import cmd
from wsrunner.backends.postgres.store import _json_text
from wsrunner.errors import ValidationError
from wsrunner.models import (
    TRANSITIONS,
    EncodedJSON,
    ExecuteCommand,
    GitClone,
    Priority,
    TaskState,
    json_text,
    sources_of,
)
from wsrunner.payload import (
    parse_task,
    to_configuration,
    to_payload,
    validate_branch,
    validate_workspace_id,
)
from wsrunner.taskshape import Branch, WorkspaceId

TID = str(uuid.uuid4())


def body(**kw):
    return {"task_id": TID, "workspace_id": "ws", "steps": [cmd("true")], **kw}


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ({"workspace_id": ".."}, "workspace_id", "letters, digits"),
        ({"workspace_id": "a/b"}, "workspace_id", "letters, digits"),
        ({"workspace_id": "../x"}, "workspace_id", "starting with a letter"),
        ({"workspace_id": None}, "workspace_id", "got None"),
        ({"steps": []}, "steps", "at least 1 step"),
        ({"steps": [cmd("true")] * 101}, "steps", "at most 100"),
        ({"steps": "echo"}, "steps", "a list"),
        ({"priority": "urgent"}, "priority", "critical, high, normal, low"),
        ({"timeout_seconds": 5}, "timeout_seconds", "from 10 to 3600"),
        ({"timeout_seconds": 3601}, "timeout_seconds", "from 10 to 3600"),
        ({"timeout_seconds": True}, "timeout_seconds", "integer"),
        ({"task_id": "nope"}, "task_id", "a UUID"),
        ({"steps": [{"action": "format_disk"}]}, "steps[0].action", "execute_command"),
        ({"steps": [{"action": "execute_command"}]}, "steps[0].command", "is required"),
        ({"steps": [cmd("x", timeout=0)]}, "steps[0].timeout", "from 1 to 3600"),
        ({"steps": [cmd("x", comand="typo")]}, "steps[0].comand", "unknown field"),
        (
            {"steps": [{"action": "git_clone", "repo": "--upload-pack=x"}]},
            "steps[0].repo",
            "not an option",
        ),
        (
            {"steps": [{"action": "git_clone", "repo": "r", "branch": "-x"}]},
            "steps[0].branch",
            "branch name",
        ),
        (
            {"steps": [{"action": "git_pull", "repo_name": "../x"}]},
            "steps[0].repo_name",
            "directory in repos/",
        ),
        ({"steps": [{"action": "read_file", "path": "a\x00b"}]}, "steps[0].path", "NUL"),
        ({"credentials": {"git_name": "a\n[core]"}}, "credentials.git_name", "control characters"),
        (
            {"credentials": {"env_vars": {"PATH": "/evil"}}},
            "credentials.env_vars.PATH",
            "reserved",
        ),
        ({"credentials": {"password": "x"}}, "credentials.password", "unknown field"),
        # An unknown key is refused even when null, and named before what it misspells.
        ({"steps": [cmd("x", bogus=None)]}, "steps[0].bogus", "unknown field"),
        ({"steps": [{"action": "execute_command", "comand": "x"}]}, "steps[0].comand", "unknown"),
        ({"credentials": {"password": None}}, "credentials.password", "unknown field"),
        # Strict types: a string is not a number, a number is not a string or a boolean.
        ({"timeout_seconds": "60"}, "timeout_seconds", "from 10 to 3600, got '60'"),
        ({"timeout_seconds": 60.5}, "timeout_seconds", "from 10 to 3600, got 60.5"),
        ({"steps": [cmd("x", timeout="5")]}, "steps[0].timeout", "from 1 to 3600, got '5'"),
        ({"steps": [cmd("x", timeout=True)]}, "steps[0].timeout", "from 1 to 3600, got True"),
        ({"steps": [cmd(5)]}, "steps[0].command", "expected a string, got 5"),
        ({"stop_on_error": 1}, "stop_on_error", "expected a boolean, got 1"),
        ({"priority": 5}, "priority", "expected one of critical, high, normal, low, got 5"),
        # What a null, a blank or a wrong shape reads as.
        ({"steps": [cmd(None)]}, "steps[0].command", "is required (a string)"),
        ({"steps": [cmd("  ")]}, "steps[0].command", "must not be empty"),
        ({"steps": [{"command": "x"}]}, "steps[0].action", "is required (a string)"),
        ({"steps": [{"action": ["x"]}]}, "steps[0].action", "expected a string, got ['x']"),
        ({"steps": [None]}, "steps[0]", "expected an object, got None"),
        ({"steps": [cmd("x" * 65_537)]}, "steps[0].command", "at most 65536 characters"),
        ({"credentials": {"env_vars": {"A": 5}}}, "credentials.env_vars.A", "without NUL"),
        ({"credentials": {"env_vars": {"1A": "x"}}}, "credentials.env_vars.1A", "variable name"),
        ({"credentials": []}, "credentials", "expected an object, got []"),
    ],
)
def test_bad_input_names_the_field(override, field, expected) -> None:
    with pytest.raises(ValidationError) as info:
        parse_task(body(**override))
    assert info.value.field == field
    assert expected in str(info.value)


def test_reference_payload_parses_and_round_trips() -> None:
    spec = parse_task(
        body(
            priority="high",
            timeout_seconds=60,
            prompt="ignored",
            agent_id=3,
            steps=[
                cmd("ls", cwd="repos", timeout=30),
                {"action": "shell", "command": "echo"},
                {"action": "git_clone", "repo": "https://tok@github.com/a/b.git"},
            ],
        )
    )
    assert spec.priority is Priority.HIGH and spec.timeout_seconds == 60
    assert spec.steps[0] == ExecuteCommand(command="ls", cwd="repos", timeout=30.0)
    assert isinstance(spec.steps[1], ExecuteCommand)
    assert isinstance(spec.steps[2], GitClone)
    assert parse_task(to_payload(spec)) == spec
    assert "tok@" not in str(to_configuration(spec)) and "tok@" not in repr(spec)


def test_a_null_or_a_blank_default_is_as_if_absent_and_numbers_may_be_floats() -> None:
    spec = parse_task(
        body(
            priority=None,
            timeout_seconds=60.0,
            stop_on_error=None,
            task_type="",
            steps=[
                cmd("ls", cwd="", timeout=None, description=None),
                {"action": "list_directory", "path": ""},
                {"action": "git_clone", "repo": "r", "shallow": None},
            ],
        )
    )
    assert spec.priority is Priority.NORMAL and spec.timeout_seconds == 60
    assert not spec.stop_on_error and spec.task_type == "background_job"
    assert spec.steps[0] == ExecuteCommand(command="ls", cwd=".", timeout=120.0)
    assert spec.steps[1].path == "." and spec.steps[2] == GitClone(repo="r", shallow=True)
    assert parse_task({"workspace_id": "ws", "steps": [cmd("x")]}, task_id=TID).task_id == TID
    with pytest.raises(ValidationError, match="task_id: expected a UUID, got None"):
        parse_task({"workspace_id": "ws", "steps": [cmd("x")]})


def _strings(alphabet: str, longest: int) -> list[str]:
    short = ("".join(s) for n in range(longest + 1) for s in itertools.product(alphabet, repeat=n))
    return [*short, "a" * 127 + ".", "a" * 128, "a" * 129, "a" * 254 + "/", "a" * 255, "a" * 256]


@pytest.mark.parametrize(
    ("shape", "rule", "alphabet"),
    [(WorkspaceId, validate_workspace_id, "a.-_/Z9 \x00"), (Branch, validate_branch, "a.-_/9 ~")],
)
def test_the_documented_patterns_are_the_rules_the_core_applies(shape, rule, alphabet) -> None:
    """The models check a workspace id and a branch with one JSON Schema pattern each (no
    look-ahead: the OpenAPI documents show it); the rest of the core, with a regex and a test
    for `..`. Both accept the same strings."""
    adapter = TypeAdapter(shape)

    def accepted(check, value: str) -> bool:
        try:
            check(value)
        except ValueError:  # pydantic's ValidationError is one
            return False
        except ValidationError:
            return False
        return True

    for value in _strings(alphabet, 4):
        assert accepted(adapter.validate_python, value) == accepted(rule, value), repr(value)


def test_every_state_change_is_in_one_table() -> None:
    assert all(not TRANSITIONS[s] for s in TaskState if s.terminal)
    assert sources_of(TaskState.CANCELLED) == {TaskState.QUEUED, TaskState.RUNNING}
    assert sources_of(TaskState.COMPLETED) == {TaskState.RUNNING}
    assert TaskState.QUEUED in TRANSITIONS[TaskState.RUNNING]  # re-queue on shutdown or crash


def test_an_encoded_result_is_encoded_once_and_reads_as_its_object() -> None:
    value = {"status": "completed", "out": "é\u2028\u0000", "n": [1, 2]}
    encoded = EncodedJSON(value)
    assert encoded == value and json.loads(json_text(encoded)) == value
    assert json_text(encoded) == json.dumps(value) and json_text(value) == json.dumps(value)
    encoded["n"] = []  # the text was made once, when it was built
    assert json_text(encoded) == json.dumps(value)
    assert "\\ufffd" in _json_text(encoded) and "\\u0000" not in _json_text(encoded)
