"""The daemon's git mirrors on disk: where they live, whose they are, one operation's files.

    <volume>/.wsrunner-git/              root's, 0711 (workspace uids pass through, none lists)
        <workspace_id>/                  root's, 0711
            data/                        the workspace uid's, 0700: the mirror sandbox's root
                known_hosts              ssh's record of the hosts seen (accept-new)
                <sha256(url)[:32]>.git   a bare mirror of one remote's branches and tags
            op-<random>/                 root's, 0711: one operation's files, removed after it
                gitconfig  askpass       git's only configuration; the token's prompt (0755)
                ssh_key    home/         the task's key (0400, the workspace uid's); empty HOME

A mirror belongs to the workspace's uid, so that its sandbox runs as that uid; nothing but the
daemon's git writes in it. Its configuration is still the daemon's: written again (root's,
0644) before every operation, with whatever could make git read configuration or objects from
elsewhere removed. Where a workspace's commands could reach it (isolation below `full`, no
mount namespace), they run as the same uid: every path in there is opened through directory
descriptors, never through a symlink.

Blocking (directory work): call from a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Final

from wsrunner.errors import WorkspaceError

MIRRORS_DIR: Final = ".wsrunner-git"  #: in the volume; no workspace id starts with a dot
STALE_OP_S: Final = 3600.0  #: an operation directory this old was left by a daemon that died
_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ASKPASS: Final = """#!/bin/sh
case "$1" in
  Username*) printf '%s\\n' "$WSRUNNER_GIT_USERNAME" ;;
  *) printf '%s\\n' "$WSRUNNER_GIT_PASSWORD" ;;
esac
"""
_MIRROR_CONFIG: Final = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n"
#: Entries that would make git read configuration or objects elsewhere, or run programs.
_FOREIGN: Final = (
    ("", "commondir"),
    ("", "gitdir"),
    ("", "hooks"),
    ("info", "attributes"),
    ("objects/info", "alternates"),
)

Owner = tuple[int, int] | None  #: (uid, gid) to give what is made, or None: the daemon's


@dataclass(frozen=True, slots=True)
class Mirror:
    """One remote's mirror in one workspace, as found before an operation."""

    path: str  #: the bare repository
    data: str  #: the workspace's mirrors directory: the root of the mirror sandbox
    shallow: bool  #: it holds part of the history only
    fresh: bool  #: it holds no branch yet


def open_mirror(base: str, workspace_id: str, url: str, root: str) -> Mirror:
    """The mirror of `url` for the workspace at `root`: made if missing, repaired, its
    configuration written again; stale operation directories of the workspace removed."""
    owner = _owner(root)
    wsdir = os.path.join(base, workspace_id)
    _root_dir(base)
    _root_dir(wsdir)
    data = os.path.join(wsdir, "data")
    _owned_dir(data, owner)
    _clear_stale(wsdir)
    name = hashlib.sha256(url.encode()).hexdigest()[:32] + ".git"
    dfd = os.open(data, _DIR)
    try:
        fresh, shallow = _bare_repository(dfd, name, owner)
    finally:
        os.close(dfd)
    return Mirror(os.path.join(data, name), data, shallow, fresh)


def make_operation(
    base: str, workspace_id: str, root: str, *, config: str, ssh_key: str | None
) -> str:
    """A fresh directory of the daemon's files for one git run (`remove_operation` it)."""
    op = os.path.join(base, workspace_id, f"op-{secrets.token_hex(8)}")
    os.mkdir(op, 0o711)
    os.chmod(op, 0o711)
    os.mkdir(os.path.join(op, "home"), 0o755)
    dfd = os.open(op, _DIR)
    try:
        _write(dfd, "gitconfig", config, 0o644, None)
        _write(dfd, "askpass", _ASKPASS, 0o755, None)
        if ssh_key:  # ssh reads it as the workspace's uid, and wants it private
            _write(dfd, "ssh_key", ssh_key.rstrip("\n") + "\n", 0o400, _owner(root))
    finally:
        os.close(dfd)
    return op


def remove_operation(op: str) -> None:
    shutil.rmtree(op, ignore_errors=True)


def gitconfig(trust: tuple[str, ...]) -> str:
    """A mirror's whole git configuration: hooks, fsmonitor and ext off; upload-pack may
    serve any object (the push's local fetch names objects by id); `trust` are the host paths
    of local repositories owned by another uid (a file:// remote)."""
    lines = [
        "[core]",
        "\thooksPath = /dev/null",
        "\tfsmonitor = false",
        '[protocol "ext"]',
        "\tallow = never",
        "[gc]",
        "\tautoDetach = false",
        "[uploadpack]",
        "\tallowAnySHA1InWant = true",
        "[safe]",
    ]
    for path in trust:
        for p in (path, f"{path}/.git"):
            quoted = p.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'\tdirectory = "{quoted}"')
    return "\n".join(lines) + "\n"


