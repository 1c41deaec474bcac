"""Shell words as the policy sees them: the text of a syntax-tree node after quote removal.

A substitution (`$( )`, backticks, `<( )`, arithmetic) becomes PLACEHOLDER, a word that reads as
computed; a parameter (`$x`, `${x}`) keeps its `$`. So a program name that is only known when
the command runs is visibly dynamic, and the policy refuses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from tree_sitter import Node

PLACEHOLDER: Final = "$__substitution__"
_COMPUTED: Final = frozenset(
    {"command_substitution", "process_substitution", "arithmetic_expansion"}
)
_UNQUOTED_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)
_QUOTED_ESCAPE: Final = re.compile(r'\\([$`"\\\n])')
_ANSI_C: Final = re.compile(
    r"\\(x[0-9A-Fa-f]{1,2}|u[0-9A-Fa-f]{1,4}|U[0-9A-Fa-f]{1,8}|[0-7]{1,3}|c.|.)", re.DOTALL
)
_ANSI_C_SIMPLE: Final = {
    "a": "\a",
    "b": "\b",
    "e": "\x1b",
    "E": "\x1b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
}
#: A substitution that is live (not escaped by a backslash) in text the grammar read as literal.
_LIVE: Final = re.compile(rb"(?:^|[^\\])(?:\\\\)*(\$[({\[]|`)")


@dataclass(frozen=True, slots=True)
class Source:
    """Text the grammar read, and where its bytes sit in the text error positions count in.

    `origin` is the command line, or a text derived from it (the script of `sh -c`), named by
    `what`; `data[0]` is at byte `offset` of `origin` (a here-document window has its own prefix).
    """

    data: bytes
    origin: bytes
    offset: int = 0
    what: str = ""

    def text(self, node: Node) -> str:
        return self.data[node.start_byte : node.end_byte].decode("utf-8", "surrogateescape")

    def where(self, byte: int) -> str:
        """`line:column` (both from 1, columns in characters) of `data[byte]` in `origin`."""
        at = max(0, min(len(self.origin), self.offset + byte))
        line_start = self.origin.rfind(b"\n", 0, at) + 1
        column = len(self.origin[line_start:at].decode("utf-8", "replace")) + 1
        line = self.origin.count(b"\n", 0, at) + 1
        return f"{line}:{column}" + (f" of {self.what}" if self.what else "")


def render(node: Node, src: Source, depth: int = 0) -> str:
    """The word `node` after quote removal; substitutions become PLACEHOLDER."""
    kind = node.type
    if kind in _COMPUTED:
        return PLACEHOLDER
    if kind == "word":
        return _UNQUOTED_ESCAPE.sub(_unescape, src.text(node))
    if kind == "raw_string":
        return src.text(node)[1:-1]
    if kind == "ansi_c_string":
        return _ANSI_C.sub(_ansi_c, src.text(node)[2:-1])
    if depth < 4 and kind in ("string", "translated_string"):  # the grammar nests no deeper
        inner_start = node.start_byte + (2 if kind == "translated_string" else 1)
        return _join(node, src, inner_start, node.end_byte - 1, _QUOTED_ESCAPE, depth)
    if depth < 4 and kind in ("concatenation", "command_name"):
        return _join(node, src, node.start_byte, node.end_byte, _UNQUOTED_ESCAPE, depth)
    return src.text(node)  # $x, ${x...}, numbers, globs, brace expressions: as written


def live_substitution(node: Node, src: Source) -> int | None:
    """The byte of a `$(`, `${`, `$[` or backtick that bash would expand in a node the grammar
    read as plain text (a leaf), or None. Such a difference between the two is refused."""
    found = _LIVE.search(src.data[node.start_byte : node.end_byte])
    return None if found is None else node.start_byte + found.start(1)


def _join(
    node: Node, src: Source, start: int, end: int, escape: re.Pattern[str], depth: int
) -> str:
    parts: list[str] = []
    pos = start
    for child in node.named_children:
        parts.append(escape.sub(_unescape, _slice(src, pos, child.start_byte)))
        if child.type == "string_content":
            parts.append(escape.sub(_unescape, src.text(child)))
        else:
            parts.append(render(child, src, depth + 1))
        pos = child.end_byte
    parts.append(escape.sub(_unescape, _slice(src, pos, end)))
    return "".join(parts)


def _slice(src: Source, start: int, end: int) -> str:
    return src.data[start:end].decode("utf-8", "surrogateescape") if end > start else ""


def _unescape(match: re.Match[str]) -> str:
    return "" if match[1] == "\n" else match[1]  # a backslash-newline joins lines


def _ansi_c(match: re.Match[str]) -> str:
    """One escape of `$'...'` as bash decodes it."""
    e = match[1]
    try:
        if e[0] in "xuU" and len(e) > 1:
            code = int(e[1:], 16)
            return "" if 0xD800 <= code <= 0xDFFF else chr(code)  # no lone surrogates
        if e[0] in "01234567":
            return chr(int(e, 8) & 0xFF)
    except (ValueError, OverflowError):  # beyond Unicode: bash writes nothing useful either
        return ""
    if e[0] == "c" and len(e) == 2:
        return chr(ord(e[1]) & 0x1F)
    return _ANSI_C_SIMPLE.get(e, e if e in "\\'\"?" else "\\" + e)
