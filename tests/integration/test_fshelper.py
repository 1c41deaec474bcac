"""The directory helper's protocol (what a caller gets when the helper cannot do the work) and
the spare task directories it keeps.

Its use by a daemon (tasks, a killed helper, the packaged daemon) is tested in test_steps.py
and test_packaging.py.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from wsrunner.errors import PathEscapeError
from wsrunner.workspace import fshelper, paths
from wsrunner.workspace.fshelper import MESSAGE_BYTES, Helper, serve_requests


async def test_no_helper_running_means_do_it_yourself() -> None:
    helper = Helper()
    assert await helper.call("make", "/nowhere", "tasks/t") is None


async def test_a_helper_closed_while_a_request_is_being_sent_declines_it() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    helper = Helper()
    helper._sock = ours
    ours.setblocking(False)
    while True:  # nobody reads `theirs`: fill the buffer, so the next send waits
        try:
            ours.send(b"x" * 65536)
        except BlockingIOError:
            break
    results: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _call_into(helper, results))
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.notify_closing(ours)  # as `serve` does when the helper exits
        ours.close()
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
    root, spares = str(tmp_path), ".spare"
    requests = [
        [1, "boom", []],
        [2, "big", []],
        [3, "ping", []],
        [
            4,
            "make",
            [root, "tasks/t", ["home"], {"f": ["hi", 0o600]}, [["tasks", "repos"], []], spares],
        ],  # no repos/: not as prepared
        [5, "make", [root, "tasks/t", ["home"], {"f": ["hi", 0o600]}, [["tasks"], []], spares]],
        [6, "remove", [root, "tasks/t", ["home"], ["f"], "tasks", spares, 0]],
        [7, "make", [root, "tasks/u", ["home"], {}, [["tasks"], []], spares]],
        [8, "remove", [root, "tasks/u", ["home"], [], None, spares, 1]],  # parked
        [9, "make", [root, "tasks/v", ["home"], {"f": ["ho", 0o640]}, [["tasks"], []], spares]],
    ]
    replies, parked = [], 0
    for request in requests:
        ours.send(json.dumps(request).encode())
        replies.append(json.loads(ours.recv(MESSAGE_BYTES)))
        if request[0] == 5:
            made = tmp_path / "tasks" / "t"
            assert (made / "f").read_text() == "hi" and (made / "f").stat().st_mode & 0o777 == 0o600
        if request[0] == 8:
            assert os.listdir(tmp_path / "tasks") == [".spare"]
            parked = (tmp_path / "tasks" / ".spare" / "u").stat().st_ino
    ours.close()
    server.join(timeout=5)
    assert replies == [
        [1, None],
        [2, None],
        [3, True],
        [4, None],
        [5, True],
        [6, [".spare"]],
        [7, True],
        [8, []],
        [9, True],
    ]
    made = tmp_path / "tasks" / "v"  # the parked directory, with its new file
    assert made.stat().st_ino == parked and (made / "f").read_text() == "ho"
    assert sorted(os.listdir(made)) == ["f", "home"] and not os.listdir(tmp_path / "tasks/.spare")


# --- spare task directories (paths.park_dir, paths.take_spare) -----------------------------

SUBDIRS, SPARES = ("home", "tmp"), ".spare"


def _made(root: Path, name: str) -> Path:
    (root / "tasks").mkdir(exist_ok=True)
    paths.make_fresh_dir(
        str(root),
        f"tasks/{name}",
        subdirs=SUBDIRS,
        files={"gitconfig": ("[user]\n", 0o644), "ssh_key": ("k\n", 0o600)},
    )
    return root / "tasks" / name


def _park(root: Path, name: str, keep: int = 8) -> bool:
    return paths.park_dir(
        str(root),
        f"tasks/{name}",
        SPARES,
        subdirs=SUBDIRS,
        files=("gitconfig", "ssh_key"),
        keep=keep,
    )


def _take(root: Path, name: str) -> bool:
    return paths.take_spare(
        str(root),
        f"tasks/{name}",
        SPARES,
        subdirs=SUBDIRS,
        files={"gitconfig": ("[user]\n", 0o644)},
    )


def test_a_task_directory_as_made_is_parked_without_its_files_and_taken_again(
    tmp_path: Path,
) -> None:
    home = _made(tmp_path, "a") / "home"
    inode = home.stat().st_ino
    assert _park(tmp_path, "a")
    spares = tmp_path / "tasks" / ".spare"
    assert os.listdir(tmp_path / "tasks") == [".spare"]
    assert stat.S_IMODE(spares.stat().st_mode) == 0o700  # no command of the workspace enters
    assert sorted(os.listdir(spares / "a")) == ["home", "tmp"]  # the credentials are gone
    assert _take(tmp_path, "b")
    made = tmp_path / "tasks" / "b"
    assert (made / "home").stat().st_ino == inode and not os.listdir(spares)
    assert sorted(os.listdir(made)) == ["gitconfig", "home", "tmp"]
    assert (made / "gitconfig").read_text() == "[user]\n"
    assert not _take(tmp_path, "c")  # none left: the caller makes one
    _made(tmp_path, "c")
    assert not _park(tmp_path, "c", keep=0)  # enough parked: the caller removes it
    assert sorted(os.listdir(tmp_path / "tasks" / "c")) == ["home", "tmp"]  # files went first


def test_without_a_rename_that_keeps_what_is_there_nothing_is_parked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _made(tmp_path, "a")
    assert _park(tmp_path, "a")
    monkeypatch.setattr(paths, "_renameat2", None)  # a C library older than glibc 2.28
    assert not _take(tmp_path, "b")  # the caller makes a fresh one
    _made(tmp_path, "c")
    assert not _park(tmp_path, "c")  # the caller removes it
    assert sorted(os.listdir(tmp_path / "tasks")) == [".spare", "c"]


def test_a_spare_is_taken_only_into_a_new_name(tmp_path: Path) -> None:
    _made(tmp_path, "a")
    assert _park(tmp_path, "a")
    (tmp_path / "tasks" / "b").mkdir()  # an empty directory: rename(2) would replace it
    with pytest.raises(FileExistsError):
        _take(tmp_path, "b")
    assert os.listdir(tmp_path / "tasks" / ".spare") == ["a"]


@pytest.mark.parametrize(
    "change",
    [
        "a file in home",
        "a directory in tmp",
        "an extra entry",
        "home missing",
        "home a symlink",
        "tmp writable by others",
        "setgid on the task directory",
    ],
)
def test_a_task_directory_a_command_changed_is_not_parked(tmp_path: Path, change: str) -> None:
    made = _made(tmp_path, "a")
    _change(made, change)
    assert not _park(tmp_path, "a")
    assert os.listdir(tmp_path / "tasks") == ["a"]  # where it was, for the caller to remove


@pytest.mark.parametrize(
    "change", ["a file in home", "an extra entry", "home a symlink", "tmp writable by others"]
)
def test_a_spare_changed_while_parked_is_not_taken(tmp_path: Path, change: str) -> None:
    _made(tmp_path, "a")
    assert _park(tmp_path, "a")
    _change(tmp_path / "tasks" / ".spare" / "a", change)
    assert not _take(tmp_path, "b")
    assert not (tmp_path / "tasks" / "b").exists()


def test_spares_in_a_directory_that_is_not_the_daemons_are_not_used(tmp_path: Path) -> None:
    _made(tmp_path, "a")
    assert _park(tmp_path, "a")
    os.chmod(tmp_path / "tasks" / ".spare", 0o777)  # anyone could have put things there
    assert not _take(tmp_path, "b")
    _made(tmp_path, "c")
    assert not _park(tmp_path, "c")


def test_parking_never_leaves_the_workspace(tmp_path: Path) -> None:
    """`tasks` replaced by a symlink out of the workspace: nothing is parked or made out there."""
    root, outside = tmp_path / "ws", tmp_path / "outside"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    _made(tmp_path / "elsewhere", "a")
    (tmp_path / "elsewhere" / "tasks").rename(outside)
    (root / "tasks").symlink_to(outside)
    with pytest.raises(PathEscapeError):
        _park(root, "a")
    assert os.listdir(outside) == ["a"]  # no spares directory made out there
    with pytest.raises(PathEscapeError):
        _take(root, "b")


def test_a_spares_name_that_is_a_symlink_is_not_used(tmp_path: Path) -> None:
    _made(tmp_path, "a")
    (tmp_path / "decoy").mkdir(mode=0o700)
    (tmp_path / "tasks" / ".spare").symlink_to(tmp_path / "decoy")
    assert not _park(tmp_path, "a") and not os.listdir(tmp_path / "decoy")
    assert not _take(tmp_path, "b")


def _change(made: Path, change: str) -> None:
    match change:
        case "a file in home":
            (made / "home" / ".bashrc").write_text("echo hi\n")
        case "a directory in tmp":
            (made / "tmp" / "cache").mkdir()
        case "an extra entry":
            (made / "extra").write_text("")
        case "home missing":
            (made / "home").rmdir()
        case "home a symlink":
            (made / "home").rmdir()
            (made / "home").symlink_to(made / "tmp")
        case "tmp writable by others":
            os.chmod(made / "tmp", 0o777)
        case "setgid on the task directory":
            os.chmod(made, 0o2755)


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


async def test_a_call_to_a_running_helper_is_one_wait_for_its_caller() -> None:
    """The request goes out at once (no pass through the scheduler before it); the caller is
    woken once, by the answer. Concurrent callers each get their own answer."""
    from tests.integration.test_resp import _Steps

    helper = Helper()
    async with trio.open_nursery() as nursery:
        await nursery.start(helper.serve)
        assert helper.pid is not None
        steps = _Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(steps)
        try:
            assert await helper.call("ping") is True
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.steps == 1
        answers: dict[int, Any] = {}

        async def one(i: int) -> None:  # odd ones ask what the helper does not know: None
            answers[i] = await helper.call("ping" if i % 2 == 0 else "no-such-op")

        async with trio.open_nursery() as callers:
            for i in range(20):
                callers.start_soon(one, i)
        assert answers == {i: True if i % 2 == 0 else None for i in range(20)}
        nursery.cancel_scope.cancel()


async def test_a_call_once_sent_gets_its_answer_and_a_helper_gone_wakes_its_callers() -> None:
    """A call cannot be cancelled once it is sent: its caller gets the answer, and the
    cancellation at its next checkpoint. A helper that dies with calls outstanding wakes each
    of their callers with None (do it yourself)."""
    helper = Helper()
    async with trio.open_nursery() as nursery:
        await nursery.start(helper.serve)
        assert helper.pid is not None
        got: list[Any] = []
        with trio.CancelScope() as scope:
            scope.cancel()
            got.append(await helper.call("ping"))
            await trio.lowlevel.checkpoint()
            got.append("not reached")
        assert got == [True] and scope.cancelled_caught

        os.kill(helper.pid, signal.SIGSTOP)  # it reads nothing more
        answers: list[Any] = []

        async def one() -> None:
            answers.append(await helper.call("ping"))

        async with trio.open_nursery() as callers:
            for _ in range(3):
                callers.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []
            os.kill(helper.pid, signal.SIGKILL)
        assert answers == [None, None, None]
        nursery.cancel_scope.cancel()
