"""Regex search in a workspace: ripgrep when installed, else a Python walk with the same rules.

Both skip `.git`, binary files (a NUL byte), files over FILE_CAP and symlinks, and report
matches as `{file, line, content}` with `file` relative to the workspace root, so callers cannot
tell the engines apart. Both stop after TIMEOUT_S or SCAN_CAP matches and say so.

Neither follows a symlink out of the workspace, even one swapped in during the search: ripgrep
runs inside the workspace's sandbox (the caller's `spawn`), and the Python walk goes down by
directory descriptors (`os.fwalk`, from a start opened with `paths.open_beneath`) and opens
each file in its directory without following a symlink.

Patterns are RE2 syntax, which is ripgrep's too (both descend from RE2): no backreferences, no
look-around, no possessive or atomic groups; `\\uXXXX` and `\\u{...}` are accepted as ripgrep
accepts them. The one difference left: ripgrep's `\\w`, `\\d`, `\\s` and `\\b` are Unicode-aware,
the walk's (RE2's) are ASCII; write `\\pL` or `\\p{Greek}` for letters beyond ASCII in both.

Nothing a pattern costs is unbounded on the event loop (the pattern is the tenant's): it is
compiled by RE2 in a worker thread, one at a time, within RE2_MAX_MEM (RE2 holds the GIL while
it compiles, so that cap is what bounds the pause); ripgrep compiles it in its own sandboxed
process within RG_SIZE_LIMIT; the walk matches in linear time in a worker thread, checking its
deadline on every line and skipping (as incomplete) a line too long for the pattern's size.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import re2  # type: ignore[import-untyped]
import trio

from wsrunner.errors import ValidationError, WorkspaceError
from wsrunner.execution.process import CappedBuffer, Capture
from wsrunner.models import JSON
from wsrunner.workspace import paths

#: Runs argv with the workspace root as cwd, filling the capture; its exit status.
Spawn = Callable[[list[str], Capture], Awaitable[int]]

TIMEOUT_S: Final = 30.0
MAX_RESULTS: Final = 200
SCAN_CAP: Final = 10_000  #: matches collected before sorting and cutting to max_results
LINE_CAP: Final = 500  #: characters of a matching line returned
FILE_CAP: Final = 10 * 1024 * 1024  #: larger files are not searched
OUTPUT_CAP: Final = 64 * 1024 * 1024  #: of ripgrep's JSON output
PATTERN_CAP: Final = 1000  #: characters of a pattern
#: RE2's memory for one pattern: its program and its DFA caches. Compiling stops ("too large")
#: at about two thirds of it, which bounds the compile to milliseconds.
RE2_MAX_MEM: Final = 2 * 1024 * 1024
#: Unicode property classes (\p, \P) in one pattern: each costs RE2's parser a table walk
#: before RE2_MAX_MEM can apply (a thousand characters of them took 50 ms, the GIL held).
UNICODE_CLASS_CAP: Final = 16
#: ripgrep's limits on its compiled regex and its DFA (its own defaults, made explicit).
RG_SIZE_LIMIT: Final = "10M"
#: A line's bytes times the program's size, beyond which the walk does not match the line:
#: RE2's slowest engine (when its DFA runs out of memory) does about 10^9 of these a second.
MATCH_BUDGET: Final = 4_000_000_000

#: What RE2's error says, and what to tell the tenant instead (the first prefix that matches).
_UNSUPPORTED: Final = (
    ("invalid escape sequence: \\1", "backreferences (\\1 to \\9) are not supported"),
    ("invalid escape sequence: \\k", "named backreferences (\\k<name>) are not supported"),
    ("invalid escape sequence: \\g", "backreferences (\\g<name>) are not supported"),
    ("invalid perl operator: (?P", "named backreferences ((?P=name)) are not supported"),
    ("invalid perl operator: (?=", "look-ahead ((?=...)) is not supported"),
    ("invalid perl operator: (?!", "negative look-ahead ((?!...)) is not supported"),
    ("invalid perl operator: (?<=", "look-behind ((?<=...)) is not supported"),
    ("invalid perl operator: (?<!", "negative look-behind ((?<!...)) is not supported"),
    ("invalid perl operator: (?>", "atomic groups ((?>...)) are not supported"),
    ("bad repetition operator: ", "possessive repetitions (++, *+, ?+) are not supported"),
    ("invalid escape sequence: \\Z", "\\Z is not supported; \\z is the end of the line"),
    ("invalid repetition size", "a repetition count is over 1000 (nested counts multiply)"),
    (
        "pattern too large",
        f"it compiles to more than RE2's {RE2_MAX_MEM // 1024} KiB; use "
        "fewer or smaller counted repetitions and Unicode classes",
    ),
)
_SYNTAX: Final = "RE2 syntax, as ripgrep's: no backreferences or look-around"

Regex = Any  #: a compiled RE2 pattern (google-re2 has no type hints)

_COMPILING: Final[trio.lowlevel.RunVar[trio.CapacityLimiter]] = trio.lowlevel.RunVar("compiling")


@dataclass(frozen=True, slots=True)
class Query:
    pattern: str
    regex: Regex
    include: str | None
    max_results: int


async def prepare(pattern: object, include: object, max_results: object) -> Query:
    """`check` off the event loop, in a worker thread, one pattern at a time.

    One at a time because RE2 holds the GIL while it compiles: a second thread would not run
    in parallel, only keep the event loop waiting longer between two compiles.
    """
    try:
        limiter = _COMPILING.get()
    except LookupError:
        limiter = trio.CapacityLimiter(1)
        _COMPILING.set(limiter)
    return await trio.to_thread.run_sync(check, pattern, include, max_results, limiter=limiter)


def check(pattern: object, include: object, max_results: object) -> Query:
    """A validated query, its pattern compiled; ValidationError names the field otherwise.

    Blocking for up to tens of milliseconds (the compile): from the event loop, use `prepare`.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValidationError("pattern", "expected a non-empty regular expression")
    if len(pattern) > PATTERN_CAP or "\x00" in pattern or "\n" in pattern:
        raise ValidationError(
            "pattern", f"expected at most {PATTERN_CAP} characters, on one line, and no NUL"
        )
    regex = compile_re2(pattern)
    if include is not None and (
        not isinstance(include, str)
        or not include
        or len(include) > 200
        or not include.isprintable()
    ):
        raise ValidationError(
            "include", "expected a glob such as *.py (1-200 printable characters)"
        )
    if (
        isinstance(max_results, bool)
        or not isinstance(max_results, int)
        or not 1 <= max_results <= MAX_RESULTS
    ):
        raise ValidationError(
            "max_results", f"expected an integer from 1 to {MAX_RESULTS}, got {max_results!r}"
        )
    return Query(pattern, regex, include, max_results)


