"""A workspace's git operations that reach a remote: clone, pull, fetch and push, in two halves.

The network half runs on the daemon's mirror of the remote (`wsrunner.execution.git.remote`); the half
that reads the workspace's repository, and so the tenant's git configuration (checkout, merge,
resolving names), runs in the workspace's sandbox with no network and may reach nothing but
the mirror, read-only, through the `file` protocol:

    clone  mirror fetch (network) -> git clone <mirror>; remote set-url origin <url>
    pull   mirror fetch (network) -> git fetch <mirror> into refs/remotes/origin/*; merge
    fetch  mirror fetch (network) -> the same `git fetch` / `git pull`, with the remote's URL
           rewritten to the mirror (`url.<mirror>.insteadOf`)
    push   resolve the refs here -> the mirror fetches those objects from the repository
           (no network) -> the mirror pushes them (network) -> remote-tracking refs here
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

import trio

from wsrunner.errors import ValidationError, WorkspaceError
from wsrunner.execution.git.remote import GIT_SAFE_CONFIG, GitRemote, Remote, combine
from wsrunner.models import JSON
from wsrunner.payload import validate_branch
from wsrunner.workspace import paths

if TYPE_CHECKING:
    from wsrunner.execution.steps import StepContext

Spawn = Callable[..., Awaitable[JSON]]  #: `Executor.spawn`
#: The workspace side reaches local paths only: a rewritten URL can lead nowhere else.
LOCAL_ONLY: Final = {"GIT_ALLOW_PROTOCOL": "file"}
_LOOKUP_TIMEOUT_S: Final = 30.0
_REMOTE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_REF: Final = re.compile(r"refs/(?:[A-Za-z0-9_+-][A-Za-z0-9._+-]*/)*[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_OBJECT_ID: Final = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
#: Options of fetch and pull that take their value as the next argument.
_VALUED: Final = frozenset(
    {
        "--depth",
        "--deepen",
        "--shallow-since",
        "--shallow-exclude",
        "-j",
        "--jobs",
        "--refmap",
        "-o",
        "--server-option",
        "--negotiation-tip",
        "--recurse-submodules-default",
        "-s",
        "--strategy",
        "-X",
        "--strategy-option",
        "--cleanup",
        "--filter",
    }
)
_DEEPEN: Final = frozenset(
    {"--depth", "--deepen", "--shallow-since", "--shallow-exclude", "--unshallow"}
)
#: Options of push that the mirror's push is given as they are.
_PUSH_PASSED: Final = frozenset(
    {
        "-f",
        "--force",
        "-n",
        "--dry-run",
        "-q",
        "--quiet",
        "-v",
        "--verbose",
        "--atomic",
        "--porcelain",
        "--progress",
        "--no-progress",
    }
)
#: Options of push that are carried out here (hooks never run: --verify means nothing).
_PUSH_HANDLED: Final = frozenset(
    {
        "-u",
        "--set-upstream",
        "--tags",
        "-d",
        "--delete",
        "--force-with-lease",
        "--no-verify",
        "--verify",
    }
)


class GitSync:
    """Clone, pull, fetch and push for one daemon: `remote` for the network, `spawn` for the
    workspace's sandbox."""

    def __init__(self, remote: GitRemote, spawn: Spawn) -> None:
        self.remote = remote
        self.spawn = spawn

    async def _git(
        self,
        ctx: StepContext,
        args: Sequence[str],
        *,
        cwd: str,
        timeout: float,
        mirror: str | None = None,
    ) -> JSON:
        """`git <args>` in the workspace's sandbox: no network; `mirror` visible read-only."""
        return await self.spawn(
            ["git", *GIT_SAFE_CONFIG, *args],
            ctx,
            cwd=cwd,
            timeout=timeout,
            git=True,
            network=False,
            extra_env=LOCAL_ONLY,
            read_only=(mirror,) if mirror else (),
        )

    # --- steps ------------------------------------------------------------------------------

    async def clone(
        self,
        ctx: StepContext,
        remote: Remote,
        dest: str,
        *,
        branch: str | None,
        shallow: bool,
        timeout: float,
    ) -> JSON:
        """Clone `remote` (its `branch`, else its default) into `dest`, which must not exist."""
        deadline = trio.current_time() + timeout
        mirror, fetched = await self.remote.fetch(
            ctx,
            remote,
            branches=[branch] if branch else [],
            history="shallow" if shallow else "full",
            timeout=timeout,
        )
        if "error" in fetched:
            return fetched
        branch = branch or fetched.get("branch")
        argv = ["clone", "--no-local", "--no-recurse-submodules"]
        argv += ["--depth", "1"] if shallow else []
        argv += ["--branch", branch] if branch else []
        cloned = await self._git(
            ctx,
            [*argv, "--", mirror.path, dest],
            cwd=ctx.env.root,
            timeout=_left(deadline),
            mirror=mirror.path,
        )
        if "error" in cloned:
            return combine(fetched, cloned)
        named = await self._git(
            ctx,
            ["-C", dest, "remote", "set-url", "origin", remote.url],
            cwd=ctx.env.root,
            timeout=_LOOKUP_TIMEOUT_S,
        )
        return combine(fetched, cloned, named)

    async def origin(self, ctx: StepContext, repo: str) -> tuple[str | None, JSON]:
        """The URL of `origin` in the repository at `repo` as its config says (never a
        rewritten one), and the result of asking (with `error` if there is none)."""
        got = await self._git(
            ctx,
            ["-C", repo, "config", "--get", "remote.origin.url"],
            cwd=ctx.env.root,
            timeout=_LOOKUP_TIMEOUT_S,
        )
        url = got["stdout"].strip()
        return (url or None), got

    async def pull(
        self,
        ctx: StepContext,
        repo: str,
        *,
        branch: str | None,
        timeout: float,
        remote: Remote | None = None,
    ) -> JSON:
        """What `git pull --no-rebase` does in `repo` (after checking out `branch`, if given),
        with origin's commits brought in through the mirror."""
        deadline = trio.current_time() + timeout
        if remote is None:
            url, got = await self.origin(ctx, repo)
            if url is None:
                return dict(got, error="the repository has no remote named origin to pull from")
            remote = await self.remote.remote(url, ctx.workspace_id)
        want = branch
        if want is None:  # the current branch's upstream, as git pull would merge
            up = await self._git(
                ctx,
                [
                    "-C",
                    repo,
                    "for-each-ref",
                    "--format=%(HEAD)|%(upstream:remotename)|%(upstream:remoteref)",
                    "refs/heads",
                ],
                cwd=ctx.env.root,
                timeout=_LOOKUP_TIMEOUT_S,
            )
            if "error" in up:
                return up
            current = [
                line.split("|") for line in up["stdout"].splitlines() if line.startswith("*|")
            ]
            if not current:
                return dict(up, error="the repository is not on a branch; name one to pull")
            _, remote_name, ref = current[0]
            if remote_name != "origin" or not ref.startswith("refs/heads/"):
                return dict(
                    up,
                    error="the current branch does not follow a branch of origin "
                    f"(it follows {remote_name or 'nothing'} "
                    f"{ref}); name one to pull",
                )
            want = ref.removeprefix("refs/heads/")
        try:
            validate_branch(want)
        except ValidationError as exc:
            raise WorkspaceError(f"the branch to pull: {exc.message}") from None
        mirror, fetched = await self.remote.fetch(
            ctx, remote, branches=[want], history="keep", timeout=_left(deadline)
        )
        if "error" in fetched:
            return fetched
        parts = [fetched]
        parts.append(
            await self._git(
                ctx,
                [
                    "-C",
                    repo,
                    "fetch",
                    "--quiet",
                    "--",
                    mirror.path,
                    f"+refs/heads/{want}:refs/remotes/origin/{want}",
                ],
                cwd=ctx.env.root,
                timeout=_left(deadline),
                mirror=mirror.path,
            )
        )
        if "error" not in parts[-1] and branch:
            parts.append(
                await self._git(
                    ctx,
                    ["-C", repo, "checkout", branch, "--"],
                    cwd=ctx.env.root,
                    timeout=_left(deadline),
                )
            )
        if "error" not in parts[-1]:
            parts.append(
                await self._git(
                    ctx,
                    [
                        "-C",
                        repo,
                        "merge",
                        "--no-edit",
                        "-m",
                        f"Merge branch '{want}' of {remote.url}",
                        f"refs/remotes/origin/{want}",
                    ],
                    cwd=ctx.env.root,
                    timeout=_left(deadline),
                )
            )
        return combine(*parts)

    # --- operations of the internal API and the tools ----------------------------------------

    async def operation(
        self, ctx: StepContext, operation: str, argv: list[str], *, cwd: str, timeout: float
    ) -> JSON:
        """`git <operation> <argv>` (fetch, pull or push; arguments already checked by
        `operations.git_arguments`) in the directory `cwd` of the workspace."""
        if operation == "push":
            return await self._push(ctx, argv, cwd=cwd, timeout=timeout)
        deadline = trio.current_time() + timeout
        options, positional = _split(argv)
        name = positional[0] if positional else "origin"
        url, looked = await self._url(ctx, name, cwd=cwd, push=False)
        if url is None:
            return looked
        remote = await self.remote.remote(url, ctx.workspace_id)
        specs = positional[1:]
        if not specs and _REMOTE_NAME.fullmatch(name):
            configured = await self._git(
                ctx,
                ["config", "--get-all", f"remote.{name}.fetch"],
                cwd=cwd,
                timeout=_LOOKUP_TIMEOUT_S,
            )
            specs = configured["stdout"].split()
        branches, tags = _wanted(specs)
        tags = tags or "--tags" in options or "-t" in options
        deepen = any(o.split("=", 1)[0] in _DEEPEN for o in options)
        mirror, fetched = await self.remote.fetch(
            ctx,
            remote,
            branches=branches,
            tags=tags,
            history="full" if deepen else "keep",
            timeout=_left(deadline),
        )
        if "error" in fetched:
            return fetched
        ran = await self._git(
            ctx,
            ["-c", f"url.{mirror.path}.insteadOf={url}", operation, *argv],
            cwd=cwd,
            timeout=_left(deadline),
            mirror=mirror.path,
        )
        return combine(fetched, ran)

    async def _url(
        self, ctx: StepContext, name: str, *, cwd: str, push: bool
    ) -> tuple[str | None, JSON]:
        """The URL of the remote `name` (or `name` itself, a URL), and the look-up's result."""
        if not _REMOTE_NAME.fullmatch(name):  # a URL (its scheme is checked with it)
            return name, {}
        keys = [f"remote.{name}.pushurl", f"remote.{name}.url"] if push else [f"remote.{name}.url"]
        got: JSON = {}
        for key in keys:
            got = await self._git(ctx, ["config", "--get", key], cwd=cwd, timeout=_LOOKUP_TIMEOUT_S)
            if url := got["stdout"].strip():
                return url, got
        return None, dict(got, error=f"no remote named {name!r} in this repository")

    async def _push(self, ctx: StepContext, argv: list[str], *, cwd: str, timeout: float) -> JSON:
        deadline = trio.current_time() + timeout
        options, positional = _split(argv, valued=frozenset())
        for option in options:
            if option not in _PUSH_PASSED | _PUSH_HANDLED:
                raise ValidationError(
                    f"args[{argv.index(option)}]",
                    f"push option {option} is not supported; expected one of "
                    f"{', '.join(sorted(_PUSH_PASSED | _PUSH_HANDLED))}",
                )
        name = positional[0] if positional else "origin"
        named = _REMOTE_NAME.fullmatch(name) is not None
        url, looked = await self._url(ctx, name, cwd=cwd, push=True)
        if url is None:
            return looked
        remote = await self.remote.remote(url, ctx.workspace_id)
        where = await self._git(
            ctx,
            ["rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=cwd,
            timeout=_LOOKUP_TIMEOUT_S,
        )
        if "error" in where:
            return where
        git_dir = await trio.to_thread.run_sync(_inside, ctx.env.root, where["stdout"].strip())
        plan = _PushPlan(
            named=name if named else None, delete="-d" in options or "--delete" in options
        )
        specs = positional[1:] or ([] if "--tags" in options else ["HEAD"])
        if "--tags" in options:
            listed = await self._git(
                ctx,
                ["for-each-ref", "--format=%(objectname) %(refname)", "refs/tags"],
                cwd=cwd,
                timeout=_LOOKUP_TIMEOUT_S,
            )
            for line in listed["stdout"].splitlines():
                oid, _, ref = line.partition(" ")
                plan.add(False, _object_id(oid), ref, ref)
        for spec in specs:
            force, body = spec.startswith("+"), spec.removeprefix("+")
            src, _, dst = body.partition(":")
            if plan.delete:
                src, dst = "", src
            if not src:
                plan.add(force, None, "", dst)
                continue
            if src.startswith("-") or "\0" in src:
                raise ValidationError("args", f"expected a ref to push, got {src!r}")
            got = await self._git(
                ctx,
                ["rev-parse", src, "--symbolic-full-name", src, "--"],
                cwd=cwd,
                timeout=_LOOKUP_TIMEOUT_S,
            )
            if "error" in got:
                return got
            lines = got["stdout"].split()
            plan.add(
                force,
                _object_id(lines[0] if lines else ""),
                lines[1] if len(lines) > 1 else "",
                dst,
            )
        lease: list[str] = []
        if "--force-with-lease" in options:
            for ref, _ in plan.tracking:
                seen = await self._git(
                    ctx, ["rev-parse", "--verify", "-q", ref], cwd=cwd, timeout=_LOOKUP_TIMEOUT_S
                )
                dst = "refs/heads/" + ref.split("/", 3)[3]
                expected = seen["stdout"].strip()
                lease.append(f"--force-with-lease={dst}:{_object_id(expected) if expected else ''}")
        passed = [o for o in options if o in _PUSH_PASSED]
        pushed = await self.remote.push(
            ctx,
            remote,
            git_dir,
            plan.objects,
            plan.refspecs,
            [*passed, *lease],
            timeout=_left(deadline),
        )
        if "error" in pushed or "-n" in options or "--dry-run" in options or not named:
            return pushed
        parts = [pushed]
        for ref, oid in plan.tracking:  # as git push does: the remote-tracking refs follow
            args = ["update-ref", "-d", ref] if oid is None else ["update-ref", ref, oid]
            parts.append(await self._git(ctx, args, cwd=cwd, timeout=_LOOKUP_TIMEOUT_S))
        if "-u" in options or "--set-upstream" in options:
            for local, branch in plan.upstreams:
                parts.append(
                    await self._git(
                        ctx,
                        ["branch", f"--set-upstream-to={name}/{branch}", local],
                        cwd=cwd,
                        timeout=_LOOKUP_TIMEOUT_S,
                    )
                )
        return combine(*parts)


class _PushPlan:
    """What a push sends: the objects to copy into the mirror, the mirror's refspecs (`{i}`
    stands for the i-th object's ref there), and what changes here once it is done."""

    def __init__(self, *, named: str | None, delete: bool) -> None:
        self.named = named  #: the remote's name, when pushed to by name
        self.delete = delete
        self.objects: list[str] = []
        self.refspecs: list[str] = []
        self.tracking: list[tuple[str, str | None]] = []  #: (remote-tracking ref, new id)
        self.upstreams: list[tuple[str, str]] = []  #: (local branch, remote branch)

    def add(self, force: bool, oid: str | None, full: str, dst: str) -> None:
        """`oid` (None: delete) from the local ref `full` ("" for an expression) to `dst`."""
        if not dst:
            if not full.startswith(("refs/heads/", "refs/tags/")):
                raise ValidationError(
                    "args",
                    f"cannot tell where {full or 'that'} goes; name "
                    "the destination (src:refs/heads/name)",
                )
            dst = full
        if not dst.startswith("refs/"):
            dst = ("refs/tags/" if full.startswith("refs/tags/") else "refs/heads/") + dst
        if not _REF.fullmatch(dst) or ".." in dst or dst.endswith((".lock", "/")):
            raise ValidationError(
                "args", f"expected a destination ref like refs/heads/name, got {dst!r}"
            )
        if full and not _REF.fullmatch(full) and full != "HEAD":
            raise ValidationError("args", f"expected a ref to push, got {full!r}")
        if oid is None:
            self.refspecs.append(f":{dst}")
        else:
            self.refspecs.append(("+" if force else "") + "{" + str(len(self.objects)) + "}:" + dst)
            self.objects.append(oid)
        if self.named and dst.startswith("refs/heads/"):
            branch = dst.removeprefix("refs/heads/")
            self.tracking.append((f"refs/remotes/{self.named}/{branch}", oid))
            if oid is not None and full.startswith("refs/heads/"):
                self.upstreams.append((full.removeprefix("refs/heads/"), branch))


def _object_id(text: str) -> str:
    """`text` if it is an object id (what the workspace's git printed is the tenant's)."""
    if not _OBJECT_ID.fullmatch(text):
        raise WorkspaceError(f"expected an object id from git rev-parse, got {text[:80]!r}")
    return text


def _left(deadline: float) -> float:
    return max(1.0, deadline - trio.current_time())


def _split(argv: Sequence[str], valued: frozenset[str] = _VALUED) -> tuple[list[str], list[str]]:
    """(options, positional arguments) of a fetch, pull or push command line."""
    options: list[str] = []
    positional: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            positional += list(args)
        elif arg.startswith("-") and not positional:
            options.append(arg)
            if arg in valued:
                options.append(next(args, ""))
        else:
            positional.append(arg)
    return options, positional


def _wanted(specs: Sequence[str]) -> tuple[list[str] | None, bool]:
    """The remote branches `specs` (refspecs) fetch (None: all of them), and whether tags."""
    names: list[str] = []
    tags = False
    for spec in specs:
        src = spec.removeprefix("+").split(":", 1)[0]
        if src.startswith("^"):
            continue
        if src.startswith("refs/tags/"):
            tags = True
        elif (
            "*" in src
            or src in ("", "HEAD")
            or (src.startswith("refs/") and not src.startswith("refs/heads/"))
        ):
            return None, tags
        else:
            name = src.removeprefix("refs/heads/")
            try:
                names.append(validate_branch(name, "args"))
            except ValidationError:
                return None, tags
    return (names or None), tags


def _inside(root: str, path: str) -> str:
    """`path` (a git directory git named) verified to be a directory inside the workspace."""
    rel = os.path.relpath(os.path.normpath(path), root)
    if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        raise WorkspaceError(f"the repository's git directory {path!r} is outside the workspace")
    return paths.real_dir(root, rel)
