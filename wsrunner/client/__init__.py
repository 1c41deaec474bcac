"""A typed Python client for wsrunner's two HTTP APIs, for trio and asyncio alike (httpx).

    async with Client("http://host:8080", token) as wsr:
        accepted = await wsr.submit("ws-1", [{"action": "execute_command", "command": "make"}])
        async for event in wsr.events(accepted.task_id):
            print(event.type, event.data)
        task = await wsr.get(accepted.task_id)

    async with WorkspaceClient("http://127.0.0.1:8081", internal_token) as ws:
        print((await ws.exec("ws-1", "ls -la"))["stdout"])

Errors are `ApiError` subclasses carrying the server's problem details (`.problem`), chosen by
status: `Unauthorized`, `NotFound`, `Conflict`, `Invalid`, `TooLarge`, `Unavailable`.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import anyio
import httpx
from httpx_sse import aconnect_sse

TERMINAL: Final = frozenset({"completed", "failed", "cancelled", "timed_out"})


class ApiError(Exception):
    """An error answer; `problem` is its RFC 9457 body (`detail`, `errors`, ...)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(
            f"{status} {problem.get('title', '')}: {problem.get('detail', '')}".strip()
        )

    @property
    def field(self) -> str | None:
        """The offending field of a validation error, e.g. `steps[0].timeout`."""
        errors = self.problem.get("errors") or []
        return errors[0].get("field") if errors else None


class Unauthorized(ApiError): ...


class NotFound(ApiError): ...


class Conflict(ApiError): ...


class Invalid(ApiError): ...


class TooLarge(ApiError): ...


class Unavailable(ApiError): ...


_BY_STATUS: Final[dict[int, type[ApiError]]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    400: Invalid,
    422: Invalid,
    413: TooLarge,
    503: Unavailable,
}


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    raise _BY_STATUS.get(response.status_code, ApiError)(response.status_code, problem)


@dataclass(frozen=True, slots=True)
class Accepted:
    task_id: str
    status: str
    events_url: str
    replayed: bool = False  #: an idempotent retry returned the first task


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    workspace_id: str
    status: str
    priority: str
    submitted_at: str
    started_at: str | None
    completed_at: str | None
    error_message: str | None
    attempts: int
    result: dict[str, Any] | None = None
    configuration: dict[str, Any] | None = None
    #: while queued: its place in line and why it is not running (`position`, `reason`)
    waiting: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  #: every field as sent

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Task:
        return cls(
            id=body["id"],
            workspace_id=body["workspace_id"],
            status=body["status"],
            priority=body["priority"],
            submitted_at=body["submitted_at"],
            started_at=body.get("started_at"),
            completed_at=body.get("completed_at"),
            error_message=body.get("error_message"),
            attempts=body.get("attempts", 0),
            result=body.get("result"),
            configuration=body.get("configuration"),
            waiting=body.get("waiting"),
            raw=body,
        )

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    data: dict[str, Any]


class _Base:
    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        timeout: float,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(timeout, read=None),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _json(self, method: str, url: str, **kw: Any) -> Any:
        response = await self._http.request(method, url, **kw)
        _raise_for(response)
        return response.json()


