"""Per-workspace directories: layout, metadata, storage quota, and per-task credentials.

    <volume>/<workspace_id>/
        repos/                   cloned repositories (persistent)
        artifacts/               task outputs worth keeping (persistent)
        tasks/<task_id>/         the task's private HOME, TMPDIR and credentials; removed after it
        tasks/.spare/<name>/     task directories left as made, without their files, for later
                                 tasks (the helper's: `paths.park_dir`, `paths.take_spare`)
        .workspace_meta.json     created, last used, task count, repos cached

The metadata's task counts are written behind: a task's end is tallied in memory and written by
`serve_metadata` within META_FLUSH_S, and on shutdown. A daemon killed outright loses at most
that long of counting, never a task.

Every filesystem walk and write here runs in a worker thread, never on the trio thread; task
directories are made and removed by the helper process (`fshelper`) when it can. A
workspace's commands can change anything inside it, so every path the daemon touches in there is
opened through `paths` (contained, no symlink followed out) and what it creates belongs to the
workspace's own uid when it has one (`sandbox.identity`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import trio

from wsrunner.errors import PathNotFoundError, QuotaExceededError, WorkspaceError
from wsrunner.execution.sandbox.identity import UidRange, assign
from wsrunner.models import Credentials
from wsrunner.payload import validate_workspace_id
from wsrunner.workspace import paths
from wsrunner.workspace.fshelper import Helper
from wsrunner.workspace.usage import Usage, disk_usage

logger = logging.getLogger(__name__)

META_FILE: Final = ".workspace_meta.json"
META_LOCK: Final = ".wsrunner_meta.lock"
KNOWN_HOSTS: Final = ".wsrunner_known_hosts"
#: Top-level names the internal file API refuses: per-task credentials and wsrunner's own files.
RESERVED: Final = frozenset({"tasks", META_FILE, META_LOCK, KNOWN_HOSTS})
LAYOUT: Final = ("repos", "artifacts", "tasks")
USAGE_CACHE_S: Final = 5.0  # a burst of tasks in one workspace walks it once
DEFAULT_INODE_QUOTA: Final = 1_000_000  #: files, directories and links of one workspace
META_FLUSH_S: Final = 1.0  # task counts reach the metadata file within this long
_ROOTS_KEPT: Final = 4096  # workspace directories remembered (`Workspaces.root`)
TASK_SUBDIRS: Final = ("home", "tmp")
TASK_FILES: Final = ("gitconfig", "ssh_key")
#: in tasks/: task directories as made, kept for later tasks (the helper's: `paths.park_dir`)
SPARES: Final = ".spare"
SPARES_KEPT: Final = 8
SAFE_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_GIT_PROTOCOLS: Final = {
    "https": "https",
    "http": "http",
    "ssh": "ssh",
    "git": "git",
    "file": "file",
}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(slots=True)
class _Tally:
    """Task ends in one workspace not yet written to its metadata."""

    runs: int
    last_at: str
    repos: list[str]

    def applied(self, meta: dict[str, Any]) -> dict[str, Any]:
        """`meta` with these runs counted, the last at `last_at`, and the repositories found."""
        meta["total_tasks_run"] = int(meta.get("total_tasks_run", 0)) + self.runs
        meta["last_task_at"] = self.last_at
        meta["repos_cached"] = self.repos
        return meta


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _layout_intact(root: str) -> bool:
    """The workspace, its LAYOUT directories and its metadata are there (none a symlink)."""
    return paths.layout_intact(root, LAYOUT, (META_FILE,))


@dataclass(frozen=True, slots=True)
class TaskEnvironment:
    """Where a task's commands run and with which environment."""

    root: str  #: the workspace directory
    task_dir: str  #: tasks/<task_id>, removed when the task ends
    env: Mapping[str, str]
    #: the payload's ssh key: only the daemon's git mirror gets it (`gitremote`), never a file
    #: or a variable of the workspace's
    ssh_key: str | None = field(default=None, repr=False)


