"""Decide whether a command may run: the effective policy of a workspace, and its verdicts.

Evaluation order, as AWS IAM and sudoers users expect: a line is judged simple command by simple
command (`policy.shell`); an explicit deny anywhere wins over any allow; a program no allow rule
names is denied by default. Built-in checks come first and cannot be switched off: a program
given by path (`/usr/bin/python`, `./x`) or computed at run time (`$CMD`) is refused, and so is a
line the shell reader cannot read (`builtin:syntax`), one longer than 65,536 characters
(`builtin:length`), nested more than 32 levels deep (`builtin:nesting`) or too costly to parse
(`builtin:complexity`).

Evaluation is CPU work on tenant text (64 KB of short commands: about 0.2 s): the daemon runs it
off the event loop (`Executor.judge`); `EffectivePolicy.decided` answers from the cache.

Drop-ins apply in sorted file order after the base policy: their rules are added (ids are unique
across files), and each setting they give replaces the one before. An overlay with
`metadata.workspaces` applies only to matching workspace ids.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from wsrunner.policy.loader import Loaded, PolicyFiles
from wsrunner.policy.schema import Rule
from wsrunner.policy.shell import (
    MAX_TEXT,
    CommandTooLongError,
    ShellSyntaxError,
    SimpleCommand,
    simple_commands,
)

DEFAULT_LIMITS: Final = {
    "timeoutSeconds": 3600,
    "memory": 2 * 1024**3,
    "pids": 512,
    "cpuSeconds": 3600,
    "openFiles": 4096,
    "fileSize": 1024**3,
    "stdoutBytes": 100_000,
    "stderrBytes": 50_000,
}
_DYNAMIC: Final = re.compile(r"[$`*?\[\]{}~]")


@dataclass(frozen=True, slots=True)
class SourcedRule:
    """A rule and where it was written, for error messages and `policy explain`."""

    rule: Rule
    source: str  #: "file:line"
    _args: re.Pattern[str] | None = None
    _pattern: re.Pattern[str] | None = None

    @classmethod
    def of(cls, rule: Rule, source: str) -> SourcedRule:
        return cls(
            rule,
            source,
            re.compile(rule.args) if rule.args is not None else None,
            re.compile(rule.pattern) if rule.pattern is not None else None,
        )

    def matches(self, cmd: SimpleCommand) -> bool:
        return self.names(cmd.program) and self.matches_args(cmd)

    def names(self, program: str) -> bool:
        """Whether one of the rule's `commands` globs names `program`."""
        commands = self.rule.commands
        return commands is not None and any(fnmatch.fnmatchcase(program, p) for p in commands)

    def matches_args(self, cmd: SimpleCommand) -> bool:
        return self._args is None or self._args.search(cmd.args) is not None

    def matches_text(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(text) is not None


@dataclass(frozen=True, slots=True)
class Limits:
    timeout_s: int
    memory_bytes: int
    pids: int
    cpu_s: int
    open_files: int
    file_size_bytes: int
    stdout_bytes: int
    stderr_bytes: int
    cpus: float | None = None  #: None: no CPU bandwidth limit


@dataclass(frozen=True, slots=True)
class SandboxPolicy:
    require: Literal["full", "partial", "none"]
    network: Literal["none", "egress", "host"]
    git_network: Literal["none", "egress", "host"]
    protect: tuple[str, ...]
    read_only_paths: tuple[str, ...]
    egress_allow: tuple[str, ...] = ()  #: private ranges an `egress` sandbox may reach


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision on one simple command, or on the whole text (`command` None)."""

    allowed: bool
    rule_id: str
    source: str  #: file:line of the rule, or "built-in"
    message: str
    command: SimpleCommand | None = None
    considered: tuple[str, ...] = ()  #: ids of every rule that matched, in order


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on a command line under one effective policy."""

    allowed: bool  #: the policy's answer
    runs: bool  #: whether the command runs (a denial in audit mode still runs)
    mode: str
    verdicts: tuple[Verdict, ...]
    digest: str  #: the policy version that decided

    @property
    def denial(self) -> Verdict | None:
        return next((v for v in self.verdicts if not v.allowed), None)

    def as_error(self) -> dict[str, object]:
        """The structured error of a denied step (also what audit mode logs)."""
        v = self.denial
        assert v is not None
        return {
            "error": "policy_denied",
            "rule": v.rule_id,
            "source": v.source,
            "message": v.message,
            "policy": self.digest,
        }


DECISION_CACHE_SIZE: Final = 4096  #: decisions kept per effective policy (then: computed)
DECISION_CACHE_TEXT: Final = 4096  #: longer commands are not kept
NAME_CACHE_SIZE: Final = 4096  #: program names whose rules are remembered per effective policy


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """What applies to one workspace: the merged rules, sandbox and limits."""

    workspace: str
    mode: Literal["enforce", "audit"]
    rules: tuple[SourcedRule, ...]
    sandbox: SandboxPolicy
    limits: Limits
    sources: tuple[str, ...]
    digest: str
    #: Decisions already made, by command text: the policy never changes, and agents and task
    #: queues send the same commands over and over (parsing and matching cost ~0.2 ms).
    _decided: dict[str, Decision] = field(default_factory=dict, compare=False, repr=False)
    #: The rules whose `commands` name a program, by program name (a 64 KB line may hold 20,000
    #: commands; matching each against every glob of every rule took most of its second).
    _named: dict[str, tuple[SourcedRule, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def decided(self, text: str) -> Decision | None:
        """The decision on `text` if it was made before (no parsing: safe on the event loop)."""
        return self._decided.get(text)

    def evaluate(self, text: str) -> Decision:
        """The decision on `text`. CPU-bound for long texts: call it from a worker thread."""
        if (hit := self._decided.get(text)) is not None:
            return hit
        verdicts = self._verdicts(text)
        allowed = all(v.allowed for v in verdicts)
        decision = Decision(
            allowed, allowed or self.mode == "audit", self.mode, tuple(verdicts), self.digest
        )
        if len(text) <= DECISION_CACHE_TEXT and len(self._decided) < DECISION_CACHE_SIZE:
            self._decided[text] = decision
        return decision

    def _verdicts(self, text: str) -> list[Verdict]:
        if len(text) > MAX_TEXT:  # before the deny patterns: they search the whole text
            exc = CommandTooLongError(
                f"the command is {len(text)} characters long; at most {MAX_TEXT} are read"
            )
            return [Verdict(False, exc.rule, "built-in", str(exc))]
        if not text.strip():
            return [Verdict(False, "builtin:empty", "built-in", "the command is empty")]
        for sr in self.rules:
            if sr.rule.action == "deny" and sr.matches_text(text):
                return [
                    Verdict(
                        False,
                        sr.rule.id,
                        sr.source,
                        f"the command matches the deny pattern of rule {sr.rule.id!r}"
                        + (f": {sr.rule.reason}" if sr.rule.reason else ""),
                    )
                ]
        try:
            commands = simple_commands(text)
        except ShellSyntaxError as exc:
            return [Verdict(False, exc.rule, "built-in", str(exc))]
        if not commands:
            return [Verdict(False, "builtin:empty", "built-in", "the command runs no program")]
        judged: dict[SimpleCommand, Verdict] = {}  # a line often repeats the same command
        for cmd in commands:
            if cmd not in judged:
                judged[cmd] = self.judge(cmd)
        return [judged[cmd] for cmd in commands]

    def judge(self, cmd: SimpleCommand) -> Verdict:
        """The verdict on one simple command: built-ins, then deny rules, then allow rules."""
        name = cmd.program
        where = f" (run by {cmd.via})" if cmd.via else ""
        if "/" in name:
            return Verdict(
                False,
                "builtin:path",
                "built-in",
                f"{name!r}{where}: programs are named bare ('python3', not "
                "'/usr/bin/python3' or './x'); the sandbox's PATH finds them",
                cmd,
            )
        if not name or (_DYNAMIC.search(name) and name not in ("[", "[[")):
            return Verdict(
                False,
                "builtin:dynamic",
                "built-in",
                f"{name!r}{where}: the program is computed when the command runs, "
                "so the policy cannot check it",
                cmd,
            )
        matched = [sr for sr in self._naming(name) if sr.matches_args(cmd)]
        ids = tuple(sr.rule.id for sr in matched)
        for sr in matched:
            if sr.rule.action == "deny":
                reason = f": {sr.rule.reason}" if sr.rule.reason else ""
                return Verdict(
                    False,
                    sr.rule.id,
                    sr.source,
                    f"{name!r}{where} is denied by rule {sr.rule.id!r}{reason}",
                    cmd,
                    ids,
                )
        for sr in matched:
            return Verdict(
                True, sr.rule.id, sr.source, f"{name!r} is allowed by rule {sr.rule.id!r}", cmd, ids
            )
        return Verdict(
            False,
            "default-deny",
            "built-in",
            f"{name!r}{where} is not allowed by any rule of the policy",
            cmd,
        )

    def _naming(self, program: str) -> tuple[SourcedRule, ...]:
        """The rules whose `commands` name `program`, in order (remembered per name)."""
        if (hit := self._named.get(program)) is not None:
            return hit
        rules = tuple(sr for sr in self.rules if sr.names(program))
        if len(self._named) < NAME_CACHE_SIZE:
            self._named[program] = rules
        return rules


@dataclass(slots=True)
class PolicySet:
    """The loaded files, and the effective policy of each workspace (computed once)."""

    files: PolicyFiles
    _cache: dict[str, EffectivePolicy] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.files.digest

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.files.base.path, *(o.path for o in self.files.overlays))

    def for_workspace(self, workspace: str) -> EffectivePolicy:
        if (hit := self._cache.get(workspace)) is not None:
            return hit
        applied = [self.files.base] + [o for o in self.files.overlays if _applies(o, workspace)]
        mode = "enforce"
        sandbox: dict[str, Any] = {
            "require": "full",
            "network": "none",
            "gitNetwork": "egress",
            "protect": [],
            "readOnlyPaths": [],
            "egressAllow": [],
        }
        limits: dict[str, Any] = dict(DEFAULT_LIMITS, cpus=None)
        rules: list[SourcedRule] = []
        for loaded in applied:
            spec = loaded.document.spec
            mode = spec.mode or mode
            sandbox.update(spec.sandbox.model_dump(exclude_none=True))
            limits.update(spec.limits.model_dump(exclude_none=True))
            rules += [
                SourcedRule.of(r, f"{loaded.path}:{loaded.line_of('spec', 'rules', i)}")
                for i, r in enumerate(spec.rules)
            ]
        effective = EffectivePolicy(
            workspace=workspace,
            mode=mode,  # type: ignore[arg-type]
            rules=tuple(rules),
            sandbox=SandboxPolicy(
                require=sandbox["require"],
                network=sandbox["network"],
                git_network=sandbox["gitNetwork"],
                protect=tuple(sandbox["protect"]),
                read_only_paths=tuple(sandbox["readOnlyPaths"]),
                egress_allow=tuple(sandbox["egressAllow"]),
            ),
            limits=Limits(
                limits["timeoutSeconds"],
                limits["memory"],
                limits["pids"],
                limits["cpuSeconds"],
                limits["openFiles"],
                limits["fileSize"],
                limits["stdoutBytes"],
                limits["stderrBytes"],
                limits["cpus"],
            ),
            sources=tuple(loaded.path for loaded in applied),
            digest=self.digest,
        )
        self._cache[workspace] = effective
        return effective


def _applies(overlay: Loaded, workspace: str) -> bool:
    globs = overlay.document.metadata.workspaces
    return globs is None or any(fnmatch.fnmatchcase(workspace, g) for g in globs)