class Client(_Base):
    """The public API: tasks and their events. `token` is a bearer token (`wsrunner tokens`)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, {"Authorization": f"Bearer {token}"}, timeout, transport)

    async def submit(
        self,
        workspace_id: str,
        steps: Sequence[dict[str, Any]],
        *,
        priority: str = "normal",
        timeout_seconds: int = 300,
        stop_on_error: bool = False,
        idempotency_key: str | None = None,
    ) -> Accepted:
        body: dict[str, Any] = {
            "workspace_id": workspace_id,
            "steps": list(steps),
            "priority": priority,
            "timeout_seconds": timeout_seconds,
            "stop_on_error": stop_on_error,
        }
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return await self._accepted("/api/tasks/submit", body)

    async def clone(
        self, workspace_id: str, repo_url: str, *, branch: str | None = None, shallow: bool = True
    ) -> Accepted:
        body: dict[str, Any] = {"repo_url": repo_url, "shallow": shallow}
        if branch is not None:
            body["branch"] = branch
        return await self._accepted(f"/api/workspaces/{workspace_id}/github/clone", body)

    async def _accepted(self, url: str, body: dict[str, Any]) -> Accepted:
        response = await self._http.post(url, json=body)
        _raise_for(response)
        data = response.json()
        return Accepted(
            data["task_id"],
            data["status"],
            data["events_url"],
            replayed=response.headers.get("Idempotent-Replayed") == "true",
        )

    async def get(self, task_id: str) -> Task:
        return Task.from_json(await self._json("GET", f"/api/tasks/{task_id}"))

    async def list(
        self, *, workspace_id: str | None = None, status: str | None = None, page_size: int = 50
    ) -> AsyncIterator[Task]:
        """Every matching task, newest first, fetching pages of `page_size` as it goes."""
        params: dict[str, str] = {"limit": str(page_size)}
        if workspace_id is not None:
            params["workspace_id"] = workspace_id
        if status is not None:
            params["status"] = status
        while True:
            page = await self._json("GET", "/api/tasks", params=params)
            for body in page["tasks"]:
                yield Task.from_json(body)
            if not page["next_cursor"]:
                return
            params["cursor"] = page["next_cursor"]

    async def cancel(self, task_id: str) -> None:
        await self._json("POST", f"/api/tasks/{task_id}/cancel")

    async def events(
        self, task_id: str, *, last_event_id: str | None = None, max_reconnects: int = 10
    ) -> AsyncIterator[Event]:
        """The task's events until its final status; resumes after a dropped connection.

        Each reconnect sends `Last-Event-ID`, so nothing is repeated or missed.
        """
        reconnects = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                async with aconnect_sse(
                    self._http, "GET", f"/api/tasks/{task_id}/events", headers=headers
                ) as source:
                    if source.response.status_code == 204:
                        return  # ended, and nothing after last_event_id
                    if not source.response.is_success:
                        await source.response.aread()
                        _raise_for(source.response)
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue  # the opening `retry:` block
                        event = Event(sse.id, sse.event, json.loads(sse.data))
                        last_event_id = sse.id
                        yield event
                        if event.type == "status_changed" and event.data.get("status") in TERMINAL:
                            return
                lost: Exception | None = None  # ended early: that daemon is stopping
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError) as exc:
                lost = exc
            reconnects += 1
            if reconnects > max_reconnects:
                raise Unavailable(503, {"title": "Event stream lost", "detail": str(lost)})
            await anyio.sleep(min(2.0, 0.05 * 2**reconnects))

    async def wait(self, task_id: str) -> Task:
        """Follow the task's events to its end, then return its record."""
        async for _ in self.events(task_id):
            pass
        return await self.get(task_id)


class WorkspaceClient(_Base):
    """The internal API: the reference `WorkspaceClient` operations on one daemon."""

    def __init__(
        self,
        base_url: str,
        internal_token: str,
        *,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, {"X-Internal-Token": internal_token}, timeout, transport)

    async def read_file(self, workspace_id: str, path: str) -> dict[str, Any]:
        return dict(
            await self._json(
                "GET", f"/workspaces/{workspace_id}/files/content", params={"path": path}
            )
        )

    async def write_file(self, workspace_id: str, path: str, content: str) -> dict[str, Any]:
        return dict(
            await self._json(
                "POST",
                f"/workspaces/{workspace_id}/files/write",
                json={"path": path, "content": content},
            )
        )

    async def list_dir(self, workspace_id: str, path: str = ".") -> dict[str, Any]:
        return dict(
            await self._json("GET", f"/workspaces/{workspace_id}/files", params={"path": path})
        )

    async def grep(
        self,
        workspace_id: str,
        pattern: str,
        *,
        path: str = ".",
        include: str | None = None,
        max_results: int = 50,
    ) -> dict[str, Any]:
        params = {"pattern": pattern, "path": path, "max_results": str(max_results)}
        if include is not None:
            params["include"] = include
        return dict(
            await self._json("GET", f"/workspaces/{workspace_id}/files/grep", params=params)
        )

    async def exec(
        self, workspace_id: str, command: str, *, cwd: str = ".", timeout: int = 120
    ) -> dict[str, Any]:
        return dict(
            await self._json(
                "POST",
                f"/workspaces/{workspace_id}/exec",
                json={"command": command, "cwd": cwd, "timeout": timeout},
            )
        )

    async def git(
        self,
        workspace_id: str,
        operation: str,
        *,
        cwd: str = ".",
        args: str | builtins.list[str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"operation": operation, "cwd": cwd}
        if args is not None:
            body["args"] = args
        return dict(await self._json("POST", f"/workspaces/{workspace_id}/git", json=body))
