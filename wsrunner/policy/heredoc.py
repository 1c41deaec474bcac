"""Here-documents: where bash ends one, and the substitutions an unquoted one runs.

tree-sitter-bash finds here-document bodies but does not always read them as bash does: it ends
a body at a line that only starts with the delimiter, takes `EOF;cat` for a delimiter, and misses
a substitution after blanks at the start of a line. So the extent it found is checked against
bash's rules (the body starts on the line after the `<<` and ends at the first line that is the
delimiter exactly), and the body of an unquoted here-document is searched here: each `$(`,
backtick, `$((`, `$[` and `${` is parsed on its own, as inside double quotes, in a window of text
that grows until the substitution closes. A body that cannot be read that way is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from tree_sitter import Node

from wsrunner.policy.words import Source, live_substitution

#: A delimiter the checks below understand: a plain word, quoted or not.
_PLAIN_DELIMITER: Final = re.compile(rb"[A-Za-z0-9_.:+,=@%/'\"\\-]+")
#: In an unquoted body: an escape, `$$` (the shell's pid), or the start of a substitution.
_STARTS: Final = re.compile(rb"\\[\\$`]|\$\$|\$[({\[]|`")
_PREFIX: Final = b'echo "'  #: a body is read like the inside of a double-quoted string
_FIRST_WINDOW: Final = 64  #: bytes; most substitutions are shorter
_ESCAPE: Final = re.compile(rb"\\([\\$`\n])")


@dataclass(frozen=True, slots=True)
class Body:
    """A here-document's body: bytes [start, end) of its source (end: the delimiter line)."""

    start: int
    end: int
    quoted: bool  #: `<<'EOF'`: the body is text; `<<EOF`: substitutions in it run
    strip_tabs: bool  #: `<<-EOF`


