"""`wsrunner submit` and `wsrunner tasks ...` through the real entry point, against a daemon."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio

from tests.conftest import Api


async def wsrunner(api: Api, *args: str, token: str | None = None) -> trio.CompletedProcess[bytes]:
    env = {**os.environ, "WSRUNNER_URL": api.public, "WSRUNNER_TOKEN": token or api.token}
    return await trio.run_process([sys.executable, "-m", "wsrunner", *args], env=env,
                                  capture_stdout=True, capture_stderr=True, check=False)  # fmt: skip


async def test_submit_and_wait_exits_with_the_outcome(api: Api) -> None:
    ok = await wsrunner(api, "submit", "--workspace", "ws-cli", "--wait", "--",
                        "echo", "out;", "echo", "err", ">&2")  # fmt: skip
    assert ok.returncode == 0, ok.stderr.decode()
    assert ok.stdout.decode() == "out\n"
    err = ok.stderr.decode()
    assert "[1/1] Step 1: execute_command" in err and "err\n" in err and "completed" in err
    failed = await wsrunner(api, "submit", "--workspace", "ws-cli", "--wait", "--", "exit 3")
    assert failed.returncode == 1 and "exit code 3" in failed.stderr.decode()


async def test_submit_prints_the_id_and_tasks_show_and_list(api: Api, tmp_path: Path) -> None:
    steps = tmp_path / "steps.yaml"
    steps.write_text("- action: write_file\n  path: a.txt\n  content: hi\n"
                     "- action: read_file\n  path: a.txt\n")  # fmt: skip
    sub = await wsrunner(api, "submit", "--workspace", "ws-cli2", "--steps", str(steps),
                         "--priority", "high")  # fmt: skip
    task_id = sub.stdout.decode().strip()
    assert sub.returncode == 0 and len(task_id) == 36
    watched = await wsrunner(api, "tasks", "watch", task_id, "--json")
    events = [json.loads(line) for line in watched.stdout.decode().splitlines()]
    assert watched.returncode == 0 and events[-1]["data"]["status"] == "completed"
    shown = json.loads((await wsrunner(api, "tasks", "show", task_id, "--json")).stdout)
    assert (
        shown["priority"] == "high"
        and shown["result"]["result"]["steps"][1]["result"]["content"] == "hi"
    )
    text = (await wsrunner(api, "tasks", "show", task_id)).stdout.decode()
    assert f"task       {task_id}" in text and "completed" in text
    listed = json.loads(
        (await wsrunner(api, "tasks", "list", "--workspace", "ws-cli2", "--json")).stdout
    )
    assert [t["id"] for t in listed] == [task_id]


async def test_cancel_and_errors(api: Api) -> None:
    sub = await wsrunner(api, "submit", "--workspace", "ws-cli3", "--", "sleep", "30")
    task_id = sub.stdout.decode().strip()
    assert (await wsrunner(api, "tasks", "cancel", task_id)).returncode == 0
    watched = await wsrunner(api, "tasks", "watch", task_id)
    assert watched.returncode == 4 and "cancelled" in watched.stderr.decode()
    again = await wsrunner(api, "tasks", "cancel", task_id)
    assert again.returncode == 2 and "409" in again.stderr.decode()
    missing = await wsrunner(api, "tasks", "show", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 2 and "404" in missing.stderr.decode()
    bad = await wsrunner(api, "tasks", "list", token="wsr_nope")
    assert bad.returncode == 2 and "401" in bad.stderr.decode()
    invalid = await wsrunner(api, "submit", "--workspace", "../x", "--", "true")
    assert invalid.returncode == 2 and "workspace_id" in invalid.stderr.decode()
    nothing = await wsrunner(api, "submit", "--workspace", "ws-cli3")
    assert nothing.returncode == 2 and "give a command" in nothing.stderr.decode()


async def test_url_and_token_from_the_client_config_file(api: Api, tmp_path: Path) -> None:
    config = tmp_path / "client.yaml"
    config.write_text(f"url: {api.public}\ntoken: {api.token}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSRUNNER_")}
    env["WSRUNNER_CLIENT_CONFIG"] = str(config)
    listed = await trio.run_process([sys.executable, "-m", "wsrunner", "tasks", "list"], env=env,
                                    capture_stdout=True, capture_stderr=True, check=False)  # fmt: skip
    assert listed.returncode == 0, listed.stderr.decode()
    config.write_text("url: x\npassword: y\n")
    bad = await trio.run_process([sys.executable, "-m", "wsrunner", "tasks", "list"], env=env,
                                 capture_stdout=True, capture_stderr=True, check=False)  # fmt: skip
    assert bad.returncode == 2 and "keys url and token" in bad.stderr.decode()


async def test_watch_resumes_after_a_dropped_connection(api: Api) -> None:
    """A proxy cuts the first event stream after the first output event; watch reconnects."""
    host, port = api.public.removeprefix("http://").rsplit(":", 1)
    requests: list[bytes] = []
    cuts = 0

    async def relay(client: trio.SocketStream) -> None:
        nonlocal cuts
        async with client, await trio.open_tcp_stream(host, int(port)) as upstream:
            wants_events = False  # keep-alive: the stream may follow other requests

            async def up() -> None:
                nonlocal wants_events
                async for data in client:
                    requests.append(data)
                    wants_events = wants_events or b"/events" in data
                    await upstream.send_all(data)

            async def down(scope: trio.CancelScope) -> None:
                nonlocal cuts
                seen = b""
                async for data in upstream:
                    seen += data
                    if wants_events and cuts == 0 and b"event: output" in seen:
                        cuts += 1
                        end = data.find(b"\n\n", data.find(b"event: output")) + 2
                        await client.send_all(data[:end])
                        scope.cancel()  # drop both sides mid-stream
                        return
                    await client.send_all(data)
                scope.cancel()

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(up)
                    nursery.start_soon(down, nursery.cancel_scope)
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # a side hung up: so does the relay

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
        proxy = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        env = {**os.environ, "WSRUNNER_URL": proxy, "WSRUNNER_TOKEN": api.token}
        watched = await trio.run_process(
            [sys.executable, "-m", "wsrunner", "submit", "--workspace", "ws-cut", "--wait", "--",
             "echo one; sleep 1; echo two"], env=env, capture_stdout=True, capture_stderr=True,
            check=False)  # fmt: skip
        nursery.cancel_scope.cancel()
    assert watched.returncode == 0, watched.stderr.decode()
    assert cuts == 1
    assert watched.stdout.decode() == "one\ntwo\n"  # nothing repeated, nothing missed
    resumed = [r for r in requests if b"/events" in r and b"last-event-id:" in r.lower()]
    assert len(resumed) == 1


async def test_watch_on_a_terminal_shows_live_progress(api: Api, tmp_path: Path) -> None:
    """Under a pseudo-terminal: a progress bar with the step, the output, the final state."""
    master, slave = os.openpty()
    env = {**os.environ, "WSRUNNER_URL": api.public, "WSRUNNER_TOKEN": api.token,
           "TERM": "xterm-256color", "COLUMNS": "100"}  # fmt: skip
    argv = [sys.executable, "-m", "wsrunner", "submit", "--workspace", "ws-tty", "--steps"]
    steps = tmp_path / "steps.yaml"
    steps.write_text("- action: execute_command\n  command: echo one; sleep 0.5\n"
                     "- action: execute_command\n  command: echo two\n")  # fmt: skip
    proc = subprocess.Popen([*argv, str(steps), "--wait"], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)  # fmt: skip
    os.close(slave)

    def read_all() -> bytes:
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side has closed
                return out
            if not chunk:
                return out
            out += chunk

    try:
        raw = await trio.to_thread.run_sync(read_all)
        code = await trio.to_thread.run_sync(proc.wait)
    finally:
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode(errors="replace"))
    assert code == 0, text
    assert "step 2/2" in text and "1/2" in text  # the bar: step k of n
    assert "one" in text and "two" in text and "completed in" in text