class Workspaces:
    """The workspaces under one volume."""

    def __init__(
        self,
        volume: Path,
        *,
        default_quota: int,
        quotas: Mapping[str, int],
        git_schemes: tuple[str, ...],
        uids: UidRange | None = None,
        default_inode_quota: int = DEFAULT_INODE_QUOTA,
        inode_quotas: Mapping[str, int] | None = None,
    ) -> None:
        self.volume = volume
        self.uids = uids  #: per-workspace uids (the daemon is root and can isolate), or None
        self.default_quota = default_quota
        self.quotas = dict(quotas)
        self.default_inode_quota = default_inode_quota
        self.inode_quotas = dict(inode_quotas or {})
        self._git_protocols = ":".join(
            _GIT_PROTOCOLS[s] for s in git_schemes if s in _GIT_PROTOCOLS
        )
        self._limiter = trio.CapacityLimiter(4)
        self._usage: dict[str, tuple[float, Usage]] = {}
        self._roots: dict[str, str] = {}  #: workspace id: `root()`, for the last few thousand
        self._prepared: set[str] = set()  #: roots prepared by this process
        self._tallies: dict[str, _Tally] = {}  #: root: task ends not yet in its metadata
        self._tallied = trio.Event()  #: set when `_tallies` gets its first entry
        self.helper = Helper()  #: task directories, off the GIL while `helper.serve` runs
        #: called with "helper" or "thread" for every task directory made or removed
        self.on_dir_operation: Callable[[str], None] = lambda by: None

    def root(self, workspace_id: str) -> str:
        """The workspace's directory; raises ValidationError for an invalid id."""
        if (root := self._roots.get(workspace_id)) is None:
            root = str(self.volume / validate_workspace_id(workspace_id))
            if len(self._roots) >= _ROOTS_KEPT:
                self._roots.clear()
            self._roots[workspace_id] = root
        return root

    def quota(self, workspace_id: str) -> int:
        """The workspace's storage quota, in bytes."""
        return self.quotas.get(workspace_id, self.default_quota)

    def inode_quota(self, workspace_id: str) -> int:
        """The most inodes (files, directories, links...) the workspace may hold."""
        return self.inode_quotas.get(workspace_id, self.default_inode_quota)

    def full(self, workspace_id: str, used: Usage) -> str | None:
        """What the workspace is at or over, as a sentence naming the limit; None if neither."""
        quota, inodes = self.quota(workspace_id), self.inode_quota(workspace_id)
        if used.bytes >= quota:
            return (
                f"workspace {workspace_id} uses {_human(used.bytes)} of its {_human(quota)} "
                f"storage quota ({used.bytes} of {quota} bytes)"
            )
        if used.inodes >= inodes:
            return (
                f"workspace {workspace_id} holds {used.inodes} files and directories, at its "
                f"inode quota of {inodes}"
            )
        return None

    def exceeded(self, workspace_id: str, used: Usage) -> str | None:
        """What the workspace is over (past, not at), as a sentence naming the limit, else None:
        the storage quota (`storage` is in that sentence) or the inode quota."""
        quota, inodes = self.quota(workspace_id), self.inode_quota(workspace_id)
        if used.bytes > quota:
            return (
                f"the workspace grew to {used.bytes} bytes, over its storage quota of {quota} bytes"
            )
        if used.inodes > inodes:
            return (
                f"the workspace grew to {used.inodes} files and directories, over its "
                f"inode quota of {inodes}"
            )
        return None

    def refuse_write(self, workspace_id: str, used: Usage, size: int) -> str | None:
        """Why writing one file of `size` bytes would pass a quota, or None if it fits."""
        quota, inodes = self.quota(workspace_id), self.inode_quota(workspace_id)
        if used.bytes + size > quota:
            return (
                f"writing {size} bytes would exceed the storage quota of workspace "
                f"{workspace_id} ({used.bytes} of {quota} bytes used)"
            )
        if used.inodes >= inodes:
            return (
                f"writing a file would exceed the inode quota of workspace {workspace_id} "
                f"({used.inodes} of {inodes} files and directories)"
            )
        return None

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def prepare(self, workspace_id: str) -> str:
        """Create the workspace layout and metadata if missing; returns its directory."""
        root = self.root(workspace_id)
        await self._thread(self._prepare, root)
        return root

    def _prepare(self, root: str) -> None:
        if root in self._prepared and _layout_intact(root):
            return  # prepared by this process and still whole: no mkdir for every task
        if not self.volume.is_dir():
            self.volume.mkdir(parents=True, exist_ok=True)
            self.volume.chmod(0o711)  # other uids may pass through, not list
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
        if self.uids is not None:
            assign(str(self.volume), root, self.uids)
        for sub in LAYOUT:
            paths.make_dirs(root, sub)
        if not os.path.lexists(os.path.join(root, META_FILE)):
            self._update_meta(root, lambda m: m)
        self._prepared.add(root)

    async def usage(self, workspace_id: str, *, fresh: bool = False) -> Usage:
        """What the workspace occupies on disk (cached for USAGE_CACHE_S unless `fresh`)."""
        cached = self._usage.get(workspace_id)
        if cached is not None and not fresh and time.monotonic() - cached[0] < USAGE_CACHE_S:
            return cached[1]
        used: Usage = await self._thread(disk_usage, self.root(workspace_id))
        self._usage[workspace_id] = (time.monotonic(), used)
        return used

    async def check_quota(self, workspace_id: str) -> Usage:
        """Raise QuotaExceededError if the workspace is at or over its storage or inode quota
        (the message names which); returns its usage."""
        used = await self.usage(workspace_id)
        if (full := self.full(workspace_id, used)) is not None:
            raise QuotaExceededError(
                f"{full}; delete files (or raise its quota) before running more tasks"
            )
        return used

    async def open_task(
        self,
        workspace_id: str,
        task_id: str,
        credentials: Credentials | None,
        *,
        clear_leftovers: bool = True,
    ) -> TaskEnvironment:
        """Create tasks/<task_id> with a private HOME and TMPDIR, and the task's credentials.

        Prepares the workspace first (in the same worker thread), as `prepare()` does. A task
        directory already there (an earlier attempt's) is replaced, or with `clear_leftovers`
        false raises FileExistsError.
        """
        root = self.root(workspace_id)
        task_dir = os.path.join(root, "tasks", task_id)

        rel = f"tasks/{task_id}"

        files: dict[str, tuple[str, int]] = {}
        env = {
            "PATH": SAFE_PATH,
            "HOME": os.path.join(task_dir, "home"),
            "TMPDIR": os.path.join(task_dir, "tmp"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "WORKSPACE_ID": workspace_id,
            "TASK_ID": task_id,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "GIT_CONFIG_GLOBAL": os.path.join(task_dir, "gitconfig"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_EDITOR": ":",  # nothing waits for an editor or a pager
            "GIT_PAGER": "cat",
            "PAGER": "cat",
            "GIT_ALLOW_PROTOCOL": self._git_protocols,
        }
        # No `safe.directory = *`: git runs as the repository's owner, inside the sandbox.
        name, email = "wsrunner", "wsrunner@localhost"  # git refuses to commit without
        if credentials is not None:
            # Values were checked for control characters; quote for gitconfig syntax.
            name = credentials.git_name or name
            email = credentials.git_email or email
        quoted = [v.replace("\\", "\\\\").replace('"', '\\"') for v in (name, email)]
        gitconfig = f'[user]\n\tname = "{quoted[0]}"\n\temail = "{quoted[1]}"\n'
        if credentials is not None:
            env.update(credentials.env_vars)
        files["gitconfig"] = (gitconfig, 0o644)

        def make() -> None:
            self._prepare(root)
            # One directory fd for all of it: a task directory is made for every task.
            try:  # tasks/ was just seen by _prepare
                paths.make_fresh_dir(root, rel, subdirs=TASK_SUBDIRS, files=files, parents=False)
            except PathNotFoundError:  # ... and removed since, by a command
                paths.make_fresh_dir(root, rel, subdirs=TASK_SUBDIRS, files=files)
            except FileExistsError:  # a previous attempt's leftovers
                if not clear_leftovers:
                    raise
                paths.remove_dir(root, rel)
                paths.make_fresh_dir(root, rel, subdirs=TASK_SUBDIRS, files=files)

        # The usual case in the helper process; the rest (a first task, an error) here.
        if root in self._prepared and await self.helper.call(
            "make", root, rel, TASK_SUBDIRS, files, (LAYOUT, (META_FILE,)), SPARES
        ):
            self.on_dir_operation("helper")
        else:
            await self._thread(make)
            self.on_dir_operation("thread")
        key = credentials.ssh_private_key if credentials is not None else None
        return TaskEnvironment(root=root, task_dir=task_dir, env=env, ssh_key=key or None)

    async def close_task(self, workspace_id: str, task_id: str, *, count: bool) -> list[str]:
        """Remove the task's directory (and its credentials); returns the cached repositories.

        `count`: a task (not an ad-hoc session of the internal API) is counted in the metadata,
        with the repositories found (written behind, see `serve_metadata`).
        """
        root, rel = self.root(workspace_id), f"tasks/{task_id}"

        def close() -> list[str]:
            paths.remove_dir(root, rel, subdirs=TASK_SUBDIRS, files=TASK_FILES)
            return paths.subdirectories(root, "repos") if count else []

        with trio.CancelScope(shield=True):
            listing = "repos" if count else None
            repos: list[str] = await self.helper.call(
                "remove", root, rel, TASK_SUBDIRS, TASK_FILES, listing, SPARES, SPARES_KEPT
            )
            by = "helper"
            if repos is None:  # not as it was made (or no helper): walked here
                repos, by = await self._thread(close), "thread"
            self.on_dir_operation(by)
        if count:
            at = datetime.now(UTC).isoformat()
            if (tally := self._tallies.get(root)) is None:
                self._tallies[root] = _Tally(1, at, repos)
                self._tallied.set()
            else:
                tally.runs, tally.last_at, tally.repos = tally.runs + 1, at, repos
        return repos

    async def serve_metadata(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Write tallied task ends into the metadata, META_FLUSH_S after the first; on
        cancellation (the daemon stopping, after its last task), whatever is left."""
        task_status.started()
        try:
            while True:
                await self._tallied.wait()
                await trio.sleep(META_FLUSH_S)
                await self.flush_metadata()
        finally:
            with trio.CancelScope(shield=True):
                await self.flush_metadata()

    async def flush_metadata(self) -> None:
        """Write every tallied task end into its workspace's metadata now."""
        tallies, self._tallies, self._tallied = self._tallies, {}, trio.Event()
        for root, tally in tallies.items():
            try:
                await self._thread(self._update_meta, root, tally.applied)
            except (OSError, WorkspaceError) as exc:  # the workspace was removed meanwhile
                logger.warning(
                    "workspace metadata not updated: %s",
                    exc,
                    extra={"workspace_id": os.path.basename(root)},
                )

    async def exists(self, workspace_id: str) -> bool:
        """The workspace's directory exists (a symlink in its place is not one)."""
        root = self.root(workspace_id)
        return bool(await self._thread(_is_real_dir, root))

    def _update_meta(self, root: str, change: Any) -> None:
        """Read-modify-write the metadata under an exclusive lock, replacing it atomically.

        The workspace's commands may have replaced either file with a symlink or a FIFO: both
        are opened beneath the workspace, without following a symlink and without blocking.
        """
        with paths.open_root(root) as rfd:
            lock_fd = paths.open_beneath(
                rfd, META_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600
            )
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                meta = json.loads(paths.read_text(root, META_FILE, 1024 * 1024).content)
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError, RecursionError, WorkspaceError):
                # The workspace's commands can replace the file, with anything (deep nesting).
                meta = {
                    "workspace_id": os.path.basename(root),
                    "created_at": datetime.now(UTC).isoformat(),
                    "total_tasks_run": 0,
                    "repos_cached": [],
                }
            meta = change(meta)
            meta["updated_at"] = datetime.now(UTC).isoformat()
            meta["storage_quota_bytes"] = self.quota(os.path.basename(root))
            paths.write_text(root, META_FILE, json.dumps(meta, indent=2))
        finally:
            os.close(lock_fd)
