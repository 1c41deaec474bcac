"""The shape of a task on the wire, as pydantic models: they validate every queued payload and
API body (`wsrunner.payload.parse_task`), and the OpenAPI documents show them.

Lenient at the top level, strict inside. A payload may carry keys older producers send
(`agent_id`, `prompt`, `resources`, ...), which are ignored; a step or `credentials` with an
unknown key is refused. A null is as if the key were absent. Types are strict: `"60"` is not a
number and `true` is not an integer. `wsrunner.payload` turns the first error into a
`ValidationError` naming the field's path (`steps[2].timeout`) and what was expected; a field
whose errors need more than the generic sentence of their kind carries a `Says` that words them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Final, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from wsrunner import models

MAX_STEPS: Final = 100
MIN_TASK_TIMEOUT_S: Final = 10
MAX_TASK_TIMEOUT_S: Final = 3600
MAX_COMMAND_CHARS: Final = 65_536
MAX_PATH_CHARS: Final = 4096
MAX_CONTENT_BYTES: Final = 10 * 1024 * 1024  # one write_file step
MAX_DESCRIPTION_CHARS: Final = 1000
MAX_KEY_CHARS: Final = 255
MAX_NAME_CHARS: Final = 255  # a branch, a directory in repos/, a git identity
MAX_WORKSPACE_ID_CHARS: Final = 128

# JSON Schema patterns (ECMA-262, and the Rust regex pydantic-core runs). Neither has
# look-ahead, so "never two dots in a row" reads "a dot is followed by another character, or
# ends the value".
#: `wsrunner.payload.WORKSPACE_ID_RE` without `..`: a letter or digit first (so never `.`),
#: then letters, digits, `_`, `-` and `.`.
WORKSPACE_ID_PATTERN: Final = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?$"
#: `wsrunner.payload.BRANCH_RE` without `..`: what git allows, minus anything read as an option.
BRANCH_PATTERN: Final = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_/-])*\.?$"
ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
NO_NUL_PATTERN: Final = r"^[^\x00]*$"

#: Variables a task may not set. The runner's own (they keep the task inside its workspace);
#: and those that make the loader, libc, a shell at start-up or git run code or read files
#: the task chose. They only ever reach the sandbox, but a program there that trusts its
#: environment (git, a shell) must not be steered by the payload either.
RESERVED_ENV: Final = frozenset(
    {
        "PATH",
        "HOME",
        "PWD",
        "OLDPWD",
        "TMPDIR",
        "WORKSPACE_ID",
        "TASK_ID",
        "LANG",
        "LC_ALL",
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RES_OPTIONS",
        "TZDIR",
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "IFS",
        "CDPATH",
        "PS4",
        "PROMPT_COMMAND",
    }
)
#: Prefixes of variable names a task may not set (the loader, malloc, git, ssh, wsrunner).
RESERVED_ENV_PREFIXES: Final = ("LD_", "MALLOC_", "GIT_", "SSH_", "WSRUNNER_", "BASH_FUNC_")
_ENV_NAME: Final = re.compile(ENV_NAME_PATTERN)


def shown(value: object) -> str:
    """`value` as an error message quotes it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def canonical_uuid(value: object) -> str | None:
    """The canonical (lower-case, hyphenated) form of a UUID string; None for anything else."""
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    return None


# --- the checks pydantic's constraints do not express ----------------------------------------


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: `messages` is a dict
class Says:
    """How the errors of a field read, where the generic sentence of their kind would not say
    enough. With `expected`, every error of the field reads "expected {expected}, got {value}";
    `messages` words single kinds of error (pydantic's error types), as templates over the
    error's context and `value`."""

    expected: str | None = None
    messages: Mapping[str, str] = field(default_factory=dict)


def _fail(message: str, key: str | None = None) -> PydanticCustomError:
    """The error of one of our checks, `message` as it stands; `key` names the entry of a
    mapping at fault (`credentials.env_vars.<key>`)."""
    return PydanticCustomError("wsrunner", "{message}", {"message": message, "key": key})


def _not_blank(value: str) -> str:
    if not value.strip():
        raise _fail("must not be empty")
    return value


