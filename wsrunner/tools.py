"""Agent tool definitions: the six workspace actions as JSON Schema tools, and their dispatch.

The names, categories and permissions are the reference platform's (`workspace_actions.py`);
each tool calls the same operation as the internal API (`wsrunner.workspace.operations`), so policy,
containment, limits and quotas are the same whichever way an agent comes in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from wsrunner.errors import ValidationError
from wsrunner.models import JSON
from wsrunner.workspace.operations import GIT_OPERATIONS, GIT_READS, WorkspaceOps

_PATH: Final = {
    "type": "string",
    "maxLength": 4096,
    "description": "path relative to the workspace root",
}


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    permission: str  #: "read" or "write"
    parameters: JSON  #: JSON Schema of the arguments
    run: Callable[[WorkspaceOps, str, dict[str, Any]], Awaitable[JSON]]
    category: str = "workspace"

    def definition(self) -> JSON:
        return {
            "name": self.name,
            "description": self.description,
            "category": self.category,
            "permission": self.permission,
            "parameters": self.parameters,
        }


def _schema(properties: dict[str, Any], required: list[str]) -> JSON:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


TOOLS: Final[dict[str, Tool]] = {
    t.name: t
    for t in (
        Tool(
            "workspace_read_file",
            "Read a text file of the workspace (binary files come back base64-encoded).",
            "read",
            _schema({"path": _PATH}, ["path"]),
            lambda ops, ws, a: ops.read_file(ws, a["path"]),
        ),
        Tool(
            "workspace_write_file",
            "Write a text file, creating its directories; replaces the file atomically.",
            "write",
            _schema({"path": _PATH, "content": {"type": "string"}}, ["path", "content"]),
            lambda ops, ws, a: ops.write_file(ws, a["path"], a["content"]),
        ),
        Tool(
            "workspace_list_dir",
            "List a directory: directories first, then files.",
            "read",
            _schema({"path": {**_PATH, "default": "."}}, []),
            lambda ops, ws, a: ops.list_files(ws, a.get("path", ".")),
        ),
        Tool(
            "workspace_grep",
            "Search files with a regular expression; matches sorted by file and line.",
            "read",
            _schema(
                {
                    "pattern": {"type": "string", "minLength": 1, "maxLength": 1000},
                    "path": {**_PATH, "default": "."},
                    "include": {"type": "string", "description": "a glob such as *.py"},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                },
                ["pattern"],
            ),
            lambda ops, ws, a: ops.grep(
                ws, a["pattern"], a.get("path", "."), a.get("include"), a.get("max_results", 50)
            ),
        ),
        Tool(
            "workspace_exec",
            "Run a shell command in the workspace; returns exit_code, stdout and stderr.",
            "write",
            _schema(
                {
                    "command": {"type": "string", "minLength": 1, "maxLength": 65536},
                    "cwd": {**_PATH, "default": "."},
                    "timeout": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 600,
                        "default": 120,
                        "description": "seconds",
                    },
                },
                ["command"],
            ),
            lambda ops, ws, a: ops.exec(ws, a["command"], a.get("cwd", "."), a.get("timeout")),
        ),
        Tool(
            "workspace_git",
            "Run one git operation in a repository of the workspace.",
            "write",
            _schema(
                {
                    "operation": {"enum": sorted(GIT_OPERATIONS)},
                    "cwd": {**_PATH, "default": "."},
                    "args": {
                        "oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "string"}},
                        ],
                        "description": "arguments; for clone, the repository URL",
                    },
                },
                ["operation"],
            ),
            lambda ops, ws, a: ops.git(ws, a["operation"], a.get("cwd", "."), a.get("args")),
        ),
    )
}


def writes(name: object, arguments: object) -> bool:
    """Whether calling tool `name` with `arguments` may write to the workspace (an unknown tool
    counts as writing; `call` refuses it)."""
    tool = TOOLS.get(name) if isinstance(name, str) else None
    if tool is None or (tool.permission == "write" and tool.name != "workspace_git"):
        return True
    if tool.name == "workspace_git":
        operation = arguments.get("operation") if isinstance(arguments, dict) else None
        return operation not in GIT_READS
    return False


def definitions() -> list[JSON]:
    return [tool.definition() for tool in TOOLS.values()]


async def call(ops: WorkspaceOps, workspace_id: str, name: object, arguments: object) -> JSON:
    """Run tool `name` with `arguments` in the workspace; ValidationError names a bad field."""
    tool = TOOLS.get(name) if isinstance(name, str) else None
    if tool is None:
        raise ValidationError("tool", f"expected one of {', '.join(TOOLS)}, got {name!r}")
    if not isinstance(arguments, dict):
        raise ValidationError("arguments", "expected a JSON object")
    schema = tool.parameters
    unknown = sorted(set(arguments) - set(schema["properties"]))
    if unknown:
        raise ValidationError(
            f"arguments.{unknown[0]}",
            f"unknown; {tool.name} takes {', '.join(schema['properties'])}",
        )
    for key in schema["required"]:
        if key not in arguments:
            raise ValidationError(f"arguments.{key}", "is required")
    try:
        return await tool.run(ops, workspace_id, arguments)
    except ValidationError as exc:
        field = exc.field if exc.field.startswith("arguments") else f"arguments.{exc.field}"
        raise ValidationError(field, exc.message) from None
