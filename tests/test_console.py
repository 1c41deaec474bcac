"""`wsrunner submit` and `wsrunner tasks ...` through the real entry point, against a daemon."""

from __future__ import annotations

import json
import os
import sys
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
