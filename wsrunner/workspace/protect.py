"""The policy's protected workspace paths (`sandbox.protect`): what a command gets pinned, and
whether a path the daemon is asked to write is one.

A glob such as `repos/*/.git/config` is matched one path component at a time (`*` never spans
a `/`), against paths with no symlink in them: the daemon resolves a path beneath the workspace
first (`paths.write_text`, `paths.make_dirs`), and `find` never follows a symlink.

What protect guarantees (policies/README.md says it for operators):

- For a command: every protected path that exists as a file or directory (not a symlink) when
  the command starts is bound read-only onto itself, and the directory holding it (unless that
  is the workspace) is bound read-write onto itself. Mount points can be neither removed,
  renamed nor replaced (EBUSY), so until the command ends the path keeps its content and its
  place in its directory, and that directory (a `.git`) cannot be renamed away from it.
- For the daemon's writes (the write_file and create_directory steps, the internal
  `/files/write`, the tools' file write): a path that is, or lies under, a protected glob once
  resolved beneath the workspace is refused, whether it exists or not.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from wsrunner.errors import WorkspaceError

MAX_PROTECTED: Final = 4096  #: protected paths one command may have bound, at most
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(pattern: str) -> list[str]:
    return [p for p in pattern.split("/") if p not in ("", ".")]


def rule_for(rel: str, patterns: Sequence[str]) -> str | None:
    """The first glob of `patterns` that `rel` is, or lies under; None if there is none.

    `rel` is workspace-relative and normalised, with no symlink in it (resolved by the caller).
    """
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    for pattern in patterns:
        want = _parts(pattern)
        if (
            want
            and len(parts) >= len(want)
            and all(
                fnmatch.fnmatchcase(name, glob) for name, glob in zip(parts, want, strict=False)
            )
        ):
            return pattern
    return None


@dataclass(frozen=True, slots=True)
class Protected:
    """What the sandbox binds for one command, as absolute paths, parents before children."""

    read_only: tuple[str, ...] = ()  #: the protected paths: bound read-only onto themselves
    pinned: tuple[str, ...] = ()  #: the directories holding them: bound read-write onto themselves


def find_protected(root: str, patterns: Sequence[str]) -> Protected:
    """The protected paths that exist in the workspace at `root` as files or directories, and
    the directories holding them. Blocks: call it in a worker thread.

    Walks with directory fds and O_NOFOLLOW, so no symlink is followed (a symlink is never
    protected). A pinned directory at or under a read-only one is left out: its read-write
    bind would make part of that tree writable again.

    Errors: WorkspaceError if more than MAX_PROTECTED paths match.
    """
    found: set[str] = set()
    rfd = os.open(root, _DIR_FLAGS)
    try:
        for pattern in patterns:
            if parts := _parts(pattern):
                _match(rfd, "", parts, found)
    finally:
        os.close(rfd)
    read_only = sorted(found, key=lambda p: p.split("/"))
    ro = set(read_only)

    def under_read_only(path: str) -> bool:
        parts = path.split("/")
        return any("/".join(parts[:i]) in ro for i in range(1, len(parts) + 1))

    pinned = sorted({os.path.dirname(p) for p in read_only} - {""}, key=lambda p: p.split("/"))
    pinned = [p for p in pinned if not under_read_only(p)]
    return Protected(
        read_only=tuple(os.path.join(root, p) for p in read_only),
        pinned=tuple(os.path.join(root, p) for p in pinned),
    )


def _match(dfd: int, rel: str, parts: list[str], found: set[str]) -> None:
    """Add to `found` what `parts` matches in the directory `dfd` (at `rel`), depth first: one
    fd per component of the glob."""
    part, last = parts[0], len(parts) == 1
    if any(c in part for c in "*?["):
        try:
            names = sorted(n for n in os.listdir(dfd) if fnmatch.fnmatchcase(n, part))
        except OSError:
            return
    else:
        names = [part]
    for name in names:
        try:
            mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
        except OSError:
            continue
        path = f"{rel}/{name}" if rel else name
        if last:
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                found.add(path)
                if len(found) > MAX_PROTECTED:
                    raise WorkspaceError(
                        f"more than {MAX_PROTECTED} workspace paths match the policy's "
                        "sandbox.protect globs; remove some (e.g. repositories in repos/)"
                    )
        elif stat.S_ISDIR(mode):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except OSError:  # replaced by a symlink meanwhile, or gone
                continue
            try:
                _match(child, path, parts[1:], found)
            finally:
                os.close(child)
