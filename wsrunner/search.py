"""Regex search in a workspace: ripgrep when installed, else a Python walk with the same rules.

Both skip `.git`, binary files (a NUL byte), files over FILE_CAP and symlinks, and report
matches as `{file, line, content}` with `file` relative to the workspace root, so callers cannot
tell the engines apart. Both stop after TIMEOUT_S or SCAN_CAP matches and say so.

Neither follows a symlink out of the workspace, even one swapped in during the search: ripgrep
runs inside the workspace's sandbox (the caller's `spawn`), and the Python walk opens every
file beneath the workspace with `paths.open_beneath`.
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
from typing import Final

import trio

from wsrunner import paths
from wsrunner.errors import ValidationError, WorkspaceError
from wsrunner.models import JSON
from wsrunner.process import CappedBuffer, Capture

#: Runs argv with the workspace root as cwd, filling the capture; its exit status.
Spawn = Callable[[list[str], Capture], Awaitable[int]]

TIMEOUT_S: Final = 30.0
MAX_RESULTS: Final = 200
SCAN_CAP: Final = 10_000  #: matches collected before sorting and cutting to max_results
LINE_CAP: Final = 500  #: characters of a matching line returned
FILE_CAP: Final = 10 * 1024 * 1024  #: larger files are not searched
OUTPUT_CAP: Final = 64 * 1024 * 1024  #: of ripgrep's JSON output


@dataclass(frozen=True, slots=True)
class Query:
    pattern: str
    regex: re.Pattern[str]
    include: str | None
    max_results: int


def check(pattern: object, include: object, max_results: object) -> Query:
    """A validated query; ValidationError names the field otherwise."""
    if not isinstance(pattern, str) or not pattern:
        raise ValidationError("pattern", "expected a non-empty regular expression")
    if len(pattern) > 1000 or "\x00" in pattern:
        raise ValidationError("pattern", "expected at most 1000 characters and no NUL")
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValidationError("pattern", f"not a valid regular expression: {exc}") from None
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
        raise ValidationError("max_results", f"expected an integer from 1 to {MAX_RESULTS}, "
                                             f"got {max_results!r}")  # fmt: skip
    return Query(pattern, regex, include, max_results)


async def run(root: str, rel: str, query: Query, *, rg: str | None,
              spawn: Spawn | None) -> tuple[list[JSON], bool]:  # fmt: skip
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
    argv = [rg, "--json", "--no-config", "--hidden", "--no-ignore", "--no-follow",
            "--glob", "!.git", "--max-filesize", str(FILE_CAP), "--max-count", str(SCAN_CAP)]  # fmt: skip
    if query.include is not None:
        argv += ["--glob", query.include]
    argv += ["--regexp", query.pattern, "--", rel]
    capture = Capture(CappedBuffer(OUTPUT_CAP), CappedBuffer(64 * 1024))
    with trio.move_on_after(TIMEOUT_S) as scope:
        rc = await spawn(argv, capture)
    if not scope.cancelled_caught and rc == 2 and not capture.stdout.total:
        message = capture.stderr.text().strip().splitlines()
        raise ValidationError("pattern", message[-1] if message else "ripgrep failed")
    found: list[JSON] = []
    for line in capture.stdout.data.splitlines():
        if len(found) >= SCAN_CAP:
            break
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
    return found, not (scope.cancelled_caught or capture.stdout.truncated)


def _walk(root: str, rel: str, query: Query, deadline: float) -> tuple[list[JSON], bool]:
    """The fallback, in a worker thread; gives up (incomplete) at `deadline`."""
    found: list[JSON] = []
    top = os.path.join(root, rel)
    include = query.include
    with paths.open_root(root) as rfd:
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            for name in filenames:
                if time.monotonic() > deadline:
                    return found, False
                full = os.path.join(dirpath, name)
                relpath = os.path.relpath(full, root)
                if include is not None:
                    subject = name if "/" not in include else os.path.relpath(full, top)
                    if not fnmatch.fnmatchcase(subject, include):
                        continue
                data = _read_beneath(rfd, relpath)
                if data is None or b"\x00" in data:
                    continue
                lines = data.split(b"\n")
                if lines[-1] == b"":
                    lines.pop()  # the newline that ends the last line does not start another
                for n, raw in enumerate(lines, start=1):
                    text = raw.decode("utf-8", errors="replace")
                    if query.regex.search(text):
                        found.append(_match(relpath, n, text))
                        if len(found) >= SCAN_CAP:
                            return found, False
    return found, True


def _read_beneath(root_fd: int, relpath: str) -> bytes | None:
    """A regular file's bytes, opened beneath the workspace with no symlink followed at all."""
    try:
        fd = paths.open_beneath(root_fd, relpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (OSError, WorkspaceError):
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
