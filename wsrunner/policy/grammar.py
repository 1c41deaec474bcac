"""tree-sitter's bash grammar, read within bounds, and the errors of the policy's shell reader.

The parser is fast on what it can read (64 KB in ~20 ms) but slow to recover from some errors
(64 KB of `)` take 14 s), and it is run on tenant text. So a reading that must have no error
stops at the first one; every parse of one reading shares PARSE_CPU_SECONDS of CPU time; and
two shapes on which it is slow without an error to stop at are refused before parsing: a long
pipeline, and a here-document line of many expansions.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Final

import tree_sitter_bash
from tree_sitter import Language, Node, Parser

from wsrunner.errors import WsrunnerError
from wsrunner.policy.words import Source

PARSE_CPU_SECONDS: Final = 1.0  #: CPU time all parses of one command line may take
MAX_PIPES: Final = 1_000  #: pipe operators in one command line (see Grammar.check_shape)
MAX_LINE_EXPANSIONS: Final = 1_000  #: `$` and backticks on a line, with a here-document
#: Where a `|` is text, not a pipe.
_TEXT: Final = frozenset(
    {"raw_string", "string_content", "ansi_c_string", "comment", "heredoc_body", "heredoc_content"}
)
_LANGUAGE: Final = Language(tree_sitter_bash.language())
READ_CHUNK: Final = 65536  #: bytes handed to the parser per read (a command is at most 64 KiB)
#: lead bytes of characters from U+40000 up, and bytes that are never UTF-8
_HIGH_PLANES: Final = re.compile(rb"[\xf1-\xff]")
_local = threading.local()


class ShellSyntaxError(WsrunnerError):
    """The command line cannot be read; `rule` is the built-in rule a denial names."""

    rule: str = "builtin:syntax"


class NestingTooDeepError(ShellSyntaxError):
    """More than MAX_DEPTH levels of `sh -c`, wrappers and substitutions inside one another."""

    rule = "builtin:nesting"


class CommandTooLongError(ShellSyntaxError):
    """The command line is longer than MAX_TEXT characters."""

    rule = "builtin:length"


class UnreadableCharacterError(ShellSyntaxError):
    """The command holds text the parser cannot be given safely: tree-sitter-bash 0.25.1 reads
    memory out of bounds (and crashes the daemon) on characters from about U+50000 up, as
    `a{` followed by U+F769D; every byte that starts one (0xF1-0xF4), and the bytes no UTF-8
    text holds (0xF5-0xFF), are refused before it sees them."""

    rule = "builtin:syntax"


class TooComplexError(ShellSyntaxError):
    """Reading the command line took more than PARSE_CPU_SECONDS, or has a shape that would."""

    rule = "builtin:complexity"


class Grammar:
    """The parses of one reading of a command line (one thread): they share a CPU budget."""

    def __init__(self) -> None:
        self.until = time.thread_time() + PARSE_CPU_SECONDS

    def tree(self, data: bytes) -> Node:
        """The syntax tree of `data`, errors included (a window cut from a text has some)."""
        root, _ = self._parse(data, stop_at_error=False)
        assert root is not None
        return root

    def read(self, src: Source) -> Node:
        """The syntax tree of `src.data`, which must have no error.

        Errors: ShellSyntaxError naming the first error (an unexpected text or a missing one)
        and its line:column; TooComplexError when the budget runs out.
        """
        root, stopped_at = self._parse(src.data, stop_at_error=True)
        if root is None:  # stopped at an error: the text up to there shows which
            root = self.tree(src.data[:stopped_at])
            if not root.has_error:
                shown = src.data[stopped_at : stopped_at + 20].decode("utf-8", "replace")
                raise ShellSyntaxError(
                    f"cannot read the command: unexpected {shown!r} at {src.where(stopped_at)}"
                )
        if root.has_error:
            raise ShellSyntaxError(f"cannot read the command: {first_error(root, src)}")
        return root

    def check_shape(self, data: bytes) -> None:
        """Refuse what the parser reads in quadratic time without an error to stop at.

        More than MAX_PIPES pipe operators (64 KB of `ls|` then `'`: seconds; 1,000: 50 ms).
        They are counted in a reading where each `|` is a blank, which quotes and
        here-documents the same way and has no pipeline to be slow on; a `|` in quoted text, a
        comment or a here-document is no pipe. And more than MAX_LINE_EXPANSIONS `$` and
        backticks on one line of a command with a here-document (64 KB of `$a ` on one body
        line: seconds; 1,000 per line: about 0.15 s in all).
        """
        if data.count(b"|") > MAX_PIPES:
            root = self.tree(data.replace(b"|", b" "))
            pipes = data.count(b"|")
            if not root.has_error:
                pipes = 0
                for found in re.finditer(rb"\|", data):
                    node = root.descendant_for_byte_range(found.start(), found.start() + 1)
                    pipes += node is None or node.type not in _TEXT
            if pipes > MAX_PIPES:
                raise TooComplexError(
                    f"cannot read the command: it has {pipes} pipes (|); at "
                    f"most {MAX_PIPES} are read"
                )
        if b"<<" in data:
            for number, line in enumerate(data.split(b"\n"), start=1):
                if (count := line.count(b"$") + line.count(b"`")) > MAX_LINE_EXPANSIONS:
                    raise TooComplexError(
                        f"cannot read the command: line {number} has {count} $ and ` with a "
                        f"here-document in the command; at most {MAX_LINE_EXPANSIONS} are read"
                    )

    def _parse(self, data: bytes, *, stop_at_error: bool) -> tuple[Node | None, int]:
        """(the root, 0), or (None, the byte where it stopped at an error)."""
        if (high := _HIGH_PLANES.search(data)) is not None:
            raise UnreadableCharacterError(
                f"cannot read the command: it holds byte {high.group()[0]:#04x} at byte "
                f"{high.start()}, of a character from U+40000 up (an unassigned, special-"
                "purpose or private-use plane) or of no character; such text is refused"
            )
        parser = getattr(_local, "parser", None)
        if parser is None:  # one per thread: a parser is not shared
            parser = _local.parser = Parser(_LANGUAGE)
        stopped: list[int] = []

        def read(byte: int, _point: object) -> bytes:
            # A bytes object, never a memoryview: py-tree-sitter 0.26 keeps a pointer into
            # what the callback returned, and a memoryview's buffer can go while it does (a
            # segfault in a clean-clone CI run: tree-sitter/py-tree-sitter#435).
            return data[byte : byte + READ_CHUNK]

        def progress(offset: int, has_error: bool) -> bool:
            if stop_at_error and has_error:  # every version of the parse is in error
                stopped.append(offset)
                return True
            return time.thread_time() > self.until

        try:
            tree = parser.parse(read, progress_callback=progress)
        except ValueError:  # cancelled by `progress`
            parser.reset()  # or the next parse would resume this one
            if stopped:
                return None, min(stopped[0], len(data))
            raise TooComplexError(
                f"cannot read the command: reading it took more than "
                f"{PARSE_CPU_SECONDS:g} s of CPU time"
            ) from None
        except BaseException:
            parser.reset()
            raise
        return tree.root_node, 0


def first_error(root: Node, src: Source) -> str:
    """The first ERROR or MISSING node of a tree, as "unexpected ... at line:column"."""
    stack = [root]
    while stack:
        node = stack.pop()
        if node.is_missing:
            what = (
                "the line ending the here-document"
                if node.type == "heredoc_end"
                else repr(node.type)
            )
            return f"missing {what} at {src.where(node.start_byte)}"
        if node.is_error:
            raw = src.data[node.start_byte : node.end_byte]
            at = node.start_byte + len(raw) - len(raw.lstrip())  # the text, not the blank before
            text = raw.strip().decode("utf-8", "replace")
            shown = repr(text[:20] + ("..." if len(text) > 20 else "")) if text else "end of text"
            return f"unexpected {shown} at {src.where(at)}"
        stack.extend(reversed([c for c in node.children if c.has_error or c.is_missing]))
    return f"unreadable text at {src.where(0)}"  # has_error promised a node
