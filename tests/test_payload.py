"""Payload and request validation: every error names the field and what was expected."""

from __future__ import annotations

import json
import uuid

import pytest

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
from wsrunner.payload import parse_task, to_configuration, to_payload

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
    ],
)
def test_bad_input_names_the_field(override, field, expected) -> None:
    with pytest.raises(ValidationError) as info:
        parse_task(body(**override))
    assert info.value.field == field
    assert expected in str(info.value)


def test_reference_payload_parses_and_round_trips() -> None:
    spec = parse_task(body(priority="high", timeout_seconds=60, prompt="ignored", agent_id=3,
                           steps=[cmd("ls", cwd="repos", timeout=30),
                                  {"action": "shell", "command": "echo"},
                                  {"action": "git_clone", "repo": "https://tok@github.com/a/b.git"}]))  # fmt: skip
    assert spec.priority is Priority.HIGH and spec.timeout_seconds == 60
    assert spec.steps[0] == ExecuteCommand(command="ls", cwd="repos", timeout=30.0)
    assert isinstance(spec.steps[1], ExecuteCommand)
    assert isinstance(spec.steps[2], GitClone)
    assert parse_task(to_payload(spec)) == spec
    assert "tok@" not in str(to_configuration(spec)) and "tok@" not in repr(spec)


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
