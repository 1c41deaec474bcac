"""The HTTP-agnostic facade of the core: tasks, API tokens, and workspace operations.

Frontends (and the CLI) call only this. It validates input, talks to the store and the queue
through their Protocols, and raises `wsrunner.errors` exceptions that a frontend maps to its
protocol's errors in one place.

Task methods take the caller's `scope`: the API token it authenticated with, or None for a
trusted caller (the internal API, the CLI). A task outside the scope does not exist for the
caller: NotFoundError, never a "forbidden" that would confirm the id.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

import trio

from wsrunner import tools
from wsrunner.engine.lifecycle import Lifecycle
from wsrunner.errors import (
    LimitReachedError,
    NotFoundError,
    PriorityRefusedError,
    UnavailableError,
    ValidationError,
    WorkspaceBusyError,
)
from wsrunner.metrics import Metrics
from wsrunner.models import (
    JSON,
    PRIORITY_ORDER,
    ApiToken,
    Event,
    TaskRecord,
    TaskSpec,
    TaskState,
    Waiting,
)
from wsrunner.payload import (
    parse_task,
    to_payload,
    validate_branch,
    validate_task_id,
    validate_workspace_id,
)
from wsrunner.ports import Queue, Store
from wsrunner.settings import Settings
from wsrunner.tokens import TokenRegistry
from wsrunner.workspace.operations import CLONE_TIMEOUT_S, GIT_READS, WorkspaceOps

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S: Final = 2.0  #: per readiness check
#: how long a call that writes may hold its workspace at most (it is released when it ends)
WRITE_HOLD_S: Final = 60.0
GIT_HOLD_S: Final = CLONE_TIMEOUT_S + 30
KILL_MARGIN_S: Final = 30.0  #: an exec's hold outlives its time limit by this (its kill)
_CLONE_KEYS: Final = frozenset(
    {
        "repo_url",
        "branch",
        "shallow",
        "priority",
        "timeout_seconds",
        "idempotency_key",
        "description",
    }
)


@dataclass(frozen=True, slots=True)
class Submitted:
    record: TaskRecord
    created: bool  #: False when an idempotent retry returned the first task


class Service:
    """What a client of wsrunner can ask of it."""

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        store: Store,
        ops: WorkspaceOps | None = None,
        stats: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.ops = ops  #: the workspace operations, when this process runs tasks
        self._stats = stats  # callable returning the slot statistics, when a daemon runs
        self.tokens = TokenRegistry(store)  #: the public API's bearer tokens
        self.lifecycle = Lifecycle(queue, store)  #: how a task's state changes
        self.metrics = metrics or Metrics()

    # --- tasks --------------------------------------------------------------------------------

    async def submit(self, body: object, *, scope: ApiToken | None = None) -> Submitted:
        """Validate `body`, record the task durably, then queue it.

        The durable row is written first. If Redis fails after that, the task is still accepted:
        the reconciler pushes queued rows that Redis does not know. Secrets are refused: git
        tokens come from the credential provider when the clone runs, never with the request.

        Raises:
            ValidationError: naming the offending field.
            NotFoundError: the workspace is outside the caller's scope.
            IdempotencyConflictError: the key was used with a different body.
        """
        if isinstance(body, dict):
            for key, why in (
                ("task_id", "is assigned by wsrunner; remove it from the request"),
                ("token_id", "is the token you authenticate with; remove it from the request"),
                (
                    "credentials",
                    "are not accepted over the API; git tokens come "
                    "from the daemon's git_credentials_file",
                ),
            ):
                if key in body:
                    raise ValidationError(key, why)
        spec = parse_task(body, task_id=str(uuid.uuid4()))
        if scope is not None:
            spec = dataclasses.replace(spec, token_id=scope.id)
            await self._within_limits(scope, spec)
        for i, step in enumerate(spec.steps):
            repo = getattr(step, "repo", None)
            if repo is not None and "@" in urlsplit(repo).netloc:
                raise ValidationError(
                    f"steps[{i}].repo",
                    "expected a URL without credentials; "
                    "git tokens come from the daemon's git_credentials_file",
                )
        _check_scope(scope, spec.workspace_id)
        record, created = await self.store.create(
            spec, workspace_path=str(self.settings.volume_path / spec.workspace_id)
        )
        if created:
            try:
                await self.queue.enqueue(
                    to_payload(spec),
                    event_data={"status": "queued"},
                    max_running=None if scope is None else scope.limits.max_running,
                )
            except UnavailableError as exc:
                logger.error(
                    "task recorded but not queued yet (the reconciler will): %s",
                    exc,
                    extra={"task_id": spec.task_id, "workspace_id": spec.workspace_id},
                )
        return Submitted(record, created)

    async def _within_limits(self, scope: ApiToken, spec: TaskSpec) -> None:
        """Refuse what `scope`'s limits do not allow (its running limit goes with the task).

        Raises:
            PriorityRefusedError: the priority is above the token's highest.
            LimitReachedError: `max_queued` of its tasks are waiting already.
        """
        limits = scope.limits
        if PRIORITY_ORDER.index(spec.priority) < PRIORITY_ORDER.index(limits.max_priority):
            raise PriorityRefusedError(spec.priority.value, limits.max_priority.value)
        if limits.max_queued is not None:
            waiting = await self.store.count_queued(scope.id)
            if waiting >= limits.max_queued:
                raise LimitReachedError(
                    "max_queued",
                    limits.max_queued,
                    f"token {scope.id} has {waiting} tasks waiting, its limit (max_queued "
                    f"{limits.max_queued}); retry once some have started",
                )

    async def waiting(self, record: TaskRecord) -> Waiting | None:
        """Where a queued task stands in line and why it is not running; None for a task
        that is not queued, or when Redis cannot say."""
        if record.status is not TaskState.QUEUED:
            return None
        try:
            return await self.queue.waiting(
                record.id,
                record.workspace_id,
                record.configuration.get("token_id"),
                record.priority.value,
            )
        except UnavailableError:
            return None

    async def submit_clone(
        self, workspace_id: str, body: object, *, scope: ApiToken | None = None
    ) -> Submitted:
        """Queue a clone of `repo_url` into the workspace (the reference's GitHub clone flow).

        The URL must use an allowed scheme (https) and host, and carry no credentials: the
        workspace's token, if any, is looked up when the clone runs.
        """
        validate_workspace_id(workspace_id)
        _check_scope(scope, workspace_id)
        if not isinstance(body, dict):
            raise ValidationError("", f"expected a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - _CLONE_KEYS)
        if unknown:
            raise ValidationError(
                unknown[0], f"unknown field; expected one of {', '.join(sorted(_CLONE_KEYS))}"
            )
        url = _clone_url(body.get("repo_url"), self.settings)
        branch = body.get("branch")
        if branch is not None:
            validate_branch(branch)
        step: JSON = {
            "action": "git_clone",
            "repo": url,
            "description": body.get("description") or f"Clone {url}",
        }
        if branch is not None:
            step["branch"] = branch
        if "shallow" in body:
            step["shallow"] = body["shallow"]
        task = {"workspace_id": workspace_id, "steps": [step], "task_type": "background_job"}
        task.update(
            {k: body[k] for k in ("priority", "timeout_seconds", "idempotency_key") if k in body}
        )
        return await self.submit(task, scope=scope)

    async def get(self, task_id: str, *, scope: ApiToken | None = None) -> TaskRecord:
        """The durable record. Raises NotFoundError (also for a malformed id or another scope)."""
        record = await self.store.get(_task_id(task_id))
        if scope is not None and not scope.allows(record.workspace_id):
            raise NotFoundError(f"no task with id {task_id!r}")
        return record

    async def list(
        self,
        *,
        workspace_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
        scope: ApiToken | None = None,
    ) -> builtins.list[TaskRecord]:
        if workspace_id is not None:
            validate_workspace_id(workspace_id)
            _check_scope(scope, workspace_id)
        state = None
        if status is not None:
            try:
                state = TaskState(status)
            except ValueError:
                raise ValidationError(
                    "status",
                    f"expected one of {', '.join(s.value for s in TaskState)}, got {status!r}",
                ) from None
        if not 1 <= limit <= 500:
            raise ValidationError("limit", f"expected an integer from 1 to 500, got {limit}")
        return await self.store.list(
            workspace_id=workspace_id,
            workspaces=None if scope is None else scope.workspaces,
            status=state,
            limit=limit,
            before=before,
        )

    async def cancel(self, task_id: str, *, scope: ApiToken | None = None) -> TaskRecord:
        """Cancel a queued or running task; it ends `cancelled` and a running command is killed.

        Raises:
            NotFoundError: no such task (in the caller's scope).
            InvalidTransitionError: it already ended (the message names its state).
        """
        tid = (await self.get(task_id, scope=scope)).id
        record = await self.lifecycle.cancelled(tid)
        logger.info("task cancelled", extra={"task_id": tid, "workspace_id": record.workspace_id})
        return record

    async def events(
        self, task_id: str, after: str = "0-0", *, block_ms: int | None = None
    ) -> builtins.list[Event]:
        """Events after `after` (a stream id), oldest first; `block_ms` waits for new ones."""
        return await self.queue.read_events(_task_id(task_id), after, block_ms=block_ms)

    async def checks(self) -> dict[str, str]:
        """Whether Redis and PostgreSQL answer and the volume takes a file: "ok" or why not.

        Each check gets CHECK_TIMEOUT_S, so a probe answers even when a backend hangs.
        """
        results = {}
        backends = (
            (("embedded-store", self.store.ping),)
            if self.settings.backend == "embedded"
            else (("redis", self.queue.ping), ("postgres", self.store.ping))
        )
        for name, check in (*backends, ("volume", self._check_volume)):
            with trio.move_on_after(CHECK_TIMEOUT_S) as waited:
                try:
                    await check()
                    results[name] = "ok"
                except (UnavailableError, OSError) as exc:
                    results[name] = f"unavailable: {exc}"
            if waited.cancelled_caught:
                results[name] = f"unavailable: no answer within {CHECK_TIMEOUT_S:g}s"
        if self.ops is not None:
            executor = self.ops.executor
            refusal = executor.sandbox.isolation.refusal(executor.policy.base().sandbox.require)
            results["sandbox"] = "ok" if refusal is None else f"unavailable: {refusal}"
        return results

    async def _check_volume(self) -> None:
        def probe() -> None:
            fd, path = tempfile.mkstemp(prefix=".wsrunner-ready-", dir=self.settings.volume_path)
            os.close(fd)
            os.unlink(path)

        await trio.to_thread.run_sync(probe)

    async def health(self) -> JSON:
        """The reference system's /health shape, plus `checks` (see `checks()`)."""
        checks = await self.checks()
        stats = self._stats() if self._stats is not None else None
        return {
            "status": "healthy" if all(v == "ok" for v in checks.values()) else "degraded",
            "worker_id": self.settings.worker_id,
            "active_tasks": stats.running if stats is not None else 0,
            "concurrency": self.settings.concurrency,
            "volume_path": str(self.settings.volume_path),
            "checks": checks,
        }

    async def metrics_text(self, *, sse_subscribers: int = 0) -> bytes:
        """The Prometheus exposition, with the gauges read now (queue depth from Redis)."""
        m = self.metrics
        try:
            for priority, depth in (await self.queue.depths()).items():
                m.queue_depth.labels(priority=priority).set(depth)
            for reason, count in (await self.queue.waiting_counts()).items():
                m.tasks_waiting.labels(reason=reason).set(count)
        except UnavailableError:
            pass  # counted in wsrunner_backend_errors_total; the rest still renders
        stats = self._stats() if self._stats is not None else None
        m.slots_capacity.set(self.settings.concurrency)
        m.slots_busy.set(stats.running if stats is not None else 0)
        m.sse_subscribers.set(sse_subscribers)
        if self.ops is not None and (pool := self.ops.executor.sandbox.warm) is not None:
            live = pool.statistics()
            m.warm.seen(live["alive"], live["active"], pool.starts, pool.commands, pool.stops)
        return m.render()

    # --- agent tools ---------------------------------------------------------------------------

    def tool_definitions(self) -> builtins.list[JSON]:
        return tools.definitions()

    async def call_tool(
        self,
        workspace_id: object,
        name: object,
        arguments: object,
        *,
        scope: ApiToken | None = None,
        concurrent: bool = False,
    ) -> JSON:
        """Run an agent tool in a workspace of the caller's scope (see `wsrunner.tools`); one
        that writes holds the workspace as `writing` says."""
        ws = validate_workspace_id(workspace_id)
        _check_scope(scope, ws)
        reads = not tools.writes(name, arguments)
        longest_exec = self.settings.exec_timeout_max_s + KILL_MARGIN_S
        hold_s = longest_exec if name == "workspace_exec" else GIT_HOLD_S
        async with self.writing(ws, concurrent=concurrent or reads, hold_s=hold_s):
            return await tools.call(self.workspace, ws, name, arguments)

    # --- workspace operations (the internal API) ---------------------------------------------

    @property
    def workspace(self) -> WorkspaceOps:
        """list_files, read_file, write_file, exec, grep and git on a workspace."""
        if self.ops is None:
            raise UnavailableError("this process does not run workspace operations")
        return self.ops

    # The frontend's handlers call these, never `workspace` or `tokens` themselves: the facade
    # is the one surface the HTTP layer depends on. Each raises what the operation raises
    # (`wsrunner.errors`), and UnavailableError in a process without workspace operations.
    # A `timeout` here is request data, checked and applied by the one scope that runs the
    # command (ASYNC109 expects a caller's deadline instead).

    async def authenticate(self, secret: str) -> ApiToken:
        """The record of the API token `secret`; AuthenticationError, saying why, if invalid."""
        return await self.tokens.authenticate(secret)

    async def list_files(self, workspace_id: str, path: str = ".") -> JSON:
        return await self.workspace.list_files(workspace_id, path)

    async def read_file(self, workspace_id: str, path: str) -> JSON:
        return await self.workspace.read_file(workspace_id, path)

    @asynccontextmanager
    async def writing(
        self, workspace_id: str, *, concurrent: bool = False, hold_s: float = WRITE_HOLD_S
    ) -> AsyncIterator[None]:
        """Hold `workspace_id` for a call that writes (as a task's claim does), for at most
        `hold_s`: tasks of the workspace wait meanwhile. Waits up to `workspace_wait_s` for a
        task or call that holds it. `concurrent` runs beside them instead (explicit).

        Raises:
            WorkspaceBusyError: it stayed busy for `workspace_wait_s`.
        """
        if concurrent:
            yield
            return
        validate_workspace_id(workspace_id)
        hold = f"api-{uuid.uuid4().hex}"
        waited, delay = 0.0, 0.02
        while (holder := await self.queue.hold_workspace(workspace_id, hold, hold_s)) is not None:
            if waited >= self.settings.workspace_wait_s:
                raise WorkspaceBusyError(workspace_id, holder, waited)
            delay = min(delay * 2, 0.5, self.settings.workspace_wait_s - waited)
            await trio.sleep(delay)
            waited += delay
        try:
            yield
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self.queue.release_workspace(workspace_id, hold)
                except UnavailableError:  # it ends with its time to live
                    logger.warning("could not release workspace %s", workspace_id)

    async def write_file(
        self, workspace_id: str, path: str, content: object, *, concurrent: bool = False
    ) -> JSON:
        async with self.writing(workspace_id, concurrent=concurrent):
            return await self.workspace.write_file(workspace_id, path, content)

    async def check_exec(
        self,
        workspace_id: str,
        command: object,
        cwd: object,
        timeout: object,  # noqa: ASYNC109
    ) -> None:
        """Raise what `exec` would refuse before it starts (the request's fields, the policy,
        the isolation), so a streamed exec can answer with a problem instead of a stream."""
        text, _, _ = self.workspace.check_exec(command, cwd, timeout)
        await self.workspace.check_policy(workspace_id, text)

    async def exec(
        self,
        workspace_id: str,
        command: object,
        cwd: object = ".",
        timeout: object = None,  # noqa: ASYNC109
        *,
        on_output: Callable[[str, bytes], None] | None = None,
        concurrent: bool = False,
    ) -> JSON:
        _, _, seconds = self.workspace.check_exec(command, cwd, timeout)
        async with self.writing(
            workspace_id, concurrent=concurrent, hold_s=seconds + KILL_MARGIN_S
        ):
            return await self.workspace.exec(
                workspace_id, command, cwd, timeout, on_output=on_output
            )

    async def grep(
        self,
        workspace_id: str,
        pattern: object,
        path: object = ".",
        include: object = None,
        max_results: object = 50,
    ) -> JSON:
        return await self.workspace.grep(workspace_id, pattern, path, include, max_results)

    async def git(
        self,
        workspace_id: str,
        operation: object,
        cwd: object = ".",
        args: object = None,
        branch: object = None,
        *,
        concurrent: bool = False,
    ) -> JSON:
        """A git operation; those that only read (`GIT_READS`) never wait for the workspace."""
        reads = isinstance(operation, str) and operation in GIT_READS
        async with self.writing(workspace_id, concurrent=concurrent or reads, hold_s=GIT_HOLD_S):
            return await self.workspace.git(workspace_id, operation, cwd, args, branch)


def _clone_url(url: object, settings: Settings) -> str:
    """`url` if the clone endpoint may fetch it: allowed scheme and host, no credentials."""
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise ValidationError(
            "repo_url", "expected a repository URL such as https://github.com/owner/name.git"
        )
    parts = urlsplit(url)
    schemes, hosts = settings.clone_schemes, settings.clone_hosts
    if parts.scheme not in schemes:
        raise ValidationError(
            "repo_url",
            f"expected a URL with scheme {' or '.join(schemes)}, got {parts.scheme or 'none'!r}",
        )
    if "@" in parts.netloc:
        raise ValidationError(
            "repo_url",
            "expected a URL without credentials; the workspace's git token is added by wsrunner",
        )
    host = parts.netloc.lower()
    if host not in hosts and (parts.hostname or "") not in hosts:
        raise ValidationError(
            "repo_url", f"host {host!r} is not allowed; expected one of {', '.join(hosts)}"
        )
    if parts.query or parts.fragment or not parts.path.strip("/"):
        raise ValidationError("repo_url", "expected a repository path and no query or fragment")
    return url


def _check_scope(scope: ApiToken | None, workspace_id: str) -> None:
    if scope is not None and not scope.allows(workspace_id):
        raise NotFoundError(f"no workspace {workspace_id!r}")


def _task_id(task_id: str) -> str:

    try:
        return validate_task_id(task_id)
    except ValidationError:
        raise NotFoundError(f"no task with id {task_id!r}") from None