def compile_re2(pattern: str) -> Regex:
    """`pattern` compiled by RE2 within RE2_MAX_MEM; ValidationError("pattern") says why not.

    Not through `re2.compile`, whose process-wide cache would keep 128 tenants' programs alive.
    """
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.log_errors = False  # a tenant's mistakes are its answer, not the daemon's log
    try:
        return re2._Regexp(_for_re2(pattern), options)
    except re2.error as exc:
        raw = exc.args[0] if exc.args else b""
        found = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    for prefix, explained in _UNSUPPORTED:
        if found.startswith(prefix):
            raise ValidationError("pattern", f"{explained} ({_SYNTAX})")
    raise ValidationError("pattern", f"not a valid regular expression: {found} ({_SYNTAX})")


def _for_re2(pattern: str) -> str:
    """`pattern` with ripgrep's `\\u` escapes in RE2's spelling; refuses what only one accepts.

    One pass over the escapes, so linear in the pattern.
    """
    out: list[str] = []
    classes = 0
    i = 0
    while (j := pattern.find("\\", i)) != -1:
        out.append(pattern[i:j])
        c = pattern[j + 1 : j + 2]
        i = j + 2
        if c in ("p", "P"):
            classes += 1
        elif c in ("C", "Q"):
            what = "\\C (one byte)" if c == "C" else "\\Q...\\E (a quoted literal)"
            raise ValidationError(
                "pattern", f"{what} is not supported; ripgrep refuses it ({_SYNTAX})"
            )
        elif c in ("u", "U") and (digits := _code_point(pattern, i, 4 if c == "u" else 8)):
            hex_digits, i = digits
            out.append(f"\\x{{{hex_digits}}}")
            continue
        out.append(pattern[j:i])
    out.append(pattern[i:])
    if classes > UNICODE_CLASS_CAP:
        raise ValidationError(
            "pattern",
            f"expected at most {UNICODE_CLASS_CAP} Unicode classes (\\p, \\P), found {classes}",
        )
    return "".join(out)


