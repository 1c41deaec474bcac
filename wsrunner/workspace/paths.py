"""File operations contained in a workspace, safe against `..`, absolute paths and symlink tricks.

Every path is opened relative to the workspace's directory fd with `openat2(RESOLVE_BENEATH)`,
so the kernel refuses any resolution that leaves the workspace, including through a symlink that
is swapped in while we work. Where openat2 is missing (Linux < 5.6), each component is opened
with O_NOFOLLOW instead, which refuses symlinks altogether. FIFOs, sockets and devices are
refused. These functions block: call them through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from wsrunner.errors import PathEscapeError, PathNotFoundError, WorkspaceError
from wsrunner.workspace.protect import rule_for

_SYS_OPENAT2: Final = 437  # x86_64 and aarch64 share the number
_RESOLVE_NO_MAGICLINKS: Final = 0x02
_RESOLVE_NO_SYMLINKS: Final = 0x04
_RESOLVE_BENEATH: Final = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _probe_openat2() -> bool:
    how = _OpenHow(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_BENEATH)
    fd = _libc.syscall(_SYS_OPENAT2, -100, b".", ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        os.close(fd)
        return True
    return False


HAVE_OPENAT2: Final = _probe_openat2()


def clean_relative(path: str) -> str:
    """Normalise a workspace-relative path, refusing absolute paths, NULs and `..` escapes."""
    if "\x00" in path:
        raise PathEscapeError(f"path {path!r} contains a NUL character")
    if path.startswith(("/", "~")):
        raise PathEscapeError(f"path {path!r} is absolute; expected a path inside the workspace")
    norm = os.path.normpath(path or ".")
    if norm == ".." or norm.startswith("../"):
        raise PathEscapeError(f"path {path!r} leaves the workspace")
    return norm


def _openat2(dir_fd: int, rel: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    # openat2 refuses a mode without O_CREAT (EINVAL), unlike openat.
    mode = mode if flags & os.O_CREAT else 0
    how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS | resolve)
    while True:
        fd = _libc.syscall(
            _SYS_OPENAT2, dir_fd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how)
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):
            raise OSError(err, os.strerror(err), rel)


def _walk_nofollow(dir_fd: int, rel: str, flags: int, mode: int = 0) -> int:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    fd = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            nxt = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
            os.close(fd)
            fd = nxt
        last = parts[-1] if parts else "."
        return os.open(last, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def open_beneath(root_fd: int, path: str, flags: int, mode: int = 0o644) -> int:
    """Open `path` relative to `root_fd` without ever resolving outside it.

    Raises:
        PathEscapeError: the path, or a symlink on the way, leads outside the workspace.
        OSError: anything else (ENOENT, ENOTDIR, ...).
    """
    rel = clean_relative(path)
    try:
        if HAVE_OPENAT2:
            return _openat2(root_fd, rel, flags, mode)
        return _walk_nofollow(root_fd, rel, flags, mode)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.ELOOP):
            raise PathEscapeError(f"path {path!r} resolves outside the workspace") from None
        raise


def open_handle(root_fd: int, path: str) -> int:
    """An O_PATH descriptor of `path` beneath `root_fd` through no symlink at all (the last
    component included: a symlink there is refused, not opened), for handing an inode to
    another process (bubblewrap's `--bind-fd`) so that it never resolves a tenant's path.

    Raises PathEscapeError for a symlink on the way, OSError for anything else.
    """
    rel = clean_relative(path)
    try:
        if HAVE_OPENAT2:
            return _openat2(root_fd, rel, os.O_PATH | os.O_NOFOLLOW, resolve=_RESOLVE_NO_SYMLINKS)
        fd = _walk_nofollow(root_fd, rel, os.O_PATH)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.ELOOP):
            raise PathEscapeError(f"path {path!r} goes through a symlink") from None
        raise
    if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH|O_NOFOLLOW opens the link itself
        os.close(fd)
        raise PathEscapeError(f"path {path!r} is a symlink")
    return fd


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def open_root(root: str) -> Iterator[int]:
    """The workspace directory as an fd, the anchor of every contained operation."""
    with _fd(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as fd:
        yield fd


def _owner(root_fd: int) -> tuple[int, int] | None:
    """Who new files belong to: the workspace's owner, when the daemon (root) is not it."""
    if os.geteuid() != 0:
        return None
    st = os.fstat(root_fd)
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def layout_intact(root: str, dirs: Sequence[str], files: Sequence[str]) -> bool:
    """`root` and `dirs` in it are directories, and `files` in it exist (none a symlink)."""
    try:
        for d in (root, *(os.path.join(root, sub) for sub in dirs)):
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                return False
        return all(os.path.lexists(os.path.join(root, f)) for f in files)
    except OSError:
        return False


def subdirectories(root: str, name: str) -> list[str]:
    """The directories in `root`/`name`, sorted; none if it is missing or a symlink (no symlink
    is followed: `name` may be a tenant's link to a host directory)."""
    with open_root(root) as rfd:
        try:
            dfd = open_beneath(rfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (OSError, PathEscapeError):
            return []
        with _fd(dfd), os.scandir(dfd) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))


