"""What a workspace occupies on disk, bytes and inodes, counted without following a symlink."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Usage:
    """What a workspace occupies: bytes allocated, and inodes (files, directories, links...)."""

    bytes: int
    inodes: int


_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def disk_usage(root: str) -> Usage:
    """Bytes allocated under `root` (blocks, not sizes) and the inodes there; hard links once.

    No symlink is followed, at any depth: the walk holds one directory fd, opens each child
    from it with O_NOFOLLOW, and comes back through `..` only if that is the directory it came
    from. If not, a command moved it meanwhile: the walk starts over from `root`, up to three
    times, then answers the most it counted (a lower bound). No path is built, so no depth is
    too deep for it.
    """
    most = Usage(0, 0)
    for _ in range(3):
        size, inodes, complete = _walk(root)
        if complete:
            return Usage(size, inodes)
        most = Usage(max(most.bytes, size), max(most.inodes, inodes))
    return most


def _walk(root: str) -> tuple[int, int, bool]:
    """(bytes, inodes, complete) of one walk of `root` (see `disk_usage`)."""
    seen: set[tuple[int, int]] = set()
    total = inodes = 0

    def scan(fd: int) -> list[str]:
        """Count the entries of the directory `fd`; the names of its subdirectories."""
        nonlocal total, inodes
        subdirs = []
        with os.scandir(fd) as it:
            for de in it:
                try:
                    st = de.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(de.name)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                inodes += 1
                total += st.st_blocks * 512
        return subdirs

    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return 0, 0, True
    try:
        st = os.fstat(fd)
        ids = [(st.st_dev, st.st_ino)]  #: of each directory from `root` down to `fd`
        pending = [scan(fd)]  #: per level, the subdirectories still to walk
        while pending:
            if pending[-1]:
                try:
                    child = os.open(pending[-1].pop(), _DIR_FLAGS, dir_fd=fd)
                except OSError:  # gone, or a symlink now
                    continue
                os.close(fd)
                fd = child
                st = os.fstat(fd)
                ids.append((st.st_dev, st.st_ino))
                try:
                    pending.append(scan(fd))
                except OSError:
                    pending.append([])
                continue
            pending.pop()
            ids.pop()
            if not pending:
                break
            try:
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            except OSError:
                return total, inodes, False
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ids[-1]:  # moved: `..` is not where the walk came from
                return total, inodes, False
        return total, inodes, True
    finally:
        os.close(fd)
