"""Direct workspace operations for orchestrators: list, read, write, grep, exec and git.

The internal API calls these through the service facade. They share the task steps' guarantees:
paths are opened beneath the workspace (`paths`), commands run in a fresh session directory with
the clean task environment and are killed with their whole group on timeout, output is capped,
and writes respect the storage quota. Commands take a slot of their own limiter, as large as the
daemon's task concurrency, so a burst of calls cannot fork without bound.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import shlex
import shutil
import stat
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from wsrunner.errors import (
    NotFoundError,
    PathEscapeError,
    PolicyDeniedError,
    QuotaExceededError,
    TooLargeError,
    UnavailableError,
    ValidationError,
)
from wsrunner.execution.git.remote import GIT_SAFE_CONFIG
from wsrunner.execution.process import Capture, run_process
from wsrunner.execution.steps import Executor, StepContext
from wsrunner.models import JSON, GitClone, GitOperation
from wsrunner.payload import validate_branch, validate_workspace_id
from wsrunner.settings import Settings
from wsrunner.workspace import paths, search
from wsrunner.workspace.directories import RESERVED, Workspaces

GIT_TIMEOUT_S: Final = 120.0
CLONE_TIMEOUT_S: Final = 300.0
SLOT_WAIT_S: Final = 10.0
GIT_OPERATIONS: Final = frozenset(typing.get_args(GitOperation))
#: Options that run programs, read or write outside the repository, or rewrite config.
_GIT_DENIED_LONG: Final = (
    "--config",
    "--config-env",
    "--upload-pack",
    "--receive-pack",
    "--exec",
    "--git-dir",
    "--work-tree",
    "--namespace",
    "--output",
    "--no-index",
    "--ext-diff",
    "--template",
    "--separate-git-dir",
    "--reference",
    "--open-files-in-pager",
    "--local",
    "--shared",
    "--ssh",
    "--super-prefix",
)
_GIT_DENIED_SHORT: Final = ("-c", "-O")
_GIT_DENIED_SHORT_REMOTE: Final = ("-u",)  #: --upload-pack for clone, fetch and pull
_GIT_REMOTE: Final = frozenset({"fetch", "pull", "push"})  #: operations that reach the remote
#: operations that only read: they run with GIT_OPTIONAL_LOCKS=0 and never wait for the workspace
GIT_READS: Final = frozenset({"status", "diff", "log", "show", "blame"})
_GIT_ARGS_CHARS: Final = 16384  #: of `args` given as one string (split in a few milliseconds)
_LANGUAGES: Final = {
    ".py": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".jsx": "javascript",
    ".json": "json",
    ".md": "markdown",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
    ".sh": "shell",
    ".bash": "shell",
    ".rs": "rust",
    ".go": "go",
    ".java": "java",
    ".c": "c",
    ".h": "c",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".rb": "ruby",
    ".php": "php",
    ".html": "html",
    ".css": "css",
    ".sql": "sql",
    ".xml": "xml",
    ".env": "dotenv",
    ".txt": "plaintext",
}


def _check_path(path: object, field: str = "path") -> str:
    """A workspace-relative path that does not name wsrunner's reserved top-level entries."""
    if not isinstance(path, str):
        raise ValidationError(field, f"expected a string, got {type(path).__name__}")
    if len(path) > 4096:
        raise ValidationError(field, "expected at most 4096 characters")
    rel = paths.clean_relative(path)
    if rel.split("/", 1)[0] in RESERVED:
        raise PathEscapeError(f"path {path!r} is reserved for wsrunner's own files")
    return rel