def is_dir(root: str, path: str) -> bool:
    """`path` is a directory beneath the workspace at `root`: a symlink is followed only while
    it stays inside, so a link to a host directory answers as a missing path does."""
    with open_root(root) as rfd:
        try:
            os.close(open_beneath(rfd, path, os.O_PATH | os.O_DIRECTORY))
        except (OSError, PathEscapeError):
            return False
    return True


def resolved(root_fd: int, fd: int) -> str:
    """Where the directory `fd` is, relative to the directory `root_fd` (symlinks resolved:
    the kernel's own path of each, from /proc/self/fd)."""
    top = os.readlink(f"/proc/self/fd/{root_fd}")
    here = os.readlink(f"/proc/self/fd/{fd}")
    if here == top:
        return "."
    prefix = top.rstrip("/") + "/"
    if not here.startswith(prefix):
        raise PathEscapeError(f"{here!r} is not inside the workspace {top!r}")
    return here[len(prefix) :]


def refuse_protected(
    root_fd: int, dir_fd: int, name: str, path: str, protect: Sequence[str], rest: str = ""
) -> None:
    """Raise PathEscapeError if `name` in the directory `dir_fd`, on the way to `path` (`rest`
    is what follows it there), is or lies under a protected path (`protect.rule_for`), once
    resolved. The error names `path` and, if it differs, where it resolves to."""
    if not protect:
        return
    real = os.path.normpath(os.path.join(resolved(root_fd, dir_fd), name, rest))
    if (rule := rule_for(real, protect)) is not None:
        shown = "" if real == clean_relative(path) else f" (it resolves to {real!r})"
        raise PathEscapeError(
            f"path {path!r}{shown} is protected by the policy's sandbox.protect "
            f"rule {rule!r}; it cannot be written through the daemon"
        )


def not_found(path: str, exc: OSError) -> WorkspaceError:
    if exc.errno == errno.ENOENT:
        return PathNotFoundError(f"{path}: no such file or directory")
    if exc.errno == errno.ENOTDIR:
        return PathNotFoundError(f"{path}: a component of the path is not a directory")
    if exc.errno == errno.EISDIR:
        return WorkspaceError(f"{path}: is a directory, expected a file")
    return WorkspaceError(f"{path}: {exc.strerror}")


@dataclass(frozen=True, slots=True)
class FileContent:
    content: str
    size_bytes: int
    truncated: bool
    binary: bool


