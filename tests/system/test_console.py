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

from tests.conftest import Api, free_port


async def wsrunner(api: Api, *args: str, token: str | None = None) -> trio.CompletedProcess[bytes]:
    env = {**os.environ, "WSRUNNER_URL": api.public, "WSRUNNER_TOKEN": token or api.token}
    return await trio.run_process(
        [sys.executable, "-m", "wsrunner", *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_submit_and_wait_exits_with_the_outcome(api: Api) -> None:
    ok = await wsrunner(
        api, "submit", "--workspace", "ws-cli", "--wait", "--", "echo", "out;", "echo", "err", ">&2"
    )
    assert ok.returncode == 0, ok.stderr.decode()
    assert ok.stdout.decode() == "out\n"
    err = ok.stderr.decode()
    assert "[1/1] Step 1: execute_command" in err and "err\n" in err and "completed" in err
    failed = await wsrunner(api, "submit", "--workspace", "ws-cli", "--wait", "--", "exit 3")
    assert failed.returncode == 1 and "exit code 3" in failed.stderr.decode()


async def test_submit_prints_the_id_and_tasks_show_and_list(api: Api, tmp_path: Path) -> None:
    steps = tmp_path / "steps.yaml"
    steps.write_text(
        "- action: write_file\n  path: a.txt\n  content: hi\n- action: read_file\n  path: a.txt\n"
    )
    sub = await wsrunner(
        api, "submit", "--workspace", "ws-cli2", "--steps", str(steps), "--priority", "high"
    )
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
    listed = await trio.run_process(
        [sys.executable, "-m", "wsrunner", "tasks", "list"],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr.decode()
    config.write_text("url: x\npassword: y\n")
    bad = await trio.run_process(
        [sys.executable, "-m", "wsrunner", "tasks", "list"],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
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
            [
                sys.executable,
                "-m",
                "wsrunner",
                "submit",
                "--workspace",
                "ws-cut",
                "--wait",
                "--",
                "echo one; sleep 1; echo two",
            ],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        nursery.cancel_scope.cancel()
    assert watched.returncode == 0, watched.stderr.decode()
    assert cuts == 1
    assert watched.stdout.decode() == "one\ntwo\n"  # nothing repeated, nothing missed
    resumed = [r for r in requests if b"/events" in r and b"last-event-id:" in r.lower()]
    assert len(resumed) == 1


async def test_watch_on_a_terminal_shows_live_progress(api: Api, tmp_path: Path) -> None:
    """Under a pseudo-terminal: a progress bar with the step, the output, the final state."""
    master, slave = os.openpty()
    env = {
        **os.environ,
        "WSRUNNER_URL": api.public,
        "WSRUNNER_TOKEN": api.token,
        "TERM": "xterm-256color",
        "COLUMNS": "100",
    }
    argv = [sys.executable, "-m", "wsrunner", "submit", "--workspace", "ws-tty", "--steps"]
    steps = tmp_path / "steps.yaml"
    steps.write_text(
        "- action: execute_command\n  command: echo one; sleep 0.5\n"
        "- action: execute_command\n  command: echo two\n"
    )
    proc = subprocess.Popen(
        [*argv, str(steps), "--wait"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
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


async def client(*args: str, env: dict[str, str]) -> trio.CompletedProcess[bytes]:
    """The CLI with only `env` for its settings: no WSRUNNER_* from the caller's environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WSRUNNER_", "XDG_"))}
    return await trio.run_process(
        [sys.executable, "-m", "wsrunner", *args],
        env={**clean, **env},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_an_unreachable_daemon_is_one_line_and_exit_69() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    env = {"WSRUNNER_URL": url, "WSRUNNER_TOKEN": "wsr_x"}
    for argv in (
        ["tasks", "list"],
        ["tasks", "show", "ID"],
        ["tasks", "cancel", "ID"],
        ["tasks", "watch", "ID"],
        ["submit", "--workspace", "ws-1", "--wait", "--", "true"],
        ["submit", "--workspace", "ws-1", "--json", "--", "true"],
    ):
        res = await client(*argv, env=env)
        err = res.stderr.decode()
        assert res.returncode == 69, (argv, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith(f"wsrunner: cannot reach {url}: ") and "refused" in err, err


async def test_tls_and_server_errors_are_exit_69() -> None:
    """A plain-HTTP listener that answers 500: over https a TLS error, over http a 5xx answer."""

    async def answer_500(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await stream.receive_some(65536)
                await stream.send_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4"
                    b"\r\nConnection: close\r\n\r\nboom"
                )
            except trio.BrokenResourceError:
                pass  # the TLS client hung up first

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, answer_500, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        tls = await client(
            "tasks",
            "list",
            env={"WSRUNNER_URL": f"https://127.0.0.1:{port}", "WSRUNNER_TOKEN": "wsr_x"},
        )
        http = await client(
            "tasks",
            "show",
            "ID",
            env={"WSRUNNER_URL": f"http://127.0.0.1:{port}", "WSRUNNER_TOKEN": "wsr_x"},
        )
        nursery.cancel_scope.cancel()
    err = tls.stderr.decode()
    assert tls.returncode == 69 and len(err.splitlines()) == 1, err
    assert err.startswith(f"wsrunner: cannot reach https://127.0.0.1:{port}: ") and "SSL" in err
    err = http.stderr.decode()
    assert http.returncode == 69 and len(err.splitlines()) == 1, err
    assert err.startswith(f"wsrunner: http://127.0.0.1:{port}: 500 "), err


async def test_help_shows_examples_and_exit_codes_and_status_lists_its_choices() -> None:
    for argv in (["--help"], ["submit", "--help"], ["tasks", "--help"], ["tasks", "watch", "-h"]):
        shown = (await client(*argv, env={})).stdout.decode()
        example = "wsrunner tasks watch ID" if argv[0] == "tasks" else "wsrunner submit --workspace"
        assert "examples:" in shown and example in shown, (argv, shown)
        assert "69  the daemon is unavailable" in shown and "4   the task was cancelled" in shown
    bad = await client(
        "tasks",
        "list",
        "--status",
        "bogus",
        env={"WSRUNNER_URL": f"http://127.0.0.1:{free_port()}", "WSRUNNER_TOKEN": "x"},
    )
    err = bad.stderr.decode()
    assert bad.returncode == 2 and "invalid choice: 'bogus'" in err, err
    assert "queued" in err and "timed_out" in err


async def test_the_client_config_honours_xdg_config_home(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "xdg" / "wsrunner").mkdir(parents=True)
    (tmp_path / "xdg" / "wsrunner" / "client.yaml").write_text(f"url: {url}\ntoken: wsr_x\n")
    (tmp_path / "home").mkdir()
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    res = await client("tasks", "list", env=env)
    # The token and address were read from there: the request went out, to nobody.
    assert res.returncode == 69 and f"cannot reach {url}" in res.stderr.decode(), res.stderr
    env["XDG_CONFIG_HOME"] = "relative/dir"  # invalid by the spec: ~/.config is used instead
    (tmp_path / "home" / ".config").symlink_to(tmp_path / "xdg")
    res = await client("tasks", "list", env=env)
    assert res.returncode == 69 and f"cannot reach {url}" in res.stderr.decode(), res.stderr