def _code_point(pattern: str, i: int, width: int) -> tuple[str, int] | None:
    """The hex digits of `\\uXXXX`, `\\UXXXXXXXX` or `\\u{X...}` at `i`, and where they end."""
    if pattern.startswith("{", i):
        end = pattern.find("}", i, i + 10)
        digits = pattern[i + 1 : end] if end != -1 else ""
        nxt = end + 1
    else:
        digits, nxt = pattern[i : i + width], i + width
        if len(digits) != width:
            return None
    if not digits or len(digits) > 8 or any(d not in "0123456789abcdefABCDEF" for d in digits):
        return None
    return digits, nxt


async def run(
    root: str, rel: str, query: Query, *, rg: str | None, spawn: Spawn | None
) -> tuple[list[JSON], bool]:
    """Matches under `root/rel` (unsorted) and whether the search was complete.

    ripgrep is used when both `rg` and a sandboxed `spawn` are given.
    """
    if rg is not None and spawn is not None:
        return await _ripgrep(rg, rel, query, spawn)
    deadline = time.monotonic() + TIMEOUT_S
    return await trio.to_thread.run_sync(_walk, root, rel, query, deadline)


def _match(file: str, line: int, text: str) -> JSON:
    content = text.rstrip("\r\n")
    return {"file": os.path.normpath(file), "line": line, "content": content[:LINE_CAP]}


async def _ripgrep(rg: str, rel: str, query: Query, spawn: Spawn) -> tuple[list[JSON], bool]:
    argv = [
        rg,
        "--json",
        "--no-config",
        "--hidden",
        "--no-ignore",
        "--no-follow",
        "--regex-size-limit",
        RG_SIZE_LIMIT,
        "--dfa-size-limit",
        RG_SIZE_LIMIT,
        "--glob",
        "!.git",
        "--max-filesize",
        str(FILE_CAP),
        "--max-count",
        str(SCAN_CAP),
    ]
    if query.include is not None:
        argv += ["--glob", query.include]
    argv += ["--regexp", query.pattern, "--", rel]
    capture = Capture(CappedBuffer(OUTPUT_CAP), CappedBuffer(64 * 1024))
    with trio.move_on_after(TIMEOUT_S) as scope:
        rc = await spawn(argv, capture)
    if not scope.cancelled_caught and rc == 2 and not capture.stdout.total:
        # --json prints a summary whenever the search ran: nothing at all means no regex.
        raise ValidationError("pattern", _rg_error(capture.stderr.text()))
    found = await trio.to_thread.run_sync(_rg_matches, capture.stdout.data, limiter=_RG_PARSING)
    return found, not (scope.cancelled_caught or capture.stdout.truncated)


def _rg_matches(output: bytes | bytearray) -> list[JSON]:
    """The matches in ripgrep's `--json` output (a worker thread; one parse at a time).

    A record is decoded whole only when it is small: one long line of a file can make a
    record of tens of megabytes (every submatch listed), and one `json.loads` of it holds the
    GIL for a second or more. Of a big record only what a match needs is read.
    """
    found: list[JSON] = []
    for line in output.splitlines():
        if len(found) >= SCAN_CAP:
            break
        if len(line) > _RG_RECORD_DECODED:
            if (match := _big_rg_match(line)) is not None:
                found.append(match)
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue  # the last line of a capped output
        if item.get("type") != "match":
            continue
        data = item["data"]
        if "text" not in data["path"] or "text" not in data["lines"]:
            continue  # a path or line that is not UTF-8
        found.append(_match(data["path"]["text"], data["line_number"], data["lines"]["text"]))
    return found


