"""Read policy files: YAML 1.2 with positions, validated, and errors as `file:line:col: path: msg`.

ruamel.yaml is used instead of PyYAML here because a security policy must not lose a rule to a
duplicate key (PyYAML keeps the last one silently) or turn `NO` into false (YAML 1.1).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pydantic
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from wsrunner.errors import ConfigError
from wsrunner.policy.schema import PolicyDocument, TestSuite

MAX_FILE_BYTES: Final = 1024 * 1024


class PolicyError(ConfigError):
    """One or more policy files are invalid; `problems` are `file:line:col: path: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Loaded:
    """A validated document, where it came from, and its raw bytes (for the policy digest)."""

    path: str
    document: Any  # PolicyDocument or TestSuite
    tree: Any  # the ruamel node tree, for positions
    raw: bytes

    def line_of(self, *loc: str | int) -> int:
        """1-based line of the node at `loc` (the document's start if it cannot be found)."""
        return _position(self.tree, loc)[0]


def _plain(node: Any) -> Any:
    """ruamel's node types as plain Python values for pydantic (strict mode rejects subclasses)."""
    if isinstance(node, dict):
        return {
            (_plain(k) if not isinstance(k, str) else str(k)): _plain(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, datetime.date):
        return node.isoformat()  # a string where the schema wants one; shown as found
    return node


def _position(tree: Any, loc: Iterable[str | int]) -> tuple[int, int]:
    """(line, col), 1-based, of the deepest node of `loc` found in `tree`."""
    line, col, node = 1, 1, tree
    for key in loc:
        if isinstance(node, CommentedMap) and key in node:
            child = node[key]
            # A nested block is pointed at by its key; a scalar by its value.
            nested = isinstance(child, (CommentedMap, CommentedSeq))
            line, col = node.lc.key(key) if nested else node.lc.value(key)
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
            child = node[key]
            line, col = node.lc.item(key)
        else:
            break
        line, col, node = line + 1, col + 1, child
    return line, col


def _key_position(tree: Any, loc: tuple[str | int, ...]) -> tuple[int, int]:
    """Position of the key itself for "extra key" errors (the value is not the problem)."""
    parent = tree
    for key in loc[:-1]:
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return _position(tree, loc)
    if isinstance(parent, CommentedMap) and loc and loc[-1] in parent:
        kl, kc = parent.lc.key(loc[-1])
        return kl + 1, kc + 1
    return _position(tree, loc)


def load_file(
    path: str | os.PathLike[str], model: type[pydantic.BaseModel] = PolicyDocument
) -> Loaded:
    """Parse and validate one file; raises PolicyError listing every problem found."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PolicyError([f"{name}: cannot read: {exc.strerror}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyError([f"{name}: larger than {MAX_FILE_BYTES} bytes"])
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        tree = yaml.load(raw)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        if "duplicate key" in problem:
            problem = problem.split("\n")[0].strip()
        raise PolicyError([f"{where}: {problem}"]) from None
    except Exception as exc:  # ruamel raises a few unmarked errors (bad unicode, ...)
        raise PolicyError([f"{name}: not valid YAML: {exc}"]) from None
    if not isinstance(tree, CommentedMap):
        raise PolicyError([f"{name}:1:1: expected a mapping with apiVersion, kind, metadata, spec"])
    try:
        doc = model.model_validate(_plain(tree))
    except pydantic.ValidationError as exc:
        problems: list[tuple[int, int, str]] = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            if err["type"] == "extra_forbidden":
                line, col = _key_position(tree, loc)
                msg = "unknown key (not in the wsrunner/v1 schema)"
            else:
                line, col = _position(tree, loc)
                msg = err["msg"].removeprefix("Value error, ")
            path = ".".join(str(p) for p in loc) or "(document)"
            problems.append((line, col, f"{name}:{line}:{col}: {path}: {msg}"))
        raise PolicyError([text for *_, text in sorted(problems)]) from None
    return Loaded(name, doc, tree, raw)


@dataclass(frozen=True, slots=True)
class PolicyFiles:
    """The base policy and its drop-ins, in the order they apply."""

    base: Loaded
    overlays: tuple[Loaded, ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for loaded in (self.base, *self.overlays):
            h.update(os.path.basename(loaded.path).encode() + b"\0" + loaded.raw + b"\0")
        return h.hexdigest()[:16]


def dropins(directory: str | os.PathLike[str] | None) -> list[str]:
    """`*.yaml` and `*.yml` files of a drop-in directory, in sorted lexical order."""
    if directory is None or not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if n.endswith((".yaml", ".yml")))
    return [os.path.join(directory, n) for n in names if not n.startswith(".")]


def load_policy_files(
    base: str | os.PathLike[str],
    dropin_dir: str | os.PathLike[str] | None = None,
    overlays: tuple[str | os.PathLike[str], ...] = (),
) -> PolicyFiles:
    """Load the base policy, the given `overlays`, then every drop-in of `dropin_dir`.

    Raises PolicyError listing every problem found, in all the files.
    """
    problems: list[str] = []
    loaded: list[Loaded] = []
    for path in [os.fspath(base), *(os.fspath(o) for o in overlays), *dropins(dropin_dir)]:
        try:
            loaded.append(load_file(path))
        except PolicyError as exc:
            problems += exc.problems
    if problems:
        raise PolicyError(problems)
    first, *rest = loaded
    if first.document.kind != "Policy":
        problems.append(
            f"{first.path}:1:1: kind: the base file must be a Policy, not a PolicyOverlay"
        )
    for doc in rest:
        if doc.document.kind != "PolicyOverlay":
            problems.append(
                f"{doc.path}:{doc.line_of('kind')}:1: kind: a drop-in must be a "
                "PolicyOverlay (only the base file is a Policy)"
            )
    seen: dict[str, str] = {}
    for doc in loaded:
        for i, rule in enumerate(doc.document.spec.rules):
            here = f"{doc.path}:{doc.line_of('spec', 'rules', i)}"
            if rule.id in seen:
                problems.append(
                    f"{here}:1: spec.rules.{i}.id: rule id {rule.id!r} is already "
                    f"defined at {seen[rule.id]}"
                )
            seen.setdefault(rule.id, here)
    if problems:
        raise PolicyError(problems)
    return PolicyFiles(first, tuple(rest))


def load_test_suite(path: str | os.PathLike[str]) -> Loaded:
    return load_file(path, TestSuite)


def bundled_policy(name: str = "default") -> Path:
    """A policy shipped with wsrunner (`default`, `strict`)."""
    return (Path(__file__).with_name("bundled") / f"{name}.yaml").resolve()