def read_text(root: str, path: str, cap: int) -> FileContent:
    """Read at most `cap` bytes of a regular file, decoded as UTF-8 (binary files detected)."""
    with open_root(root) as rfd:
        try:
            fd = open_beneath(rfd, path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise not_found(path, exc) from None
        with _fd(fd):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise WorkspaceError(f"{path}: not a regular file")
            chunks, left = [], cap
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
                chunks.append(chunk)
                left -= len(chunk)
    data = b"".join(chunks)
    binary = b"\x00" in data[:8192]
    return FileContent(
        content="" if binary else data.decode("utf-8", errors="replace"),
        size_bytes=st.st_size,
        truncated=st.st_size > len(data),
        binary=binary,
    )


def make_dirs(
    root: str, path: str, *, protect: Sequence[str] = (), asked: str | None = None
) -> None:
    """`mkdir -p` beneath the workspace: every component is created and checked in place.

    Errors: PathEscapeError if a component is, or resolves to, a path under a `protect` glob
    (see `refuse_protected`), before anything is made there; it names `asked` (default
    `path`; `write_text` gives the file it makes these directories for).
    """
    rel = clean_relative(path)
    if rel == ".":
        return
    asked = path if asked is None else asked
    tail = clean_relative(asked).split("/")  #: `rel`'s components, then the rest of `asked`
    with open_root(root) as rfd:
        owner = _owner(rfd)
        done = ""
        for i, part in enumerate(rel.split("/")):
            done = f"{done}/{part}" if done else part
            rest = "/".join(tail[i + 1 :])
            try:
                with _fd(
                    open_beneath(rfd, os.path.dirname(done) or ".", os.O_RDONLY | os.O_DIRECTORY)
                ) as pfd:
                    refuse_protected(rfd, pfd, part, asked, protect, rest)
                    os.mkdir(part, 0o755, dir_fd=pfd)
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                pass
            except OSError as exc:
                raise not_found(done, exc) from None
            try:  # exists: it must be a directory beneath the root, not a symlink out of it
                dfd = open_beneath(rfd, done, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                raise not_found(done, exc) from None
            with _fd(dfd):  # ... nor a symlink to a protected directory
                refuse_protected(rfd, dfd, ".", asked, protect, rest)


def make_fresh_dir(
    root: str,
    path: str,
    *,
    subdirs: Sequence[str] = (),
    files: Mapping[str, tuple[str, int]] | None = None,
    parents: bool = True,
) -> None:
    """Create the directory `path` (its parents as `make_dirs` does, unless `parents` is false:
    then a missing parent is a PathNotFoundError) with `subdirs` and `files` (name: (content,
    mode)) inside, all the workspace owner's.

    Everything inside is created through one fd of the new directory, files with O_EXCL: a
    name that appeared meanwhile is an error, never followed. `path` must not exist.
    """
    rel = clean_relative(path)
    parent, name = os.path.split(rel)
    if parent and parents:
        make_dirs(root, parent)
    with open_root(root) as rfd:
        owner = _owner(rfd)
        try:
            pfd = open_beneath(rfd, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise not_found(parent, exc) from None
        with _fd(pfd):
            os.mkdir(name, 0o755, dir_fd=pfd)
            with _fd(open_beneath(pfd, name, os.O_RDONLY | os.O_DIRECTORY)) as dfd:
                if owner is not None:
                    os.fchown(dfd, *owner)
                for sub in subdirs:
                    os.mkdir(sub, 0o755, dir_fd=dfd)
                    if owner is not None:
                        os.chown(sub, *owner, dir_fd=dfd, follow_symlinks=False)
                _write_new_files(dfd, files or {}, owner)


def _write_new_files(
    dfd: int, files: Mapping[str, tuple[str, int]], owner: tuple[int, int] | None
) -> None:
    """Create `files` (name: (content, mode)) in the directory `dfd`, with O_EXCL."""
    for file, (content, mode) in files.items():
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with _fd(os.open(file, flags, mode, dir_fd=dfd)) as fd:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # not narrowed by the umask
            view = memoryview(content.encode("utf-8"))
            while view:
                view = view[os.write(fd, view) :]


# --- spare directories --------------------------------------------------------------------
# A task directory that is back as `make_fresh_dir` made it (its files aside) is parked in a
# spares directory instead of removed, and renamed into place for a later task: two renames
# instead of removing and creating four inodes. The spares directory is the daemon's, mode
# 0700: a command running as the workspace's own uid can neither enter nor fill it.

_RENAME_NOREPLACE: Final = 1
_OURS: Final = (os.geteuid(), os.getegid())  #: who owns what the daemon (or its helper) made
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28 and later


def _rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> bool:
    """rename(2) that fails with FileExistsError instead of replacing an empty directory;
    False if this C library or filesystem cannot rename that way (nothing was moved)."""
    if _renameat2 is None:
        return False
    if _renameat2(src_fd, src.encode(), dst_fd, dst.encode(), _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS):  # no RENAME_NOREPLACE here
            return False
        raise OSError(code, os.strerror(code), dst)
    return True


def _plain_dir(fd: int, owner: tuple[int, int] | None) -> bool:
    """`fd` is a directory of `owner` (else ours), writable by no one else, with no special
    mode bits and no ACL."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o7022 or st.st_mode & 0o700 != 0o700:
        return False
    if (st.st_uid, st.st_gid) != (owner or _OURS):
        return False
    try:
        names = os.listxattr(fd)
    except OSError:  # no extended attributes on this filesystem: no ACL either
        return True
    return not any(n.startswith("system.posix_acl_") for n in names)


def _as_made(dfd: int, subdirs: Sequence[str], owner: tuple[int, int] | None) -> bool:
    """The directory `dfd` holds `subdirs` and nothing else, and they are empty; each of them
    is a plain directory (`_plain_dir`), as `make_fresh_dir` made it before its files."""
    if not _plain_dir(dfd, owner):
        return False
    with os.scandir(dfd) as it:
        if sorted(e.name for e in it) != sorted(subdirs):
            return False
    for sub in subdirs:
        try:
            fd = os.open(
                sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
            )
        except OSError:  # a symlink, or gone
            return False
        with _fd(fd):
            if not _plain_dir(fd, owner):
                return False
            with os.scandir(fd) as it:
                if next(it, None) is not None:
                    return False
    return True


def _open_spares(pfd: int, name: str, *, create: bool) -> int | None:
    """The spares directory `name` in the directory `pfd`, open (made first if missing and
    `create`); None if there is none, or it is not the daemon's own (`_plain_dir`)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(name, flags, dir_fd=pfd)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, flags, dir_fd=pfd)
    except OSError:  # a symlink, a file, made by someone else meanwhile: not used
        return None
    if not _plain_dir(fd, None):
        os.close(fd)
        return None
    return fd


def park_dir(
    root: str, path: str, spares: str, *, subdirs: Sequence[str], files: Sequence[str], keep: int
) -> bool:
    """Remove `files` from the directory `path`, then move it into `spares` (a name beside it,
    made if missing) if it is as `make_fresh_dir` made it with `subdirs` and fewer than `keep`
    are parked there.

    Returns False if it stayed where it is (its `files` removed): remove it with `remove_dir`.
    """
    parent, name = os.path.split(clean_relative(path))
    with open_root(root) as rfd:
        owner = _owner(rfd)
        with _fd(open_beneath(rfd, parent or ".", os.O_RDONLY | os.O_DIRECTORY)) as pfd:
            try:
                dfd = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
                )
            except OSError:
                return False
            with _fd(dfd):
                for file in files:
                    try:
                        os.unlink(file, dir_fd=dfd)
                    except FileNotFoundError:
                        pass
                if not _as_made(dfd, subdirs, owner):
                    return False
            if (sfd := _open_spares(pfd, spares, create=True)) is None:
                return False
            with _fd(sfd):
                return len(os.listdir(sfd)) < keep and _rename_noreplace(pfd, name, sfd, name)


def take_spare(
    root: str,
    path: str,
    spares: str,
    *,
    subdirs: Sequence[str],
    files: Mapping[str, tuple[str, int]],
) -> bool:
    """Make the directory `path` from one parked in `spares` (a name beside it) that is still as
    made, and write `files` into it, as `make_fresh_dir` would; False if there is none. `path`
    must not exist."""
    parent, name = os.path.split(clean_relative(path))
    with open_root(root) as rfd:
        owner = _owner(rfd)
        with _fd(open_beneath(rfd, parent or ".", os.O_RDONLY | os.O_DIRECTORY)) as pfd:
            if (sfd := _open_spares(pfd, spares, create=False)) is None:
                return False
            with _fd(sfd):
                for spare in os.listdir(sfd):
                    try:
                        dfd = os.open(
                            spare,
                            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=sfd,
                        )
                    except OSError:
                        continue
                    with _fd(dfd):
                        if not _as_made(dfd, subdirs, owner):
                            continue  # left alone: it counts against `keep`, nothing walks it
                        if not _rename_noreplace(sfd, spare, pfd, name):
                            return False
                        _write_new_files(dfd, files, owner)
                        return True
    return False


def remove_dir(
    root: str,
    path: str,
    *,
    subdirs: Sequence[str] = (),
    files: Sequence[str] = (),
    walk: bool = True,
) -> None:
    """Remove the directory `path` and all it holds, never following a symlink; a missing one is
    no error, and a symlink or file in its place is removed itself.

    `subdirs` and `files` name what it usually holds (as `make_fresh_dir` made it): each is one
    call. Anything else in there (a command's leftovers, a replaced entry) falls back to a walk,
    or with `walk` false raises the OSError that showed it (what was removed stays removed).
    """
    rel = clean_relative(path)
    parent, name = os.path.split(rel)
    with open_root(root) as rfd:
        try:
            pfd = open_beneath(rfd, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return
        with _fd(pfd):
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=pfd)
                return
            try:
                with _fd(open_beneath(pfd, name, os.O_RDONLY | os.O_DIRECTORY)) as dfd:
                    for file in files:
                        try:
                            os.unlink(file, dir_fd=dfd)
                        except FileNotFoundError:
                            pass
                    for sub in subdirs:
                        os.rmdir(sub, dir_fd=dfd)
                os.rmdir(name, dir_fd=pfd)
            except OSError:  # not as it was made: walk what is left
                if not walk:
                    raise
                shutil.rmtree(name, dir_fd=pfd, ignore_errors=True)


def write_text(
    root: str, path: str, content: str, mode: int = 0o644, *, protect: Sequence[str] = ()
) -> int:
    """Write `content` atomically (temp file + rename), creating parents; returns bytes written.

    The file is created with `mode` and belongs to the workspace's owner.

    Errors: PathEscapeError if the file or a parent is, or resolves to, a path under a
    `protect` glob (see `refuse_protected`); nothing is written then.
    """
    rel = clean_relative(path)
    if rel == ".":
        raise WorkspaceError("path: expected a file name, got the workspace root")
    parent, name = os.path.split(rel)
    data = content.encode("utf-8")
    make_dirs(root, parent or ".", protect=protect, asked=path)
    with open_root(root) as rfd:
        try:
            dfd = open_beneath(rfd, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise not_found(parent, exc) from None
        with _fd(dfd):
            refuse_protected(rfd, dfd, name, path, protect)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise WorkspaceError(f"{path}: exists and is not a regular file")
            except FileNotFoundError:
                pass
            tmp = f".{name}.wsrunner-{os.getpid()}-{id(data):x}.tmp"
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=dfd,
            )
            try:
                with _fd(fd):
                    if (owner := _owner(rfd)) is not None:
                        os.fchown(fd, *owner)
                    os.fchmod(fd, mode)  # not narrowed by the umask
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
                raise
    return len(data)


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    type: str  #: "file", "dir", "symlink" or "other"
    size: int | None
    modified_at: float


def list_dir(root: str, path: str, cap: int) -> tuple[list[Entry], bool]:
    """Entries of a directory, directories first then by name; (entries, truncated)."""
    with open_root(root) as rfd:
        try:
            dfd = open_beneath(rfd, path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise not_found(path, exc) from None
        with _fd(dfd):
            names: list[str] = []
            truncated = False
            with os.scandir(dfd) as it:
                for de in it:
                    if len(names) >= cap:
                        truncated = True
                        break
                    names.append(de.name)
            entries = []
            for name in names:
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we listed
                kind = (
                    "dir"
                    if stat.S_ISDIR(st.st_mode)
                    else "file"
                    if stat.S_ISREG(st.st_mode)
                    else "symlink"
                    if stat.S_ISLNK(st.st_mode)
                    else "other"
                )
                entries.append(
                    Entry(name, kind, st.st_size if kind == "file" else None, st.st_mtime)
                )
    entries.sort(key=lambda e: (e.type != "dir", e.name.lower()))
    return entries, truncated


def real_dir(root: str, path: str) -> str:
    """The absolute path of a directory inside the workspace (for a child's cwd), verified."""
    with open_root(root) as rfd:
        try:
            os.close(open_beneath(rfd, path, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as exc:
            raise not_found(path, exc) from None
    return os.path.normpath(os.path.join(root, clean_relative(path)))