def _owner(root: str) -> Owner:
    """Who the mirrors of the workspace at `root` belong to: its uid, if the daemon is root."""
    if os.geteuid() != 0:
        return None
    st = os.stat(root, follow_symlinks=False)
    return st.st_uid, st.st_gid


def _root_dir(path: str) -> None:
    """`path` as the daemon's own directory, 0711; a symlink or another's is refused."""
    try:
        os.mkdir(path, 0o711)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise WorkspaceError(f"{path} is not a directory of the daemon's; refusing to use it")
    if stat.S_IMODE(st.st_mode) != 0o711:
        os.chmod(path, 0o711)


def _owned_dir(path: str, owner: Owner) -> None:
    """`path` as a 0700 directory of `owner`; one of another owner (the workspace was made
    again, with another uid) is a stale cache and is replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    want = owner or (os.geteuid(), os.getegid())
    if st is not None and (not stat.S_ISDIR(st.st_mode) or (st.st_uid, st.st_gid) != want):
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        st = None
    if st is None:
        os.mkdir(path, 0o700)
        if owner is not None:
            os.chown(path, *owner, follow_symlinks=False)


def _clear_stale(wsdir: str) -> None:
    """Remove operation directories (and the keys in them) left by a daemon that died."""
    limit = time.time() - STALE_OP_S
    with os.scandir(wsdir) as it:
        for entry in it:
            if entry.name.startswith("op-") and entry.stat(follow_symlinks=False).st_mtime < limit:
                shutil.rmtree(entry.path, ignore_errors=True)


def _write(dfd: int, name: str, text: str, mode: int, owner: Owner) -> None:
    """Create `name` in the directory `dfd` holding `text`, with exactly `mode` (and owner)."""
    fd = os.open(name, _NEW_FILE, 0o600, dir_fd=dfd)
    try:
        os.write(fd, text.encode())
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _subdir(dfd: int, name: str, owner: Owner) -> int:
    """The directory `name` in `dfd`, open; made (0700, `owner`'s) if missing, and made again
    if something else (a symlink, a file) is there."""
    for _ in range(2):
        try:
            os.mkdir(name, 0o700, dir_fd=dfd)
            fd = os.open(name, _DIR, dir_fd=dfd)
            if owner is not None:
                os.fchown(fd, *owner)
            return fd
        except FileExistsError:
            try:
                return os.open(name, _DIR, dir_fd=dfd)
            except OSError:  # not a directory, or a symlink
                _remove(dfd, name)
    raise WorkspaceError(f"cannot make the directory {name} of a git mirror")


def _remove(dfd: int, name: str) -> None:
    """Remove whatever `name` is in `dfd`, never following a symlink; missing is no error."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _bare_repository(data_fd: int, name: str, owner: Owner) -> tuple[bool, bool]:
    """Make or repair the bare repository `name` in `data_fd`; (fresh: no branch yet,
    shallow: part of the history only)."""
    try:
        os.stat(name, dir_fd=data_fd, follow_symlinks=False)
        new = False
    except FileNotFoundError:
        new = True
    fds = {"": _subdir(data_fd, name, owner)}
    try:
        repo = fds[""]
        for sub in ("objects", "objects/info", "refs", "refs/heads", "refs/tags", "info"):
            parent, _, leaf = sub.rpartition("/")
            fds[sub] = _subdir(fds[parent], leaf, owner)
        for where, leaf in _FOREIGN:
            _remove(fds[where], leaf)
        if new:
            _write(repo, "HEAD", "ref: refs/heads/main\n", 0o644, owner)
        temp = f"config.wsrunner-{secrets.token_hex(6)}"
        _write(repo, temp, _MIRROR_CONFIG, 0o644, None)
        os.rename(temp, "config", src_dir_fd=repo, dst_dir_fd=repo)
        shallow = _lexists(repo, "shallow")
        with os.scandir(fds["refs/heads"]) as it:
            if next(it, None) is not None:
                return False, shallow
        try:
            fd = os.open("packed-refs", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=repo)
        except OSError:
            return True, shallow
        with os.fdopen(fd, "rb") as f:
            return b" refs/heads/" not in f.read(), shallow
    finally:
        for fd in fds.values():
            os.close(fd)


def _lexists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