_RG_PARSING: Final = trio.CapacityLimiter(1)
_RG_RECORD_DECODED: Final = 64 * 1024  #: bigger match records are read in part
#: The start of a match record whose path and line are text; the line's text starts after it.
_RG_MATCH_HEAD: Final = re.compile(
    rb'\{"type":"match","data":\{"path":\{"text":("(?:[^"\\]|\\.)*")\},"lines":\{"text":"'
)
#: What follows the line's text: a `"` ending a JSON string cannot be followed by `},"` in one.
_RG_LINE_END: Final = re.compile(rb'"\},"line_number":([0-9]+),')


def _big_rg_match(record: bytes | bytearray) -> JSON | None:
    """The match of one big `--json` record: its path, line number and the start of its line
    (what `_match` keeps of it), or None if it is not a text match."""
    head = _RG_MATCH_HEAD.match(record, 0, 65536)
    if head is None:
        return None
    start = head.end()
    end = record.find(b'"},"line_number":', start)
    number = _RG_LINE_END.match(record, end) if end >= 0 else None
    if number is None:
        return None
    # Enough escaped text for LINE_CAP characters (12 bytes at most each: a surrogate pair);
    # a cut in the middle of an escape is backed off until the prefix decodes.
    raw = record[start : min(end, start + 12 * LINE_CAP)]
    for back in range(13):
        try:
            text = json.loads(b'"' + raw[: len(raw) - back] + b'"')
            break
        except ValueError:
            continue
    else:
        return None
    return _match(json.loads(head.group(1)), int(number.group(1)), text)


def _rg_error(stderr: str) -> str:
    """ripgrep's reason in one line: its `error:` line, else its first (e.g. the size limit)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("error:")), None)
    if reason is None:
        reason = lines[0] if lines else "ripgrep failed"
    return f"ripgrep cannot search with it: {reason.removeprefix('error:').strip()}"


def _walk(root: str, rel: str, query: Query, deadline: float) -> tuple[list[JSON], bool]:
    """The fallback, in a worker thread; gives up (incomplete) at `deadline`.

    Lines are matched as bytes (RE2 reads UTF-8); a matching line that is not UTF-8 is left
    out, as ripgrep's output gives such a line only as bytes, which `_ripgrep` leaves out too.
    """
    found: list[JSON] = []
    complete = True
    search = query.regex.search
    longest = MATCH_BUDGET // max(1, query.regex.programsize)
    # fnmatch.fnmatchcase would keep every tenant's glob in its process-wide cache.
    glob_text = query.include or ""
    glob = None if query.include is None else re.compile(fnmatch.translate(glob_text))
    # Directory descriptors all the way down (os.fwalk without following symlinks): a
    # directory swapped for a symlink during the walk is not entered, as root, by its path.
    with paths.open_root(root) as rfd:
        try:
            top = paths.open_beneath(rfd, rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (OSError, WorkspaceError):
            return found, complete
        try:
            for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=top):
                dirnames[:] = [d for d in dirnames if d != ".git"]
                for name in filenames:
                    if time.monotonic() > deadline:
                        return found, False
                    inside = os.path.normpath(os.path.join(dirpath, name))  # from `rel`
                    relpath = os.path.normpath(os.path.join(rel, inside))
                    if glob is not None:
                        subject = name if "/" not in glob_text else inside
                        if glob.match(subject) is None:
                            continue
                    data = _read_in(dfd, name)
                    if data is None or b"\x00" in data:
                        continue
                    lines = data.split(b"\n")
                    if lines[-1] == b"":
                        lines.pop()  # the newline that ends the last line does not start another
                    for n, raw in enumerate(lines, start=1):
                        if time.monotonic() > deadline:
                            return found, False
                        if len(raw) > longest:
                            complete = False
                            continue
                        if search(raw) is None:
                            continue
                        try:
                            text = raw.decode("utf-8")
                        except UnicodeDecodeError:
                            continue
                        found.append(_match(relpath, n, text))
                        if len(found) >= SCAN_CAP:
                            return found, False
        finally:
            os.close(top)
    return found, complete


def _read_in(dir_fd: int, name: str) -> bytes | None:
    """A regular file's bytes, `name` in the directory `dir_fd`, not followed if a symlink."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > FILE_CAP:
            return None
        return os.read(fd, FILE_CAP + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
