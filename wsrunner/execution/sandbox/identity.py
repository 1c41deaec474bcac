"""Which uid a workspace's commands run as: its own, from a reserved range, when the daemon is root.

A workspace's uid is recorded by the owner of its directory, so there is no table to keep in
step: a directory owned by a uid of the range belongs to that uid. A new workspace gets the
lowest free uid, chosen under a lock file on the volume so that two daemons sharing a volume
never hand out the same one. With per-workspace uids, one workspace's processes cannot read,
signal or outlive-and-starve another's even where namespaces are missing.

Blocking (directory scans, chown): call from a worker thread.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from typing import Final

LOCK_NAME: Final = ".wsrunner-uids.lock"


@dataclass(frozen=True, slots=True)
class UidRange:
    first: int
    last: int

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    @classmethod
    def parse(cls, text: str) -> UidRange:
        lo, sep, hi = text.partition("-")
        if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
            raise ValueError("expected a range like 200000-265535")
        first, last = int(lo), int(hi)
        if not 1000 <= first <= last < 2**31:
            raise ValueError("expected 1000 <= first <= last < 2^31")
        return cls(first, last)


def _chown_tree(root: str, uid: int, gid: int) -> None:
    """Give everything under `root` to uid:gid without following a symlink anywhere."""
    os.chown(root, uid, gid, follow_symlinks=False)
    for _, dirs, files, dfd in os.fwalk(root, follow_symlinks=False):
        for name in dirs + files:
            try:
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass


def assign(volume: str, root: str, uids: UidRange) -> tuple[int, int]:
    """The (uid, gid) of the workspace at `root`, allocating one and chowning it if needed."""
    st = os.stat(root, follow_symlinks=False)
    if st.st_uid in uids:
        return st.st_uid, st.st_gid
    lock = os.open(os.path.join(volume, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = os.stat(root, follow_symlinks=False)
        if st.st_uid in uids:  # another daemon was faster
            return st.st_uid, st.st_gid
        taken = set()
        with os.scandir(volume) as it:
            for entry in it:
                try:
                    owner = entry.stat(follow_symlinks=False).st_uid
                except OSError:
                    continue
                if owner in uids:
                    taken.add(owner)
        uid = next((u for u in range(uids.first, uids.last + 1) if u not in taken), None)
        if uid is None:
            raise OSError(f"no free uid left in {uids.first}-{uids.last} for a new workspace")
        _chown_tree(root, uid, uid)
        os.chmod(root, stat.S_IRWXU)  # 0700: only its own uid (and root) may enter
        return uid, uid
    finally:
        os.close(lock)


def volume_reachable(volume: str) -> str | None:
    """Why other uids cannot reach workspaces under `volume` (an ancestor without o+x), or None."""
    path = os.path.abspath(volume)
    while True:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        if not mode & stat.S_IXOTH:
            return (
                f"{path} (mode {stat.S_IMODE(mode):04o}) cannot be traversed by workspace "
                "uids; give it o+x (e.g. chmod 0711)"
            )
        if path == "/":
            return None
        path = os.path.dirname(path)
