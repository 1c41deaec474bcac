"""Split a shell command line into the simple commands the policy judges.

This is a conservative reading of POSIX shell grammar, not a shell: the line is tokenised with
`shlex` (quotes honoured, `; & | ( ) < >` split off), cut at every operator, and each piece's
program is found after variable assignments and redirections. Programs hidden one level down
are read too: the command of `sh -c '...'`, of wrappers such as `env`, `timeout`, `nice`,
`xargs`, of `find -exec`, and the contents of `$( )` and backticks. Where the reading is unsure,
it errs towards naming more programs, so the gate denies rather than waves through. The OS
sandbox, not this parser, is the security boundary.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Final

from wsrunner.errors import WsrunnerError

MAX_DEPTH: Final = 4
_OPERATORS: Final = frozenset({";", "&", "&&", "|", "||", "(", ")", ";;", "|&", "\n"})
_REDIRECT: Final = re.compile(r"^\d*(<|>|>>|<<|<<<|<>|>&|<&|&>|&>>|>\|)$")
_ASSIGNMENT: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PLACEHOLDER: Final = "$__substitution__"
_SHELLS: Final = frozenset({"sh", "bash", "dash", "zsh", "ksh"})
_KEYWORDS: Final = frozenset(
    {
        "if",
        "then",
        "else",
        "elif",
        "fi",
        "do",
        "done",
        "while",
        "until",
        "for",
        "in",
        "case",
        "esac",
        "{",
        "}",
        "!",
        "time",
    }
)
#: wrapper -> options that take a value (the wrapped command follows the options)
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
            "-e",
            "-I",
            "-i",
            "-L",
            "-l",
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


class ShellSyntaxError(WsrunnerError):
    """The command line cannot be read (an unterminated quote, or nesting too deep)."""


@dataclass(frozen=True, slots=True)
class SimpleCommand:
    """One program with its arguments, and how it was reached (`sh -c`, `$( )`, ...)."""

    argv: tuple[str, ...]
    via: str = ""  #: empty for a top-level command, else e.g. "sh -c", "$( )", "find -exec"

    @property
    def program(self) -> str:
        return self.argv[0]

    @property
    def args(self) -> str:
        return " ".join(self.argv[1:])


def simple_commands(text: str) -> list[SimpleCommand]:
    """Every simple command in `text`, in order. Raises ShellSyntaxError if it cannot be read."""
    out: list[SimpleCommand] = []
    _parse(text, "", 0, out)
    return out


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text.replace("\n", " ; "), posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = ""  # `#` mid-word is common (urls); a comment only hides, never adds
    try:
        return list(lexer)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise ShellSyntaxError(f"cannot read the command: {exc}") from None


def _parse(text: str, via: str, depth: int, out: list[SimpleCommand]) -> None:
    if depth > MAX_DEPTH:
        raise ShellSyntaxError(f"commands are nested more than {MAX_DEPTH} levels deep")
    text, inner = _lift_substitutions(text)
    for body, how in inner:
        _parse(body, how, depth + 1, out)
    words: list[str] = []
    tokens = _tokens(text)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _OPERATORS or set(tok) <= set(";&|()"):
            _finish(words, via, depth, out)
            words = []
        elif _REDIRECT.match(tok) or set(tok) <= set("<>&"):
            i += 1  # skip the redirection target too
        elif tok.isdigit() and i + 1 < len(tokens) and _REDIRECT.match(tokens[i + 1]):
            pass  # the fd number of `2>file`
        else:
            words.append(tok)
        i += 1
    _finish(words, via, depth, out)


def _lift_substitutions(text: str) -> tuple[str, list[tuple[str, str]]]:
    """`text` with every `$( )`, `<( )`, `>( )` and backtick body replaced by a placeholder
    word that reads as a computed value, and those bodies (with how they were written)."""
    bodies: list[tuple[str, str]] = []
    out: list[str] = []
    i, double = 0, False
    while i < len(text):
        c = text[i]
        if c == "\\":
            out.append(text[i : i + 2])
            i += 2
            continue
        if c == '"':  # inside double quotes, substitutions still run; single quotes are text
            double = not double
        elif c == "'" and not double:  # single quotes: nothing inside is special
            end = text.find("'", i + 1)
            end = len(text) if end < 0 else end + 1
            out.append(text[i:end])
            i = end
            continue
        elif c == "`":
            end = text.find("`", i + 1)
            end = len(text) if end < 0 else end
            bodies.append((text[i + 1 : end], "` `"))
            out.append(_PLACEHOLDER)
            i = end + 1
            continue
        elif c in "$<>" and text[i + 1 : i + 2] == "(":
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            if text[i : i + 3] == "$((":  # arithmetic: a number, no command inside
                out.append("0")
            else:
                bodies.append((text[i + 2 : j - 1], f"{c}( )"))
                out.append(_PLACEHOLDER)
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out), bodies


def _finish(words: list[str], via: str, depth: int, out: list[SimpleCommand]) -> None:
    if words and words[0] in ("for", "case", "select", "function"):
        return  # `for NAME in WORDS`: names and words, no program (the body follows `do`)
    while words and (_ASSIGNMENT.match(words[0]) or words[0] in _KEYWORDS):
        words = words[1:]
    if not words:
        return
    cmd = SimpleCommand(tuple(words), via)
    out.append(cmd)
    name = words[0].rsplit("/", 1)[-1]
    if name in _SHELLS:
        for k, w in enumerate(words[1:-1], start=1):
            if w == "-c" or (w.startswith("-") and not w.startswith("--") and "c" in w):
                _parse(words[k + 1], f"{name} -c", depth + 1, out)
                break
    elif name in _WRAPPERS:
        rest = _unwrap(name, words[1:])
        if rest:
            _finish(rest, f"{name}", depth, out)
    elif name == "find":
        for k, w in enumerate(words):
            if w in ("-exec", "-execdir", "-ok", "-okdir") and k + 1 < len(words):
                end = next((j for j in range(k + 1, len(words)) if words[j] in (";", "+")),
                           len(words))  # fmt: skip
                _finish(words[k + 1 : end], "find -exec", depth, out)


def _unwrap(name: str, args: list[str]) -> list[str]:
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
        if not a.startswith("-") or a == "-":
            break
        i += 2 if a in takes_value else 1
    i += _WRAPPER_POSITIONALS.get(name, 0)
    return args[i:]