def _not_an_option(value: str) -> str:
    if value.startswith("-"):
        raise _fail("expected a repository URL, not an option")
    return value


def _a_directory_in_repos(value: str) -> str:
    if "/" in value or value.startswith((".", "-")):
        raise _fail(f"expected the name of a directory in repos/, got {shown(value)}")
    return value


def _no_control_characters(value: str) -> str:
    # A newline in a gitconfig value would inject arbitrary config (core.sshCommand ...).
    if any(ord(ch) < 32 or ch == "\x7f" for ch in value):
        raise _fail("must not contain control characters")
    return value


def _whole_number(value: object) -> object:
    """`60.0` is the integer 60: some producers write every number as a float."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _task_id(value: object) -> str:
    canonical = canonical_uuid(value)
    if canonical is None:
        raise _fail(f"expected a UUID, got {shown(value)}")
    return canonical


def _env_vars(value: object) -> dict[str, str]:
    """The task's variables, every name a valid one that is not reserved."""
    if not isinstance(value, dict):
        raise _fail(f"expected an object, got {shown(value)}")
    for name, text in value.items():
        if not _ENV_NAME.fullmatch(name):
            raise _fail("expected a variable name of letters, digits and '_'", name)
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
            raise _fail(
                "this variable is reserved: wsrunner sets it, or it makes the loader, libc, a "
                "shell or git run code the task chose; not allowed are "
                f"{', '.join(p + '*' for p in RESERVED_ENV_PREFIXES)} and "
                f"{', '.join(sorted(RESERVED_ENV))}",
                name,
            )
        if not isinstance(text, str) or "\x00" in text:
            raise _fail("expected a string without NUL characters", name)
    return value


# --- field types ------------------------------------------------------------------------------

#: a public API token's id (`wsrunner.tokens`), in payloads the daemon wrote
TOKEN_ID_PATTERN = r"^[0-9a-f]{12}$"

