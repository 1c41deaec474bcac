"""wsrunner.client against a served daemon: trio here, asyncio in a subprocess."""

from __future__ import annotations

import sys
import textwrap

import httpx
import pytest
import trio

from tests.conftest import INTERNAL_TOKEN, Api, cmd
from wsrunner.client import Client, Conflict, Invalid, NotFound, Unauthorized, WorkspaceClient


async def test_submit_wait_get_list_cancel(api: Api) -> None:
    async with Client(api.public, api.token) as wsr:
        accepted = await wsr.submit("ws-c", [cmd("echo from the client")], priority="high")
        task = await wsr.wait(accepted.task_id)
        assert task.status == "completed" and task.ended and task.priority == "high"
        assert task.result is not None
        assert task.result["result"]["steps"][0]["result"]["stdout"] == "from the client\n"
        again = await wsr.submit("ws-c", [cmd("true")], idempotency_key="k")
        replay = await wsr.submit("ws-c", [cmd("true")], idempotency_key="k")
        assert replay.replayed and replay.task_id == again.task_id
        ids = [t.id async for t in wsr.list(workspace_id="ws-c", page_size=1)]
        assert ids == [again.task_id, accepted.task_id]  # newest first, across pages
        sleeper = await wsr.submit("ws-c", [cmd("sleep 30")])
        await wsr.cancel(sleeper.task_id)
        with pytest.raises(Conflict) as conflict:
            await wsr.cancel(sleeper.task_id)
        assert conflict.value.status == 409 and conflict.value.problem["task_status"] == "cancelled"
        with pytest.raises(NotFound):
            await wsr.get("00000000-0000-0000-0000-000000000000")
        with pytest.raises(Invalid) as invalid:
            await wsr.submit("ws-c", [cmd("true", timeout=0)])
        assert invalid.value.field == "steps[0].timeout"
    async with Client(api.public, "wsr_nope") as anon:
        with pytest.raises(Unauthorized):
            await anon.get(accepted.task_id)


class _CutAfterFirstEvent(httpx.AsyncBaseTransport):
    """Drops the first event stream after its first event, as a flaky proxy would."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.cut = 0
        self.resumed_from: list[str | None] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/events"):
            return response
        self.resumed_from.append(request.headers.get("Last-Event-ID"))
        if self.cut:
            return response
        self.cut += 1
        inner = response.stream

        class Cut(httpx.AsyncByteStream):
            async def __aiter__(self):  # type: ignore[no-untyped-def]
                buffer = b""
                async for chunk in inner:  # type: ignore[union-attr]
                    buffer += chunk
                    start = buffer.find(b"data: ")
                    end = buffer.find(b"\n\n", start) if start >= 0 else -1
                    if end >= 0:  # the first whole event: pass it on, then drop the line
                        yield buffer[: end + 2]
                        raise httpx.RemoteProtocolError("connection dropped")
                yield buffer

            async def aclose(self) -> None:
                await inner.aclose()  # type: ignore[union-attr]

        return httpx.Response(response.status_code, headers=response.headers, stream=Cut())


async def test_events_resume_after_a_dropped_connection(api: Api) -> None:
    transport = _CutAfterFirstEvent()
    async with Client(api.public, api.token, transport=transport) as wsr:
        accepted = await wsr.submit("ws-c", [cmd("echo a; sleep 0.3; echo b")])
        events = [e async for e in wsr.events(accepted.task_id)]
    async with Client(api.public, api.token) as wsr:
        reference = [e async for e in wsr.events(accepted.task_id)]
    assert transport.cut == 1 and transport.resumed_from[0] is None
    assert transport.resumed_from[1] == events[0].id  # reconnected after what it had
    assert [e.id for e in events] == [e.id for e in reference]  # nothing repeated or missed
    assert events[-1].data["status"] == "completed"


async def test_workspace_client(api: Api) -> None:
    async with WorkspaceClient(api.internal, INTERNAL_TOKEN) as ws:
        assert (await ws.write_file("ws-w", "a/b.txt", "hello\n"))["size_bytes"] == 6
        assert (await ws.read_file("ws-w", "a/b.txt"))["content"] == "hello\n"
        assert [e["name"] for e in (await ws.list_dir("ws-w", "a"))["entries"]] == ["b.txt"]
        assert (await ws.grep("ws-w", "hel+o"))["matches"][0]["file"] == "a/b.txt"
        assert (await ws.exec("ws-w", "cat b.txt", cwd="a"))["stdout"] == "hello\n"
        status = await ws.git("ws-w", "status")
        assert status["exit_code"] == 128  # not a repository: a result, not an error
        with pytest.raises(Invalid) as invalid:
            await ws.git("ws-w", "log", args=["--output=/tmp/x"])
        assert invalid.value.field == "args[0]"


async def test_the_client_works_under_asyncio(api: Api) -> None:
    program = textwrap.dedent(f"""
        import asyncio
        from wsrunner.client import Client

        async def main():
            async with Client({api.public!r}, {api.token!r}) as wsr:
                accepted = await wsr.submit("ws-aio", [{{"action": "execute_command",
                                                        "command": "echo asyncio"}}])
                task = await wsr.wait(accepted.task_id)
                print(task.status, task.result["result"]["steps"][0]["result"]["stdout"].strip())

        asyncio.run(main())
    """)
    result = await trio.run_process(
        [sys.executable, "-c", program], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().strip() == "completed asyncio"
