"""Name every program a shell command line would start, for the policy to judge.

The line is parsed with the bash grammar of tree-sitter (`tree-sitter-bash`) and the tree is
walked for simple commands, their words taken after quote removal (`policy.words`). Every
substitution is judged where it stands: `$( )`, backticks, `<( )` and `>( )`, inside arithmetic
and `${x:-...}`, double quotes, redirection targets, assignments, array elements, `case` words,
loop lists, function bodies and `[[ ]]` tests. Here-document bodies are data, except the
substitutions of an unquoted one (`policy.heredoc`). On top of the grammar, what a command runs
besides itself is read too (`policy.wrappers`): `sh -c`, `env`, `timeout`, `xargs`, `find -exec`,
`eval`, `trap`, and a here-document fed to a shell.

Commands run with `/bin/sh`, which may be dash: bash syntax that dash reads as commands (`(( ))`,
`||` inside `[[ ]]`, `\\'` inside `$'...'`) is refused, and the words after `&>` are judged as
the command dash sees there.

Fail closed: a line the grammar cannot read (an ERROR or MISSING node; the message gives the
line:column), one longer than MAX_TEXT characters, nested deeper than MAX_DEPTH levels, or too
costly to parse (`policy.grammar`) raises ShellSyntaxError, which the policy turns into a
denial. The walk keeps its own stack, so no input reaches Python's recursion limit. The OS
sandbox, not this reader, is the security boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from tree_sitter import Node

from wsrunner.policy import heredoc, wrappers
from wsrunner.policy.grammar import (
    CommandTooLongError,
    Grammar,
    NestingTooDeepError,
    ShellSyntaxError,
    TooComplexError,
)
from wsrunner.policy.words import PLACEHOLDER, Source, live_substitution, render

__all__ = [
    "MAX_DEPTH",
    "MAX_TEXT",
    "PLACEHOLDER",
    "CommandTooLongError",
    "NestingTooDeepError",
    "ShellSyntaxError",
    "SimpleCommand",
    "TooComplexError",
    "simple_commands",
]

MAX_TEXT: Final = 65_536  #: characters; a longer command line is refused unread
#: Levels of `sh -c`, wrappers (`env`, `timeout`, ...) and substitutions inside one another.
MAX_DEPTH: Final = 32
_SUBSTITUTION_VIA: Final = {"$(": "$( )", "`": "` `", "<(": "<( )", ">(": ">( )"}
#: Never visited: no command and no substitution in them.
_SKIP: Final = frozenset({"comment", "heredoc_start", "heredoc_end", "heredoc_body"})
#: In `[[ ]]`, separators outside these are where dash, which has no `[[`, ends a command.
_OPAQUE: Final = frozenset(
    {
        "string",
        "raw_string",
        "ansi_c_string",
        "translated_string",
        "command_substitution",
        "process_substitution",
        "expansion",
        "simple_expansion",
        "arithmetic_expansion",
    }
)
_SEPARATORS: Final = re.compile(rb"[&|;\n]")
_CONTINUATION: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\\n")
_BLANK: Final = (b"", b" ", b"\t", b"\n")
_BACKTICK_ESCAPE: Final = re.compile(rb"\\([\\`$])")


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
    """Every simple command in `text`, each before the ones it contains, in source order.

    Errors: ShellSyntaxError (or a subclass) when the text cannot be read, is longer than
    MAX_TEXT characters or is nested deeper than MAX_DEPTH levels.
    """
    if len(text) > MAX_TEXT:
        raise CommandTooLongError(
            f"the command is {len(text)} characters long; at most {MAX_TEXT} are read"
        )
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ShellSyntaxError(
            f"cannot read the command: {exc.reason} at character {exc.start + 1}"
        ) from None
    return _Reader(data).run()


@dataclass(frozen=True, slots=True)
class _Visit:
    node: Node
    src: Source
    via: str
    depth: int
    quoted: bool = False  #: inside double quotes or a here-document: `'` is a plain character
    extra: tuple[str, ...] = ()  #: arguments written after a here-document's `<<EOF`
    stdin: tuple[str, ...] = ()  #: here-documents and here-strings the command reads


@dataclass(frozen=True, slots=True)
class _Run:
    argv: tuple[str, ...]
    via: str
    depth: int
    stdin: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Script:
    text: bytes
    via: str
    depth: int
    what: str  #: how error positions name this text


class _Reader:
    """One reading of a command line, with a stack of work instead of recursion."""

    def __init__(self, data: bytes) -> None:
        self.top = data
        self.out: list[SimpleCommand] = []
        self.stack: list[_Visit | _Run | _Script] = []
        self.grammar = Grammar()
        self.heredocs = heredoc.Scanner(data, self.grammar.tree, ShellSyntaxError)

    def run(self) -> list[SimpleCommand]:
        self.grammar.check_shape(self.top)
        self._parse(Source(self.top, self.top), "", 0)
        while self.stack:
            item = self.stack.pop()
            if isinstance(item, _Visit):
                self._visit(item)
            elif isinstance(item, _Run):
                self._run(item)
            else:
                self._parse(Source(item.text, item.text, 0, item.what), item.via, item.depth)
        return self.out

    def _parse(self, src: Source, via: str, depth: int) -> None:
        root = self.grammar.read(src)
        _continuations(root, src)
        self.stack.append(_Visit(root, src, via, depth))

    def _script(self, text: str | bytes, via: str, depth: int, what: str) -> None:
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        self.stack.append(_Script(data, via, _deeper(depth), what))

    def _push(
        self,
        item: _Visit,
        *,
        via: str | None = None,
        depth: int | None = None,
        quoted: bool | None = None,
        body: Node | None = None,
        extra: tuple[str, ...] = (),
        stdin: tuple[str, ...] = (),
    ) -> None:
        """Visit the children of `item` next, in source order (`body` gets extra and stdin)."""
        via = item.via if via is None else via
        depth = item.depth if depth is None else depth
        quoted = item.quoted if quoted is None else quoted
        for child in reversed(item.node.named_children):
            if child.type in _SKIP:
                continue
            if body is not None and child.id == body.id:
                self.stack.append(_Visit(child, item.src, via, depth, quoted, extra, stdin))
            else:
                self.stack.append(_Visit(child, item.src, via, depth, quoted))

    def _visit(self, item: _Visit) -> None:
        node, src, kind = item.node, item.src, item.node.type
        if (why := _bash_only(node, src)) is not None:
            raise ShellSyntaxError(
                f"cannot read the command: {why} at {src.where(node.start_byte)}"
                ": commands run with /bin/sh, which may be dash, and dash "
                "would run part of it as commands"
            )
        if kind == "command":
            self._command(item)
        elif kind in ("declaration_command", "unset_command", "test_command"):
            self._push(item)
            self.stack.append(_Run(_builtin_argv(node, src), item.via, item.depth))
        elif kind in ("command_substitution", "process_substitution"):
            opener = src.text(node.children[0])
            via = _SUBSTITUTION_VIA.get(opener, "$( )")
            if opener == "`":  # bash reads the text again once `\``, `\\`, `\$` are resolved
                text = _BACKTICK_ESCAPE.sub(
                    rb"\1", src.data[node.start_byte + 1 : node.end_byte - 1]
                )
                self._script(
                    text,
                    via,
                    item.depth + 1,
                    f"the text in backticks at {src.where(node.start_byte)}",
                )
            else:
                self._push(item, via=via, depth=_deeper(item.depth + 1), quoted=False)
        elif kind in ("string", "translated_string"):
            self._push(item, quoted=True)
        elif kind == "redirected_statement":
            self._redirected(item)
        elif kind == "heredoc_redirect":
            body = self.heredocs.check(node, src)
            self._push(item)
            if not body.quoted:
                found = list(self.heredocs.substitutions(body, src))
                for sub, sub_src in found:
                    _continuations(sub, sub_src)
                self.stack += [_Visit(n, s, item.via, item.depth, True) for n, s in reversed(found)]
        elif kind in ("raw_string", "ansi_c_string") and not item.quoted:
            return  # text; inside double quotes, a `'` is a plain character: checked below
        elif node.child_count == 0 or kind in ("raw_string", "ansi_c_string"):
            if (at := live_substitution(node, src)) is not None:
                raise ShellSyntaxError(
                    f"cannot read the command: a substitution the grammar "
                    f"did not read at {src.where(at)}"
                )
        else:
            self._push(item)

    def _command(self, item: _Visit) -> None:
        node, src = item.node, item.src
        argv: list[str] = []
        stdin = list(item.stdin)
        for i, child in enumerate(node.children):
            if node.field_name_for_child(i) in ("name", "argument"):
                argv.append(render(child, src))
            elif child.type == "herestring_redirect" and len(child.named_children) == 1:
                stdin.append(render(child.named_children[0], src))
        self._push(item)
        self.stack.append(_Run((*argv, *item.extra), item.via, item.depth, tuple(stdin)))

    def _redirected(self, item: _Visit) -> None:
        """A command with redirections after it. The grammar files the words after a target
        (`cmd >out more words`, `cmd <<EOF more`) under the redirection: they are arguments of
        the command. A here-document or here-string is what the command reads on its input."""
        node, src = item.node, item.src
        body = node.child_by_field_name("body")
        extra: list[str] = []
        after: list[str] | None = None  # the words after `&>`: dash runs them as a command
        stdin: list[str] = []
        for child in node.children_by_field_name("redirect"):
            words: list[Node] = []
            if child.type == "file_redirect":
                words = child.children_by_field_name("destination")[1:]
            elif child.type == "heredoc_redirect":
                words = child.children_by_field_name("argument")
                stdin.append(self.heredocs.text(child, src))
            elif child.type == "herestring_redirect" and child.named_children:
                stdin.append(render(child.named_children[-1], src))
            rendered = [render(w, src) for w in words]
            extra += rendered
            if after is not None:
                after += rendered
            elif any(c.type in ("&>", "&>>") for c in child.children):
                after = rendered
        if extra and (body is None or body.type != "command"):
            raise ShellSyntaxError(
                "cannot read the command: words after a redirection at "
                f"{src.where(node.start_byte)} belong to no command"
            )
        self._push(item, body=body, extra=tuple(extra), stdin=tuple(stdin))
        if after:
            self.stack.append(_Run(tuple(after), "&> (as dash reads it)", item.depth))

    def _run(self, item: _Run) -> None:
        """Judge `argv`, then what it runs: a wrapper's command, a script, find -exec."""
        argv, via, depth = item.argv, item.via, item.depth
        while argv:
            _deeper(depth)
            if argv[0] == "coproc":  # a bash keyword the grammar reads as a program
                raise ShellSyntaxError("cannot read the command: coproc is not read by the policy")
            if argv[0] == "time":  # the keyword: times the command after it, runs nothing itself
                argv, depth = argv[2 if argv[1:2] == ("-p",) else 1 :], depth + 1
                continue
            self.out.append(SimpleCommand(argv, via))
            name = argv[0].rsplit("/", 1)[-1]
            runs = wrappers.inner(argv)
            if runs.script is not None:
                self._script(
                    runs.script,
                    f"{name} -c" if name in wrappers.SHELLS else name,
                    depth + 1,
                    f"the script run by {name}",
                )
            elif runs.reads_script:
                for text in reversed(item.stdin):
                    self._script(text, f"{name} <<", depth + 1, f"the script {name} reads")
            for command in reversed(runs.commands):
                self.stack.append(_Run(command, "find -exec", depth + 1))
            argv, via, depth = runs.argv, name, depth + 1


