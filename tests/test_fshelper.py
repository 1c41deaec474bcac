"""The directory helper's protocol: what a caller gets when the helper cannot do the work.

Its use by a daemon (tasks, a killed helper, the packaged daemon) is tested in test_steps.py
and test_packaging.py.
"""

from __future__ import annotations

import itertools
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
    assert results == [None]
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


async def test_a_helper_that_never_answers_is_tried_less_and_less_often(monkeypatch: Any) -> None:
    """The daemon starts anyway (callers are declined); the retries back off, doubling."""
    monkeypatch.setattr(fshelper.sys, "executable", "/bin/false")  # exits at once, says nothing
    monkeypatch.setattr(fshelper, "RESTART_DELAY_S", 0.05)
    spawned: list[float] = []
    real_open_process = trio.lowlevel.open_process

    async def counting(*args: Any, **kw: Any) -> Any:
        spawned.append(trio.current_time())
        return await real_open_process(*args, **kw)

    monkeypatch.setattr(fshelper.trio.lowlevel, "open_process", counting)
    helper = Helper()
    async with trio.open_nursery() as nursery:
        await nursery.start(helper.serve)  # returns: the helper failed, the daemon goes on
        assert await helper.call("ping") is None and helper.pid is None
        await trio.sleep(1.6)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(spawned)]
    # Fixed 0.05 s retries would be about 30 attempts; doubling from 0.1 s gives 4 or 5.
    assert 2 <= len(spawned) <= 5, spawned
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps
