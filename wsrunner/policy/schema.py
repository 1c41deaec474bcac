"""The shape of a policy file (`apiVersion: wsrunner/v1`): pydantic models, strict and closed.

Strict mode means no coercion (`"5"` is not 5, `no` is not false) and `extra="forbid"` means a
misspelt key is an error, never a silent default. The same models produce the JSON Schema that
`wsrunner policy schema` prints for editors.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

RULE_ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|K|KB|KiB|M|MB|MiB|G|GB|GiB|T|TB|TiB)?\s*$")
_UNITS = {
    None: 1,
    "B": 1,
    "K": 1024,
    "KB": 1000,
    "KiB": 1024,
    "M": 1024**2,
    "MB": 1000**2,
    "MiB": 1024**2,
    "G": 1024**3,
    "GB": 1000**3,
    "GiB": 1024**3,
    "T": 1024**4,
    "TB": 1000**4,
    "TiB": 1024**4,
}


def _bytes(value: Any) -> Any:
    """`2GiB`, `512M`, `1.5 GB` or a plain integer, as a number of bytes."""
    if isinstance(value, bool):
        return value  # left for the int check to refuse
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m is None:
            raise ValueError("expected a size such as 512MiB, 2G or a number of bytes")
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    return value


Bytes = Annotated[int, BeforeValidator(_bytes), Field(ge=1)]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)


class Rule(_Closed):
    """One allow or deny rule.

    A command rule (`commands`, optionally `args`) is checked against every simple command of the
    line: its program name and, if given, a regular expression searched in its arguments joined
    by single spaces. A text rule (`pattern`) is a regular expression searched in the whole
    command text; text rules can only deny.
    """

    id: str = Field(pattern=RULE_ID, description="Stable name, quoted in errors and audit logs")
    action: Literal["allow", "deny"]
    commands: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="Program names (shell globs allowed: `python3.*`)"
    )
    args: str | None = Field(default=None, description="Regex searched in the arguments")
    pattern: str | None = Field(default=None, description="Regex searched in the whole text")
    reason: str = Field(default="", description="Why the rule exists; shown with a denial")

    @model_validator(mode="after")
    def _one_kind(self) -> Rule:
        if self.pattern is not None and (self.commands is not None or self.args is not None):
            raise ValueError("a rule has either `pattern` or `commands` (with `args`), not both")
        if self.pattern is None and self.commands is None:
            raise ValueError("a rule needs `commands` or `pattern`")
        if self.pattern is not None and self.action == "allow":
            raise ValueError("a `pattern` rule can only deny; allow programs with `commands`")
        if any("/" in c for c in self.commands or ()):
            raise ValueError("`commands` are bare program names; paths are always refused")
        for name in ("args", "pattern"):
            if (rx := getattr(self, name)) is not None:
                try:
                    re.compile(rx)
                except re.error as exc:
                    raise ValueError(f"`{name}` is not a valid regular expression: {exc}") from None
        return self


class Sandbox(_Closed):
    require: Literal["full", "partial", "none"] | None = Field(
        default=None, description="Lowest isolation commands may run under; `none` is explicit"
    )
    network: Literal["none", "egress", "host"] | None = Field(
        default=None,
        description="Network of commands: `none` (own empty namespace), `egress` (the internet "
        "through a user-mode stack; never the host or private ranges) or `host` (the host's "
        "network, loopback included: gives up that protection)",
    )
    gitNetwork: Literal["none", "egress", "host"] | None = Field(
        default=None,
        description="Network of the daemon's git clone, pull, fetch and push (default egress)",
    )
    egressAllow: list[str] | None = Field(
        default=None,
        description="Private IPv4 ranges (CIDR) an `egress` sandbox may reach, e.g. an "
        "internal git server; the host's loopback is never reachable",
    )
    protect: list[str] | None = Field(
        default=None, description="Workspace paths commands see read-only (.git/hooks, ...)"
    )
    readOnlyPaths: list[str] | None = Field(
        default=None, description="Extra absolute host paths visible read-only (toolchains)"
    )

    @model_validator(mode="after")
    def _paths(self) -> Sandbox:
        for p in self.protect or ():
            if p.startswith("/") or ".." in p.split("/") or not p.strip("/"):
                raise ValueError(f"protect: {p!r} must be a relative path inside the workspace")
        for net in self.egressAllow or ():
            try:
                parsed = ipaddress.IPv4Network(net)
            except ValueError:
                raise ValueError(
                    f"egressAllow: {net!r} is not an IPv4 network like 10.20.0.0/16"
                ) from None
            if parsed.is_loopback or parsed.overlaps(ipaddress.IPv4Network("127.0.0.0/8")):
                raise ValueError(
                    f"egressAllow: {net!r} overlaps loopback, which egress never reaches"
                )
        for p in self.readOnlyPaths or ():
            if not p.startswith("/") or ".." in p.split("/"):
                raise ValueError(f"readOnlyPaths: {p!r} must be an absolute path without `..`")
        return self


class Limits(_Closed):
    timeoutSeconds: int | None = Field(default=None, ge=1, description="Wall time of a command")
    memory: Bytes | None = Field(default=None, description="Memory of a command's processes")
    pids: int | None = Field(default=None, ge=1, description="Processes and threads at once")
    cpuSeconds: int | None = Field(default=None, ge=1, description="CPU time per process")
    cpus: float | None = Field(
        default=None, gt=0, le=1024, description="CPUs a command may keep busy at once (cgroup cpu)"
    )
    openFiles: int | None = Field(default=None, ge=16, description="Open files per process")
    fileSize: Bytes | None = Field(default=None, description="Largest file a command may write")
    stdoutBytes: Bytes | None = Field(default=None, description="Output kept per command")
    stderrBytes: Bytes | None = Field(default=None)


class Spec(_Closed):
    mode: Literal["enforce", "audit"] | None = Field(
        default=None, description="`audit` runs denied commands and logs that they would be denied"
    )
    rules: list[Rule] = Field(default_factory=list)
    sandbox: Sandbox = Field(default_factory=Sandbox)
    limits: Limits = Field(default_factory=Limits)


class Metadata(_Closed):
    name: str = Field(min_length=1)
    description: str = ""
    workspaces: list[str] | None = Field(
        default=None, description="Overlays only: workspace id globs it applies to (all if absent)"
    )


class PolicyDocument(_Closed):
    """A base policy (`kind: Policy`) or a drop-in (`kind: PolicyOverlay`)."""

    apiVersion: Literal["wsrunner/v1"]
    kind: Literal["Policy", "PolicyOverlay"]
    metadata: Metadata
    spec: Spec

    @model_validator(mode="after")
    def _base_is_complete(self) -> PolicyDocument:
        if self.kind == "Policy" and self.metadata.workspaces is not None:
            raise ValueError("metadata.workspaces belongs to a PolicyOverlay, not the base Policy")
        return self


class TestCase(_Closed):
    name: str = ""
    command: str = Field(min_length=1)
    workspace: str = "default"
    expect: Literal["allow", "deny", "audit"]
    rule: str | None = Field(default=None, description="The rule id expected to decide")


class TestSuite(_Closed):
    """A file of policy test cases (`wsrunner policy test --cases FILE`)."""

    __test__ = False  # not a pytest class
    apiVersion: Literal["wsrunner/v1"]
    kind: Literal["PolicyTest"]
    cases: list[TestCase] = Field(min_length=1)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of policy files, for editors (`# yaml-language-server: $schema=...`)."""
    schema = PolicyDocument.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "wsrunner policy (wsrunner/v1)"
    return schema