def _deeper(depth: int) -> int:
    if depth > MAX_DEPTH:
        raise NestingTooDeepError(
            f"the command is nested too deep: more than {MAX_DEPTH} levels of sh -c, wrappers "
            "(env, timeout, xargs, ...) and substitutions inside one another"
        )
    return depth


def _continuations(node: Node, src: Source) -> None:
    """Refuse a line continuation (backslash-newline) that joins two words, or a word and an
    operator: bash joins them (`l\\<newline>s` is `ls`), the grammar reads two words. One at
    the start of a line is refused too: the grammar then joins that line to the one before."""
    data = src.data
    for found in _CONTINUATION.finditer(data, node.start_byte, node.end_byte):
        at = found.end() - 2  # the backslash
        before, after = data[at - 1 : at], data[at + 2 : at + 3]
        if before != b"\n" and (before in _BLANK or after in _BLANK):
            continue  # bash and the grammar both see a blank between two words
        # (After a newline, the grammar joins the two lines into one command: bash does not.)
        inner = node.descendant_for_byte_range(at, at + 1)
        kind = inner.type if inner is not None else ""
        if kind in ("raw_string", "ansi_c_string", "comment"):
            continue  # kept as text
        if kind in ("heredoc_body", "heredoc_content") and _in_quoted_heredoc(inner, src):
            continue  # kept as text
        raise ShellSyntaxError(
            f"cannot read the command: a line continuation (backslash at "
            f"the end of a line) at {src.where(at)} that bash and the policy "
            "would read differently; join the lines"
        )