class Scanner:
    """Checks here-documents and finds their substitutions; one per command line read.

    `parse` gives the root of a tree; the window parses of all bodies together read at most
    16 times the command line's length (then the line is refused as too complex).
    """

    def __init__(self, top: bytes, parse: Callable[[bytes], Node], error: type[Exception]) -> None:
        self.parse = parse
        self.error = error
        self.budget = 16 * len(top) + 65_536

    def check(self, node: Node, src: Source) -> Body:
        """The body of the `heredoc_redirect` `node`, once its extent is bash's."""
        data = src.data
        starts = [c for c in node.children if c.type == "heredoc_start"]
        ends = [c for c in node.children if c.type == "heredoc_end"]
        if len(starts) != 1 or len(ends) != 1 or ends[0].is_missing:
            raise self._unreadable("its delimiter or its end is missing", src, node.start_byte)
        start, end = starts[0], ends[0]
        raw = data[start.start_byte : start.end_byte]
        delimiter = _unquote(raw) if _PLAIN_DELIMITER.fullmatch(raw) else None
        if not delimiter:
            raise self._unreadable(
                f"the delimiter {raw.decode('utf-8', 'replace')!r} is not a "
                "plain word (letters, digits, _.-, quoted or not)",
                src,
                start.start_byte,
            )
        strip = node.children[0].type == "<<-"
        newline = data.find(b"\n", start.end_byte)
        if newline < 0 or _continues(data, newline):
            raise self._unreadable("its line does not end", src, start.start_byte)
        body_start = newline + 1
        bodies = [
            c for c in node.children if c.type == "heredoc_body" and c.end_byte > c.start_byte
        ]
        first = bodies[0].start_byte if bodies else end.start_byte
        end_line = data.rfind(b"\n", 0, end.start_byte) + 1
        if first < body_start or data[body_start:first].strip():
            raise self._unreadable(
                "its body does not start on the next line", src, start.start_byte
            )
        line_end = data.find(b"\n", end.end_byte)
        after = data[end.end_byte : len(data) if line_end < 0 else line_end]
        lead = data[end_line : end.start_byte]
        if (
            end_line < body_start
            or data[end.start_byte : end.end_byte] != delimiter
            or after
            or lead.strip(b"\t" if strip else b"")
        ):
            raise self._unreadable(
                "it does not end at a line that is its delimiter", src, end.start_byte
            )
        quoted = raw != delimiter
        logical = b""  # in an unquoted body, a line ending in `\` continues on the next one
        pos = body_start
        while pos < end_line:
            eol = data.index(b"\n", pos)
            line = data[pos:eol]
            logical += line.lstrip(b"\t") if strip else line
            if not quoted and _continues(data, eol):
                logical = logical[:-1]
            elif logical == delimiter:
                raise self._unreadable("a line of its body is the delimiter", src, pos)
            else:
                logical = b""
            pos = eol + 1
        if logical:
            raise self._unreadable(
                "its last line continues onto the delimiter line", src, end.start_byte
            )
        return Body(body_start, end_line, quoted, strip)

    def text(self, node: Node, src: Source) -> str:
        """What the command reads: the body, tabs stripped for `<<-`, escapes resolved when
        unquoted (the results of substitutions are unknown and stay as written)."""
        body = self.check(node, src)
        raw = src.data[body.start : body.end]
        if body.strip_tabs:
            raw = re.sub(rb"(?m)^\t+", b"", raw)
        if not body.quoted:
            raw = _ESCAPE.sub(lambda m: b"" if m[1] == b"\n" else m[1], raw)
        return raw.decode("utf-8", "surrogateescape")

    def substitutions(self, body: Body, src: Source) -> Iterator[tuple[Node, Source]]:
        """Each substitution or expansion of an unquoted body, with the source it was read from.

        From each substitution the body's text is read as the inside of a double-quoted string,
        in a window that grows while a substitution runs past it; the string ends at the first
        `"` outside a substitution (a plain character in the body: reading resumes after it).
        """
        data, pos, window = src.data, body.start, _FIRST_WINDOW
        while (found := _STARTS.search(data, pos, body.end)) is not None:
            if found[0] == b"$$" or found[0].startswith(b"\\"):
                pos = found.end()
                continue
            start = found.start()
            end = min(start + window, body.end)
            at = Source(
                _PREFIX + data[start:end] + b'"',
                src.origin,
                src.offset + start - len(_PREFIX),
                src.what,
            )
            text = _string_at(self._parse(at.data), len(_PREFIX) - 1)
            read, cut = start, text is None  # `read`: where the accepted text of this window ends
            for child in text.named_children if text is not None else ():
                child_end = at.offset + child.end_byte
                if child.has_error or child_end > end:
                    cut = True  # it runs past the window (or does not end at all)
                    break
                if child.type == "string_content":
                    if (live := live_substitution(child, at)) is not None:
                        raise self._unreadable("a substitution the grammar did not read", at, live)
                else:
                    yield child, at
                read = child_end
            if text is not None and not cut:
                pos, window = max(read, min(at.offset + text.end_byte, end)), _FIRST_WINDOW
            elif read > start:
                pos = read
            elif end >= body.end:
                raise self._unreadable("a substitution in its body does not end", src, start)
            else:
                window *= 4

    def _parse(self, data: bytes) -> Node:
        self.budget -= len(data)
        if self.budget < 0:
            raise self.error(
                "cannot read the command: its here-documents hold too many substitutions to read"
            )
        return self.parse(data)

    def _unreadable(self, why: str, src: Source, byte: int) -> Exception:
        return self.error(f"cannot read the here-document at {src.where(byte)}: {why}")


def _continues(data: bytes, newline: int) -> bool:
    """Whether the newline at `newline` is escaped: an odd run of backslashes before it."""
    run = 0
    while newline - run > 0 and data[newline - run - 1] == ord("\\"):
        run += 1
    return run % 2 == 1


def _string_at(root: Node, byte: int) -> Node | None:
    """The double-quoted string that starts at `byte` (the window's text), or None."""
    node: Node | None = root.descendant_for_byte_range(byte, byte + 1)
    while node is not None and node.start_byte == byte and node.type != "string":
        node = node.parent
    return node if node is not None and node.type == "string" and node.start_byte == byte else None


def _unquote(raw: bytes) -> bytes | None:
    """The delimiter bash compares lines with: `raw` after quote removal (None: unclosed)."""
    out = bytearray()
    quote = 0
    i = 0
    while i < len(raw):
        c = raw[i]
        if quote == ord("'"):
            quote = 0 if c == quote else quote
            if quote:
                out.append(c)
        elif c == quote:  # the closing double quote
            quote = 0
        elif c == ord("\\") and i + 1 < len(raw) and (not quote or raw[i + 1] in b'"\\$`'):
            out.append(raw[i + 1])
            i += 1
        elif c in b"'\"" and not quote:
            quote = c
        else:
            out.append(c)
        i += 1
    return None if quote else bytes(out)