class WorkspaceOps:
    """The operations of the internal API, for one daemon."""

    def __init__(self, settings: Settings, workspaces: Workspaces, executor: Executor) -> None:
        self.settings = settings
        self.workspaces = workspaces
        self.executor = executor
        self.rg = shutil.which("rg")  #: ripgrep, when installed; a Python search otherwise
        mimetypes.init()  # reads the system's type map once, at start-up, not in a request
        self._commands = trio.CapacityLimiter(settings.concurrency)

    async def _root(self, workspace_id: str, *, create: bool = False) -> str:
        validate_workspace_id(workspace_id)
        if create:
            return await self.workspaces.prepare(workspace_id)
        if not await self.workspaces.exists(workspace_id):
            raise NotFoundError(f"workspace {workspace_id} does not exist")
        # An existing directory is adopted: its layout and its own uid, as a task would.
        return await self.workspaces.prepare(workspace_id)

    async def _fs(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a thread; an OSError the helper did not explain becomes a refusal."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            raise paths.not_found(str(args[1]) if len(args) > 1 else "path", exc) from None

    # --- files ----------------------------------------------------------------------------

    async def list_files(self, workspace_id: str, path: str = ".") -> JSON:
        rel = _check_path(path)
        root = await self._root(workspace_id)
        entries, truncated = await self._fs(
            paths.list_dir, root, rel, self.settings.list_cap_entries
        )
        shown = [e for e in entries if not (rel == "." and e.name in RESERVED)]
        return {
            "path": rel,
            "entries": [
                {
                    "name": e.name,
                    "path": e.name if rel == "." else f"{rel}/{e.name}",
                    "type": e.type,
                    "size": e.size or 0,
                    "modified_at": e.modified_at,
                }
                for e in shown
            ],
            "truncated": truncated,
        }

    async def read_file(self, workspace_id: str, path: str) -> JSON:
        """The file's text (UTF-8), or base64 when it is binary; TooLargeError above the cap."""
        rel = _check_path(path)
        root = await self._root(workspace_id)
        cap = self.settings.file_read_cap_bytes
        data, size = await self._fs(_read_bytes, root, rel, cap)
        binary = b"\x00" in data[:8192]
        if not binary:
            try:
                text, encoding = data.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                binary = True
        if binary:
            text, encoding = base64.b64encode(data).decode("ascii"), "base64"
        ext = os.path.splitext(rel)[1].lower()
        return {
            "path": rel,
            "name": os.path.basename(rel),
            "content": text,
            "encoding": encoding,
            "binary": binary,
            "size": size,
            "language": _LANGUAGES.get(ext, "plaintext"),
            "mime_type": mimetypes.guess_type(rel)[0]
            or ("application/octet-stream" if binary else "text/plain"),
        }

    async def write_file(self, workspace_id: str, path: str, content: object) -> JSON:
        """Write a text file (the tools' file write too).

        Errors: QuotaExceededError (storage or inode quota); PathEscapeError for a path that
        is, or resolves beneath the workspace to, a path under the policy's `sandbox.protect`.
        """
        rel = _check_path(path)
        if rel == ".":
            raise ValidationError("path", "expected a file name, got the workspace root")
        if not isinstance(content, str):
            raise ValidationError("content", f"expected a string, got {type(content).__name__}")
        root = await self._root(workspace_id, create=True)
        size = len(content.encode("utf-8"))
        used = await self.workspaces.usage(workspace_id, fresh=True)
        if (refusal := self.workspaces.refuse_write(workspace_id, used, size)) is not None:
            raise QuotaExceededError(refusal)
        globs = self.executor.policy.for_workspace(workspace_id).sandbox.protect
        written = await self._fs(
            lambda root, rel: paths.write_text(root, rel, content, protect=globs), root, rel
        )
        return {"written": True, "path": rel, "size_bytes": written}

    # --- commands -------------------------------------------------------------------------

    @asynccontextmanager
    async def _session(self, workspace_id: str) -> AsyncIterator[StepContext]:
        """A command slot and a throw-away HOME/TMPDIR, as a task step would have."""
        await self._root(workspace_id, create=True)
        await self.workspaces.check_quota(workspace_id)
        with trio.move_on_after(SLOT_WAIT_S) as waited:
            await self._commands.acquire()
        if waited.cancelled_caught:
            raise UnavailableError(
                f"all {self._commands.total_tokens} command slots stayed busy for "
                f"{SLOT_WAIT_S:g}s; retry later"
            )
        session = f"api-{uuid.uuid4().hex}"
        try:
            env = await self.workspaces.open_task(workspace_id, session, None)
            try:
                yield self.executor.context(env, workspace_id)
            finally:
                await self.workspaces.close_task(workspace_id, session, count=False)
        finally:
            self._commands.release()

    def _timeout(self, timeout: object, default: float) -> float:
        if timeout is None:
            return default
        hi = self.settings.exec_timeout_max_s
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 1 <= timeout <= hi
        ):
            raise ValidationError(
                "timeout", f"expected a number of seconds from 1 to {hi}, got {timeout!r}"
            )
        return float(timeout)

    def check_exec(self, command: object, cwd: object, timeout: object) -> tuple[str, str, float]:
        """Validate an exec request: (command, workspace-relative cwd, timeout in seconds)."""
        if not isinstance(command, str) or not command.strip():
            raise ValidationError("command", "expected a non-empty string")
        if len(command) > 65536:
            raise ValidationError("command", "expected at most 65536 characters")
        rel = _check_path("." if cwd is None else cwd, "cwd")
        return command, rel, self._timeout(timeout, 120.0)

    async def check_policy(self, workspace_id: str, command: str) -> None:
        """Raise if `command` cannot run here: PolicyDeniedError (naming the rule), or
        IsolationUnavailableError (the host is below the policy's required isolation).
        The command is read off the event loop (`Executor.judge`)."""
        policy = self.executor.policy.for_workspace(validate_workspace_id(workspace_id))
        if (denied := await self.executor.judge(policy, command)) is not None:
            raise PolicyDeniedError(denied["policy_denied"])
        if (refused := self.executor.sandbox.isolation.refusal(policy.sandbox.require)) is not None:
            raise refused

    async def exec(
        self,
        workspace_id: str,
        command: object,
        cwd: object = ".",
        timeout: object = None,
        *,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> JSON:
        """Run `command` with `/bin/sh -c` in the workspace; `on_output` sees output live."""
        text, rel, seconds = self.check_exec(command, cwd, timeout)
        await self.check_policy(workspace_id, text)
        async with self._session(workspace_id) as ctx:
            ctx.on_output = on_output
            workdir = await self._fs(paths.real_dir, ctx.env.root, rel)
            result = await self.executor.spawn(
                ["/bin/sh", "-c", text], ctx, cwd=workdir, timeout=seconds, warm=True
            )
        result["cwd"] = rel
        return result

    async def git(
        self,
        workspace_id: str,
        operation: object,
        cwd: object = ".",
        args: object = None,
        branch: object = None,
    ) -> JSON:
        """One git operation from a fixed set, with its arguments checked (see `git_argv`)."""
        if not isinstance(operation, str) or operation not in GIT_OPERATIONS:
            raise ValidationError(
                "operation",
                f"expected one of {', '.join(sorted(GIT_OPERATIONS))}, got {operation!r}",
            )
        argv = git_arguments(operation, args)
        rel = _check_path("." if cwd is None else cwd, "cwd")
        async with self._session(workspace_id) as ctx:
            if operation == "clone":
                if len(argv) != 1 or argv[0].startswith("-"):
                    raise ValidationError("args", "clone expects exactly one repository URL")
                ref = None if branch is None else validate_branch(branch)
                result = await self.executor.run_step(
                    GitClone(repo=argv[0], branch=ref, shallow=True),
                    ctx,
                    budget_s=CLONE_TIMEOUT_S,
                )
            elif operation in _GIT_REMOTE:  # the remote is reached through the daemon's mirror
                workdir = await self._fs(paths.real_dir, ctx.env.root, rel)
                result = await self.executor.git.operation(
                    ctx, operation, argv, cwd=workdir, timeout=GIT_TIMEOUT_S
                )
            else:
                workdir = await self._fs(paths.real_dir, ctx.env.root, rel)
                result = await self.executor.spawn(
                    ["git", *GIT_SAFE_CONFIG, operation, *argv],
                    ctx,
                    cwd=workdir,
                    timeout=GIT_TIMEOUT_S,
                    extra_env={"GIT_OPTIONAL_LOCKS": "0"} if operation in GIT_READS else None,
                    git=True,
                    network=False,
                )
        result["operation"] = operation
        return result

    # --- search ---------------------------------------------------------------------------

    async def grep(
        self,
        workspace_id: str,
        pattern: object,
        path: object = ".",
        include: object = None,
        max_results: object = 50,
    ) -> JSON:
        """Regex search under `path` (see `wsrunner.workspace.search`): matches sorted by file and line.

        At most `max_results` are returned; `total` counts what was found (up to SCAN_CAP).
        wsrunner's reserved entries are never among the matches.
        """
        query = await search.prepare(pattern, include, max_results)  # compiled off the loop
        rel = _check_path(path)
        root = await self._root(workspace_id)
        await self._fs(paths.real_dir, root, rel)  # contained, and a directory
        policy = self.executor.policy.for_workspace(workspace_id)
        sandbox = self.executor.sandbox
        sandboxed = sandbox.isolation.level == "full"

        async def spawn(argv: list[str], capture: Capture) -> int:
            async with sandbox.launch(
                argv,
                root=root,
                cwd=root,
                policy=policy.sandbox,
                limits=policy.limits,
                network="none",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            ) as launch:
                return await run_process(
                    launch.argv,
                    capture=capture,
                    env=launch.env,
                    kill_grace=self.settings.kill_grace_s,
                    pass_fds=launch.pass_fds,
                )

        async with self._commands:
            found, complete = await search.run(
                root, rel, query, rg=self.rg, spawn=spawn if sandboxed else None
            )
        found = [m for m in found if m["file"].split("/", 1)[0] not in RESERVED]
        found.sort(key=lambda m: (m["file"], m["line"]))
        return {
            "pattern": query.pattern,
            "path": rel,
            "matches": found[: query.max_results],
            "total": len(found),
            "truncated": len(found) > query.max_results
            or len(found) >= search.SCAN_CAP
            or not complete,
            "engine": "ripgrep" if self.rg is not None and sandboxed else "python",
        }


def git_arguments(operation: str, args: object) -> list[str]:
    """The argument list of a git operation, refusing options that run code or escape.

    `args` is a string (split like a shell would, without expansion) or a list of strings.
    """
    if args is None or args == "":
        return []
    if isinstance(args, str):
        if len(args) > _GIT_ARGS_CHARS:  # shlex.split is quadratic in a quoted word, on the loop
            raise ValidationError(
                "args",
                f"expected at most {_GIT_ARGS_CHARS} characters; pass a list of strings for more",
            )
        try:
            argv = shlex.split(args)
        except ValueError as exc:
            raise ValidationError("args", f"cannot split into arguments: {exc}") from None
    elif isinstance(args, list) and all(isinstance(a, str) for a in args):
        argv = list(args)
    else:
        raise ValidationError("args", "expected a string or a list of strings")
    if len(argv) > 64:
        raise ValidationError("args", "expected at most 64 arguments")
    denied_short = _GIT_DENIED_SHORT + (
        _GIT_DENIED_SHORT_REMOTE if operation in ("clone", "fetch", "pull") else ()
    )
    for i, arg in enumerate(argv):
        if "\x00" in arg or len(arg) > 4096:
            raise ValidationError(f"args[{i}]", "expected at most 4096 characters and no NUL")
        if arg == "--":
            break
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            if any(name == d or (len(name) > 4 and d.startswith(name)) for d in _GIT_DENIED_LONG):
                raise ValidationError(
                    f"args[{i}]",
                    f"git option {name} is not allowed: it can "
                    "run programs or reach outside the workspace",
                )
        elif arg.startswith("-") and any(arg.startswith(d) for d in denied_short):
            raise ValidationError(
                f"args[{i}]",
                f"git option {arg[:2]} is not allowed for {operation}: it can run programs",
            )
    return argv


def _read_bytes(root: str, rel: str, cap: int) -> tuple[bytes, int]:
    with paths.open_root(root) as rfd:
        try:
            fd = paths.open_beneath(rfd, rel, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise paths.not_found(rel, exc) from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValidationError("path", f"{rel} is not a regular file")
            if st.st_size > cap:
                raise TooLargeError(
                    f"{rel} is {st.st_size} bytes; the largest file this API returns is {cap} bytes"
                )
            data = f.read(cap + 1)
    if len(data) > cap:  # grew since the stat
        raise TooLargeError(f"{rel} is over {cap} bytes, the largest file this API returns")
    return data, len(data)
