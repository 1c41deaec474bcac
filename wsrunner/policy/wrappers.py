"""Programs that run other programs: what a simple command starts besides itself.

`env X=1 timeout 5 cmd` runs `cmd`; `sh -c 'script'`, `eval words` and `trap 'action' EXIT`
run shell code; `find -exec cmd ;` runs `cmd`; a shell without a script reads one on its input.
The policy judges those too, as if they had been written on their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

SHELLS: Final = frozenset({"sh", "bash", "dash", "zsh", "ksh"})
_SHELL_VALUE_OPTIONS: Final = frozenset({"-o", "+o", "-O", "+O", "--rcfile", "--init-file"})
#: wrapper -> options that take a value (the wrapped command follows the options). xargs' -i, -e
#: and -l take an optional value only when attached (`-i{}`), so they are flags here.
_WRAPPERS: Final[dict[str, frozenset[str]]] = {
    "env": frozenset({"-u", "--unset", "-C", "--chdir", "-S", "--split-string"}),
    "nice": frozenset({"-n", "--adjustment"}),
    "nohup": frozenset(),
    "exec": frozenset({"-a"}),
    "command": frozenset(),
    "builtin": frozenset(),
    "stdbuf": frozenset({"-i", "-o", "-e"}),
    "timeout": frozenset({"-s", "--signal", "-k", "--kill-after"}),
    "xargs": frozenset(
        {
            "-a",
            "-d",
            "-E",
            "-I",
            "-L",
            "-n",
            "-P",
            "-s",
            "--arg-file",
            "--delimiter",
            "--max-args",
            "--max-procs",
            "--max-lines",
            "--replace",
            "--max-chars",
            "--eof",
        }
    ),
}
_WRAPPER_POSITIONALS: Final = {"timeout": 1}  # `timeout DURATION cmd`
_ASSIGNMENT: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True, slots=True)
class Inner:
    """What one command runs besides itself (all empty: nothing)."""

    argv: tuple[str, ...] = ()  #: the command a wrapper runs
    commands: tuple[tuple[str, ...], ...] = ()  #: the commands of find -exec
    script: str | None = None  #: shell code it runs (sh -c, eval, trap)
    reads_script: bool = False  #: a shell that reads its script on its input


def inner(argv: tuple[str, ...]) -> Inner:
    """What `argv` runs besides itself, by the name of its program."""
    name = argv[0].rsplit("/", 1)[-1]
    if name in SHELLS:
        return _shell(argv)
    if name in _WRAPPERS:
        return Inner(argv=_unwrap(name, argv[1:]))
    if name == "find":
        return Inner(commands=_find_exec(argv))
    if name == "eval" and len(argv) > 1:
        return Inner(script=" ".join(argv[1:]))
    if name == "trap":
        args = argv[2:] if argv[1:2] == ("--",) else argv[1:]
        if len(args) >= 2 and args[0] not in ("-", "-l", "-p"):
            return Inner(script=args[0])
    return Inner()


def _shell(argv: tuple[str, ...]) -> Inner:
    """`sh -c SCRIPT` runs SCRIPT; `sh`, `sh -s` and `sh -` read their script on stdin."""
    run_string = read_stdin = False
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("--", "-"):
            i += 1
            break
        if len(a) < 2 or a[0] not in "-+":
            break
        if a in _SHELL_VALUE_OPTIONS:
            i += 2
            continue
        if not a.startswith("--"):
            run_string = run_string or (a[0] == "-" and "c" in a)
            read_stdin = read_stdin or "s" in a
            if a[-1] in "oO":  # `-eo pipefail`: the last flag takes the next word
                i += 1
        i += 1
    operand = argv[i] if i < len(argv) else None
    if run_string:
        return Inner(script=operand)
    return Inner(reads_script=operand is None or read_stdin)


def _unwrap(name: str, args: tuple[str, ...]) -> tuple[str, ...]:
    """The command a wrapper runs: `args` after its options (and positional arguments)."""
    takes_value = _WRAPPERS[name]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if name == "env" and _ASSIGNMENT.match(a):
            i += 1
            continue
        if name == "env" and (split := _env_split(args, i)) is not None:
            args = split  # `env -S 'prog args'`: the string is split into more arguments
            continue
        if not a.startswith("-") or a == "-":
            break
        i += 2 if a in takes_value else 1
    i += _WRAPPER_POSITIONALS.get(name, 0)
    return args[i:]


def _env_split(args: tuple[str, ...], i: int) -> tuple[str, ...] | None:
    a = args[i]
    if a in ("-S", "--split-string"):
        value, rest = (args[i + 1] if i + 1 < len(args) else ""), args[i + 2 :]
    elif a.startswith("--split-string="):
        value, rest = a.partition("=")[2], args[i + 1 :]
    elif a.startswith("-S"):
        value, rest = a[2:], args[i + 1 :]
    else:
        return None
    return (*args[:i], *value.split(), *rest)


def _find_exec(argv: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The commands of `find ... -exec CMD ... ;` (and -execdir, -ok, -okdir)."""
    out: list[tuple[str, ...]] = []
    start = None  # where the command of the -exec being read starts
    for k, w in enumerate(argv):
        if start is None and w in ("-exec", "-execdir", "-ok", "-okdir"):
            start = k + 1
        elif start is not None and w in (";", "+"):
            out.append(argv[start:k])
            start = None
    if start is not None:
        out.append(argv[start:])
    return tuple(cmd for cmd in out if cmd)
