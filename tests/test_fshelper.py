"""The directory helper's protocol: what a caller gets when the helper cannot do the work.

Its use by a daemon (tasks, a killed helper, the packaged daemon) is tested in test_steps.py
and test_packaging.py.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import trio
import trio.testing

from wsrunner import fshelper
from wsrunner.fshelper import MESSAGE_BYTES, Helper, serve_requests


async def test_no_helper_running_means_do_it_yourself() -> None:
    helper = Helper()
    assert await helper.call("make", "/nowhere", "tasks/t") is None
    assert (helper.served, helper.declined) == (0, 1)


async def test_a_helper_closed_while_a_request_is_being_sent_declines_it() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    helper = Helper()
    helper._sock = trio.socket.from_stdlib_socket(ours)
    while True:  # nobody reads `theirs`: fill the buffer, so the next send waits
        try:
            ours.send(b"x" * 65536)
        except BlockingIOError:
            break
    results: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _call_into(helper, results))
        await trio.testing.wait_all_tasks_blocked()
        helper._sock.close()  # as `serve` does when the helper exits
    assert results == [None] and helper.declined == 1
    theirs.close()


async def _call_into(helper: Helper, results: list[Any]) -> None:
    results.append(await helper.call("remove", "/nowhere", "tasks/t", [], [], None))


def test_the_helper_answers_none_for_what_it_cannot_do(tmp_path: Any) -> None:
    def boom() -> None:
        raise OSError("not as made")

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ops = {"boom": boom, "big": lambda: "x" * MESSAGE_BYTES, **fshelper.OPS}
    server = threading.Thread(target=serve_requests, args=(theirs, ops))
    server.start()
    (tmp_path / "tasks").mkdir()
    requests = [[1, "boom", []], [2, "big", []], [3, "ping", []],
                [4, "make", [str(tmp_path), "tasks/t", ["home"], {"f": ["hi", 0o600]},
                             [["tasks", "repos"], []]]],  # no repos/: not as prepared
                [5, "make", [str(tmp_path), "tasks/t", ["home"], {"f": ["hi", 0o600]},
                             [["tasks"], []]]],
                [6, "remove", [str(tmp_path), "tasks/t", ["home"], ["f"], "tasks"]]]  # fmt: skip
    replies = []
    for request in requests:
        ours.send(json.dumps(request).encode())
        replies.append(json.loads(ours.recv(MESSAGE_BYTES)))
        if request[0] == 5:
            made = tmp_path / "tasks" / "t"
            assert (made / "f").read_text() == "hi" and (made / "f").stat().st_mode & 0o777 == 0o600
    ours.close()
    server.join(timeout=5)
    assert replies == [[1, None], [2, None], [3, True], [4, None], [5, True], [6, []]]
    assert not (tmp_path / "tasks" / "t").exists()