WorkspaceId = Annotated[
    str,
    Strict(),
    Field(
        max_length=MAX_WORKSPACE_ID_CHARS,
        pattern=WORKSPACE_ID_PATTERN,
        description="becomes a directory name; never two dots in a row",
    ),
    Says(
        expected="1-128 characters of letters, digits, '_', '-' or '.', starting with a "
        "letter or digit"
    ),
]
TaskId = Annotated[
    str, PlainValidator(_task_id), WithJsonSchema({"type": "string", "format": "uuid"})
]
TaskTimeout = Annotated[
    int,
    Strict(),
    Field(ge=MIN_TASK_TIMEOUT_S, le=MAX_TASK_TIMEOUT_S, description="seconds, for the whole task"),
    BeforeValidator(_whole_number),
    Says(expected=f"an integer from {MIN_TASK_TIMEOUT_S} to {MAX_TASK_TIMEOUT_S}"),
]
StepTimeout = Annotated[
    float,
    Strict(),
    Field(
        ge=1,
        le=MAX_TASK_TIMEOUT_S,
        description="seconds; never beyond what is left of the task's own timeout",
    ),
    Says(expected=f"a number of seconds from 1 to {MAX_TASK_TIMEOUT_S}"),
]
Key = Annotated[str, Strict(), Field(max_length=MAX_KEY_CHARS, pattern=NO_NUL_PATTERN)]
TaskType = Annotated[str, Strict(), Field(max_length=50, pattern=NO_NUL_PATTERN)]
Description = Annotated[
    str, Strict(), Field(max_length=MAX_DESCRIPTION_CHARS, pattern=NO_NUL_PATTERN)
]
Command = Annotated[
    str,
    Strict(),
    Field(
        min_length=1,
        max_length=MAX_COMMAND_CHARS,
        pattern=NO_NUL_PATTERN,
        description="run with /bin/sh -c",
    ),
    AfterValidator(_not_blank),
]
WorkspacePath = Annotated[
    str,
    Strict(),
    Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        pattern=NO_NUL_PATTERN,
        description="workspace-relative",
    ),
    AfterValidator(_not_blank),
]
#: A workspace-relative directory that may be left out: an empty one is the workspace itself.
Directory = Annotated[
    str,
    Strict(),
    Field(max_length=MAX_PATH_CHARS, pattern=NO_NUL_PATTERN, description="workspace-relative"),
]
RepoUrl = Annotated[
    str,
    Strict(),
    Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        pattern=NO_NUL_PATTERN,
        description="the repository's URL; never an option",
    ),
    AfterValidator(_not_blank),
    AfterValidator(_not_an_option),
]
RepoName = Annotated[
    str,
    Strict(),
    Field(
        min_length=1,
        max_length=MAX_NAME_CHARS,
        pattern=NO_NUL_PATTERN,
        description="a directory in repos/: no '/', not starting with '.' or '-'",
    ),
    AfterValidator(_not_blank),
    AfterValidator(_a_directory_in_repos),
]
Branch = Annotated[
    str,
    Strict(),
    Field(max_length=MAX_NAME_CHARS, pattern=BRANCH_PATTERN),
    Says(
        messages={
            "string_pattern_mismatch": "expected a branch name of letters, digits, '.', "
            "'_', '/' or '-', not starting with '-', got {value}"
        }
    ),
]
Content = Annotated[
    str,
    Strict(),
    Field(max_length=MAX_CONTENT_BYTES, description="text; at most 10 MiB"),
    Says(messages={"string_too_long": "expected at most {max_length} bytes, got more"}),
]
Identity = Annotated[
    str,
    Strict(),
    Field(max_length=MAX_NAME_CHARS, pattern=NO_NUL_PATTERN, description="no control characters"),
    AfterValidator(_no_control_characters),
]
SshKey = Annotated[str, Strict(), Field(max_length=65_536, pattern=NO_NUL_PATTERN)]
EnvVars = Annotated[
    dict[str, str],
    PlainValidator(_env_vars),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {
                "pattern": ENV_NAME_PATTERN,
                "not": {
                    "anyOf": [
                        {"enum": sorted(RESERVED_ENV)},
                        {"pattern": f"^({'|'.join(RESERVED_ENV_PREFIXES)})"},
                    ]
                },
            },
            "additionalProperties": {"type": "string", "pattern": NO_NUL_PATTERN},
            "description": "set for this task only; the reserved names are refused",
        }
    ),
]


# --- the models -------------------------------------------------------------------------------


class _Shape(BaseModel):
    """Strict about keys (`extra`). A field given as null is as if it were absent, as is an
    empty string for the fields in `blank_is_default`; an unknown key is refused either way."""

    model_config = ConfigDict(extra="forbid")
    blank_is_default: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _absent_if_null(cls, data: Any) -> Any:
        # Not an object (pydantic says so), or nothing to drop: as it is, the usual case.
        if not isinstance(data, dict) or (None not in data.values() and "" not in data.values()):
            return data
        fields, blank = cls.model_fields, cls.blank_is_default
        return {
            k: v
            for k, v in data.items()
            if not ((v is None and k in fields) or (v == "" and k in blank))
        }


class _Step(_Shape):
    """A step: the fields of its action, and a description."""

    description: Description | None = Field(None, description="shown in progress events")


class ExecuteCommandStep(_Step):
    """Run a shell command (`/bin/sh -c`) in the workspace."""

    blank_is_default = frozenset({"cwd"})
    action: Literal["execute_command", "shell"] = Field(
        description="`shell` is an alias of `execute_command` (the reference system's)"
    )
    command: Command
    cwd: Directory = "."
    timeout: StepTimeout = 120.0

    def to_step(self) -> models.ExecuteCommand:
        return models.ExecuteCommand(
            command=self.command, cwd=self.cwd, timeout=self.timeout, description=self.description
        )


class GitCloneStep(_Step):
    """Clone a repository into `repos/<name>`; an existing clone of the same remote is pulled."""

    action: Literal["git_clone"]
    repo: RepoUrl
    branch: Branch | None = None
    shallow: Annotated[bool, Strict()] = True

    def to_step(self) -> models.GitClone:
        return models.GitClone(
            repo=self.repo, branch=self.branch, shallow=self.shallow, description=self.description
        )