def _in_quoted_heredoc(node: Node | None, src: Source) -> bool:
    for _ in range(3):  # heredoc_content < heredoc_body < heredoc_redirect
        if node is None or node.type == "heredoc_redirect":
            break
        node = node.parent
    starts = [] if node is None else [c for c in node.children if c.type == "heredoc_start"]
    return any(re.search(rb"['\"\\]", src.data[c.start_byte : c.end_byte]) for c in starts)


def _bash_only(node: Node, src: Source) -> str | None:
    """Why `node` is bash syntax that dash (a common /bin/sh) reads as commands, or None."""
    kind = node.type
    if kind == "ansi_c_string" and b"'" in src.data[node.start_byte + 2 : node.end_byte - 1]:
        # `\'` inside: dash ends the text at that quote; `\\'`: so does bash (the grammar not)
        return "a quote inside $'...'"
    if kind == "compound_statement" and node.child_count and node.children[0].type == "((":
        return "an arithmetic command (( ... )); use $(( ... )) or test"  # dash: subshells
    if kind == "test_command" and node.child_count and node.children[0].type == "[[":
        text = bytearray(src.data[node.start_byte : node.end_byte])
        stack = list(node.children)
        while stack:  # quoted text and substitutions are read alike by both shells
            child = stack.pop()
            if child.type in _OPAQUE:
                start, end = child.start_byte - node.start_byte, child.end_byte - node.start_byte
                text[start:end] = b" " * (end - start)
            else:
                stack.extend(child.children)
        if _SEPARATORS.search(text):
            return "&&, ||, |, ; or a line break inside [[ ]]; use [ ] && [ ]"
    return None


def _builtin_argv(node: Node, src: Source) -> tuple[str, ...]:
    """`export A=1 B`, `unset x`, `[ -e f ]`, `[[ ... ]]` as the words a policy matches."""
    words: list[str] = []
    stack = list(reversed(node.children))
    while stack:
        child = stack.pop()
        if child.type == "variable_assignment":
            name, value = child.child_by_field_name("name"), child.child_by_field_name("value")
            left = src.text(name) if name is not None else ""
            words.append(f"{left}={render(value, src) if value is not None else ''}")
        elif child.is_named and child.type not in (
            "binary_expression",
            "unary_expression",
            "parenthesized_expression",
        ):
            words.append(render(child, src))
        elif child.child_count:
            stack.extend(reversed(child.children))
        else:
            words.append(src.text(child))
    return tuple(words)