class GitPullStep(_Step):
    """Pull an already cloned repository, optionally checking out `branch` first."""

    action: Literal["git_pull"]
    repo_name: RepoName
    branch: Branch | None = None

    def to_step(self) -> models.GitPull:
        return models.GitPull(
            repo_name=self.repo_name, branch=self.branch, description=self.description
        )


class ReadFileStep(_Step):
    """Read a text file of the workspace (capped)."""

    action: Literal["read_file"]
    path: WorkspacePath

    def to_step(self) -> models.ReadFile:
        return models.ReadFile(path=self.path, description=self.description)


class WriteFileStep(_Step):
    """Write a text file, creating its parent directories."""

    action: Literal["write_file"]
    path: WorkspacePath
    content: Content

    def to_step(self) -> models.WriteFile:
        return models.WriteFile(path=self.path, content=self.content, description=self.description)


class ListDirectoryStep(_Step):
    """List the entries of a directory (capped)."""

    blank_is_default = frozenset({"path"})
    action: Literal["list_directory"]
    path: Directory = "."

    def to_step(self) -> models.ListDirectory:
        return models.ListDirectory(path=self.path, description=self.description)


class CreateDirectoryStep(_Step):
    """Create a directory and its parents."""

    action: Literal["create_directory"]
    path: WorkspacePath

    def to_step(self) -> models.CreateDirectory:
        return models.CreateDirectory(path=self.path, description=self.description)


StepShape = (
    ExecuteCommandStep
    | GitCloneStep
    | GitPullStep
    | ReadFileStep
    | WriteFileStep
    | ListDirectoryStep
    | CreateDirectoryStep
)
Step = Annotated[StepShape, Field(discriminator="action")]
#: Each step's model by its `action` (an alias included).
STEP_MODELS: Final[Mapping[str, type[StepShape]]] = {
    action: model
    for model in get_args(StepShape)
    for action in get_args(model.model_fields["action"].annotation)
}
#: The actions, without their aliases (each model's first).
ACTIONS: Final = tuple(
    sorted(get_args(m.model_fields["action"].annotation)[0] for m in get_args(StepShape))
)


class Credentials(_Shape):
    """Secrets injected for one task only and removed when it ends; from a producer's queue
    payload only, never over the API."""

    git_name: Identity | None = None
    git_email: Identity | None = None
    env_vars: EnvVars | None = None
    ssh_private_key: SshKey | None = None

    def to_credentials(self) -> models.Credentials:
        return models.Credentials(
            ssh_private_key=self.ssh_private_key,
            git_name=self.git_name,
            git_email=self.git_email,
            env_vars=self.env_vars or {},
        )


class TaskRequest(_Shape):
    """A task, as the public API takes it. Other top-level keys are ignored."""

    model_config = ConfigDict(extra="ignore")
    blank_is_default = frozenset({"priority", "task_type"})
    workspace_id: WorkspaceId
    steps: Annotated[
        list[Step],
        Field(min_length=1, max_length=MAX_STEPS, description="run in order"),
        Says(
            messages={
                "too_short": "expected at least {min_length} step, got an empty list",
                "too_long": "expected at most {max_length} steps, got {actual_length}",
            }
        ),
    ]
    priority: Annotated[
        models.Priority,
        Says(expected="one of critical, high, normal, low"),
        Field(description="a higher one is always served first"),
    ] = models.Priority.NORMAL
    timeout_seconds: TaskTimeout = 300
    stop_on_error: Annotated[
        bool, Strict(), Field(description="skip the steps after a failed one")
    ] = False
    task_type: TaskType = "background_job"
    idempotency_key: Key | None = Field(
        None, description="a retry with the same key and body returns the first task"
    )
    correlation_id: Key | None = None


class QueuedTask(TaskRequest):
    """A task as a producer queues it (the reference system's payload): the request, with its
    id and, optionally, credentials."""

    task_id: TaskId | None = None
    credentials: Credentials | None = None
    token_id: (
        Annotated[
            str,
            Strict(),
            Field(pattern=TOKEN_ID_PATTERN, description="the API token that submitted it"),
        ]
        | None
    ) = None
