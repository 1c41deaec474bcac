"""Cancellation, timeouts and the cancel/complete race: exactly one terminal state, no survivors."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import redis
import trio
import trio_asyncio

from tests.conftest import cmd, host_pids, task_body, unique_seconds, wait_for, wait_terminal
from wsrunner.backends.postgres.store import open_postgres_store
from wsrunner.backends.redis.queue import open_redis_queue
from wsrunner.daemon import Daemon
from wsrunner.errors import InvalidTransitionError, NotFoundError
from wsrunner.models import TaskState
from wsrunner.service import Service

# A process tree: two background grandchildren, one of them under a shell of its own.
TREE = "sleep {t} & sh -c 'sleep {t}' & echo started; wait"


async def started(daemon: Daemon, task_id: str) -> bool:
    return any(e.type == "output" for e in await daemon.service.events(task_id))


async def test_timeout_kills_the_whole_process_tree(daemon: Daemon) -> None:
    t = unique_seconds()
    sub = await daemon.service.submit(task_body(cmd(TREE.format(t=t)), timeout_seconds=10))
    await wait_for(lambda: len(host_pids(t)) == 2)
    rec = await wait_terminal(daemon, sub.record.id, timeout=30)
    assert rec.status is TaskState.TIMED_OUT
    assert "timed out after" in rec.error_message
    assert 9_000 <= rec.execution_time_ms < 20_000
    await wait_for(lambda: not host_pids(t), timeout=5)
    step = rec.result["result"]["steps"][0]["result"]
    assert step["stdout"] == "started\n" and step["error"] == "interrupted"


async def test_cancel_of_a_running_task_kills_it_at_once(daemon: Daemon) -> None:
    t = unique_seconds()
    sub = await daemon.service.submit(task_body(cmd(TREE.format(t=t)), timeout_seconds=600))
    await wait_for(lambda: started(daemon, sub.record.id))
    await wait_for(lambda: len(host_pids(t)) == 2)
    rec = await daemon.service.cancel(sub.record.id)
    assert rec.status is TaskState.CANCELLED
    await wait_for(lambda: sub.record.id not in daemon.runner.running, timeout=5)
    await wait_for(lambda: not host_pids(t), timeout=5)
    final = await daemon.service.get(sub.record.id)
    assert final.status is TaskState.CANCELLED
    assert final.result is not None  # what ran before the cancel is kept
    statuses = [
        e.data["status"]
        for e in await daemon.service.events(sub.record.id)
        if e.type == "status_changed"
    ]
    assert statuses == ["queued", "running", "cancelled"]


async def test_cancel_of_a_queued_task_means_it_never_starts(start_daemon, settings) -> None:
    daemon = await start_daemon(concurrency=1)
    blocker = await daemon.service.submit(task_body(cmd("sleep 2")))
    marker = settings.volume_path / "ws-1" / "ran"
    queued = await daemon.service.submit(task_body(cmd("touch ran")))
    await daemon.service.cancel(queued.record.id)
    await wait_terminal(daemon, blocker.record.id)
    await trio.sleep(0.5)  # give the daemon every chance to (wrongly) start it
    rec = await daemon.service.get(queued.record.id)
    assert rec.status is TaskState.CANCELLED and rec.attempts == 0
    assert not marker.exists()
    statuses = [
        e.data["status"]
        for e in await daemon.service.events(queued.record.id)
        if e.type == "status_changed"
    ]
    assert statuses == ["queued", "cancelled"]


async def test_cancel_of_a_terminal_task_is_refused_with_its_state(daemon: Daemon) -> None:
    sub = await daemon.service.submit(task_body(cmd("true")))
    await wait_terminal(daemon, sub.record.id)
    with pytest.raises(InvalidTransitionError, match="is completed; it cannot become cancelled"):
        await daemon.service.cancel(sub.record.id)


async def test_unknown_or_malformed_ids_are_not_found(daemon: Daemon) -> None:
    for bad in ("not-a-uuid", "00000000-0000-0000-0000-000000000000", "../etc"):
        with pytest.raises(NotFoundError):
            await daemon.service.get(bad)
        with pytest.raises(NotFoundError):
            await daemon.service.cancel(bad)


async def test_cancel_racing_completion_ends_in_exactly_one_state(
    daemon: Daemon, redis_client: redis.Redis
) -> None:
    keys = daemon.service.queue.keys  # type: ignore[attr-defined]
    outcomes = set()
    for i in range(25):
        sub = await daemon.service.submit(task_body(cmd("true")))
        await trio.sleep(0.002 * (i % 10))  # sweep the cancel across the task's short life
        try:
            await daemon.service.cancel(sub.record.id)
        except InvalidTransitionError:
            pass
        rec = await wait_terminal(daemon, sub.record.id)
        tid = sub.record.id
        await wait_for(lambda: tid not in daemon.runner.running, timeout=5)  # noqa: B023
        outcomes.add(rec.status)
        assert redis_client.hget(keys.status(rec.id), "status") == rec.status.value
        terminal = [
            e
            for e in await daemon.service.events(rec.id)
            if e.type == "status_changed" and e.data["status"] not in ("queued", "running")
        ]
        assert [e.data["status"] for e in terminal] == [rec.status.value]
    assert outcomes <= {TaskState.COMPLETED, TaskState.CANCELLED}


async def test_cancel_reaches_the_daemon_running_the_task(daemon: Daemon, settings) -> None:
    sub = await daemon.service.submit(task_body(cmd("echo go; sleep 100"), timeout_seconds=600))
    await wait_for(lambda: started(daemon, sub.record.id))
    # The cancel arrives through other connections (another process's API), not this daemon's.
    async with (
        trio_asyncio.open_loop(),
        open_redis_queue(settings.redis_url, settings.redis_prefix) as queue,
        open_postgres_store(settings.database_url, schema=settings.database_schema) as store,
    ):
        await Service(settings, queue, store).cancel(sub.record.id)
    with trio.fail_after(2):  # pub/sub delivers in ms; the 1 s sweep is the backstop
        while sub.record.id in daemon.runner.running:
            await trio.sleep(0.01)
    assert (await daemon.service.get(sub.record.id)).status is TaskState.CANCELLED


async def test_step_timeout_fails_the_step_not_the_task(daemon: Daemon) -> None:
    sub = await daemon.service.submit(task_body(cmd("sleep 30", timeout=1), cmd("echo after")))
    rec = await wait_terminal(daemon, sub.record.id)
    steps = rec.result["result"]["steps"]
    assert (
        steps[0]["result"]["timed_out"] is True
        and "timed out after 1s" in steps[0]["result"]["error"]
    )
    assert steps[1]["result"]["stdout"] == "after\n"
    assert rec.status is TaskState.FAILED


async def test_output_is_capped_and_flagged(daemon: Daemon) -> None:
    sub = await daemon.service.submit(task_body(cmd("head -c 5000000 /dev/zero | tr '\\0' x")))
    rec = await wait_terminal(daemon, sub.record.id)
    step = rec.result["result"]["steps"][0]["result"]
    cap = daemon.policy.for_workspace("ws-1").limits.stdout_bytes
    assert step["truncated"] is True and len(step["stdout"]) == cap
    assert step["stdout_bytes"] == 5_000_000 and rec.status is TaskState.COMPLETED


async def test_output_past_the_caps_is_counted_and_streamed_while_wanted(tmp_path) -> None:
    """Past a full buffer, output goes on to a listener that wants it; once nobody does, the
    rest is only counted (spliced away unread). Every byte is counted either way."""
    from wsrunner.execution.process import Capture, run_process

    five_mb = ["sh", "-c", "head -c 5000000 /dev/zero | tr '\\0' x"]
    env = {"PATH": "/usr/bin:/bin"}
    streamed = {"all": 0, "some": 0}

    def wants_all(stream: str, chunk: bytes) -> None:
        streamed["all"] += len(chunk)

    def wants_some(stream: str, chunk: bytes) -> bool:
        streamed["some"] += len(chunk)
        return streamed["some"] < 100_000

    for on_output in (None, wants_all, wants_some):
        capture = Capture.capped(1000, 1000, on_output)
        rc = await run_process(five_mb, env=env, capture=capture, kill_grace=1)
        assert rc == 0 and capture.stdout.total == 5_000_000 and capture.stdout.text() == "x" * 1000
    assert streamed["all"] == 5_000_000
    assert 100_000 <= streamed["some"] < 5_000_000


async def test_output_is_counted_where_the_kernel_refuses_splice(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from wsrunner.execution import process

    def refused(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EINVAL, "splice refused")

    monkeypatch.setattr(process.os, "splice", refused)
    capture = process.Capture.capped(1000, 1000)
    rc = await process.run_process(
        ["sh", "-c", "head -c 3000000 /dev/zero"],
        env={"PATH": os.defpath},
        capture=capture,
        kill_grace=1,
    )
    assert rc == 0 and capture.stdout.total == 3_000_000 and len(capture.stdout.data) == 1000


async def test_a_process_that_leaves_the_group_cannot_hold_the_step_open(tmp_path) -> None:
    """A grandchild in a session of its own survives the group kill and keeps the pipes: the
    step still ends, DRAIN_S after its command, with what was printed and the flag set."""
    import os
    import signal as signals

    from wsrunner.execution import process

    t = unique_seconds()
    capture = process.Capture.capped(1000, 1000)
    began = trio.current_time()
    rc = await process.run_process(
        ["sh", "-c", f"setsid sleep {t} & sleep 0.5; echo started"],
        env={"PATH": os.defpath},
        capture=capture,
        kill_grace=1,
    )
    took = trio.current_time() - began
    try:
        assert rc == 0 and capture.stdout.text() == "started\n" and capture.pipes_held_open
        assert process.DRAIN_S + 0.5 <= took < process.DRAIN_S + 2.5
    finally:
        for pid in host_pids(t):
            os.kill(pid, signals.SIGKILL)


async def test_a_watch_is_called_as_it_asks_and_can_stop_the_command(tmp_path) -> None:
    """The quota watch's hook: called `watch_after` s after the start, then after the delay it
    returns each time; None stops the whole group like a cancel, output kept."""
    import os
    import signal as signals

    from wsrunner.execution import process

    t = unique_seconds()
    calls: list[float] = []
    began = trio.current_time()

    async def watch() -> float | None:
        calls.append(trio.current_time() - began)
        return None if len(calls) == 3 else 0.2

    capture = process.Capture.capped(1000, 1000)
    rc = await process.run_process(
        ["sh", "-c", f"echo started; sleep {t} & sleep {t}"],
        env={"PATH": os.defpath},
        capture=capture,
        kill_grace=1,
        watch=watch,
        watch_after=0.3,
    )
    assert rc == -signals.SIGTERM and capture.stdout.text() == "started\n" and not host_pids(t)
    assert len(calls) == 3 and 0.3 <= calls[0] < 2
    assert 0.2 <= calls[1] - calls[0] < 2 and 0.2 <= calls[2] - calls[1] < 2
    # A command that ends first is never watched.
    calls.clear()
    rc = await process.run_process(
        ["true"],
        env={"PATH": os.defpath},
        capture=capture,
        kill_grace=1,
        watch=watch,
        watch_after=0.3,
    )
    assert rc == 0 and calls == []


async def test_a_command_gets_only_what_it_is_given(tmp_path) -> None:
    """Started with posix_spawn: no descriptor of the daemon but those passed (one the daemon
    inherited included, once `inherit_none` ran), SIGPIPE and SIGXFSZ not ignored (Python
    ignores them), a session of its own, stdin at /dev/null."""
    import os
    import signal as signals

    from wsrunner.execution import process

    inherited = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    passed = os.open(tmp_path, os.O_RDONLY)
    listing = tmp_path / "fds"
    try:
        process.inherit_none()
        capture = process.Capture.capped(10_000, 10_000)
        # A subshell lists the shell's descriptors (the shell itself neither redirects nor pipes).
        script = (
            f"(ls /proc/$$/fd) > {listing}; grep SigIgn /proc/$$/status; "
            "cut -d' ' -f6 < /proc/$$/stat; echo $$; readlink /proc/$$/fd/0"
        )
        rc = await process.run_process(
            ["/bin/sh", "-c", script],
            env={"PATH": os.defpath},
            capture=capture,
            kill_grace=1,
            pass_fds=(passed,),
        )
    finally:
        os.close(inherited)
        os.close(passed)
    ignored, session, pid, stdin = capture.stdout.text().splitlines()
    assert rc == 0 and sorted(map(int, listing.read_text().split())) == [0, 1, 2, passed]
    mask = int(ignored.split()[1], 16)
    assert not mask & (1 << (signals.SIGPIPE - 1) | 1 << (signals.SIGXFSZ - 1)), ignored
    assert session == pid and stdin == "/dev/null"


async def test_a_command_is_served_by_its_callers_task_alone() -> None:
    """No task of its own for the pipes or the exit (one epoll set): a silent command costs the
    scheduler a few steps of the calling task, and nothing else runs meanwhile."""
    import os

    from wsrunner.execution import process

    class Steps(trio.abc.Instrument):
        def __init__(self) -> None:
            self.tasks: list[trio.lowlevel.Task] = []

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            self.tasks.append(task)

    steps = Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        capture = process.Capture.capped(100, 100)
        rc = await process.run_process(
            ["/bin/true"], env={"PATH": os.defpath}, capture=capture, kill_grace=1
        )
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert rc == 0 and set(steps.tasks) == {trio.lowlevel.current_task()}
    assert 1 <= len(steps.tasks) <= 3, len(steps.tasks)


async def test_a_command_that_cannot_be_owned_is_killed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started, but no pidfd to be had (out of descriptors, say): it is killed and reaped, its
    pipes closed, and the error raised; nothing runs unowned."""
    import errno
    import os

    from wsrunner.execution import process

    def no_more(pid: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    t = unique_seconds()
    fds = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(process.os, "pidfd_open", no_more)
    with pytest.raises(OSError, match="Too many open files"):
        await process.run_process(
            ["/bin/sh", "-c", f"sleep {t}"],
            env={"PATH": os.defpath},
            capture=process.Capture.capped(10, 10),
            kill_grace=1,
        )
    assert not host_pids(t) and set(os.listdir("/proc/self/fd")) <= fds


async def test_a_cancelled_command_leaves_no_process_and_no_descriptor(tmp_path) -> None:
    import os

    from wsrunner.execution import process

    t = unique_seconds()
    fds = set(os.listdir("/proc/self/fd"))
    capture = process.Capture.capped(1000, 1000)
    with trio.move_on_after(1):
        await process.run_process(
            ["sh", "-c", f"echo started; sleep {t} & sleep {t}"],
            env={"PATH": os.defpath},
            capture=capture,
            kill_grace=1,
        )
    assert capture.stdout.text() == "started\n" and not host_pids(t)
    assert set(os.listdir("/proc/self/fd")) <= fds


def test_signal_names_are_reported() -> None:
    from wsrunner.execution.process import Capture
    from wsrunner.execution.steps import Executor

    res = Executor.describe(Capture.capped(10, 10), exit_code=-signal.SIGKILL, duration_ms=1)
    assert res["signal"] == "SIGKILL" and res["error"] == "killed by SIGKILL"


async def test_a_bug_in_a_step_fails_that_task_only(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception no step should raise (a bug, injected here) fails its task with `internal
    error`, with the record complete and the traceback logged; the daemon runs the next task."""
    executor = daemon.runner.executor
    real = executor.run_step

    async def broken(step: Any, ctx: Any, *, budget_s: float) -> Any:
        if getattr(step, "command", "") == "echo boom":
            raise RuntimeError("injected fault")
        return await real(step, ctx, budget_s=budget_s)

    monkeypatch.setattr(executor, "run_step", broken)
    sub = await daemon.service.submit(task_body(cmd("echo before"), cmd("echo boom")))
    rec = await wait_terminal(daemon, sub.record.id)
    assert rec.status is TaskState.FAILED and rec.error_message == "internal error: injected fault"
    assert rec.completed_at is not None and rec.execution_time_ms is not None
    assert [s["result"]["stdout"] for s in rec.result["result"]["steps"]] == ["before\n"]
    assert any(
        "task aborted by an internal error" in r.message and r.exc_info for r in caplog.records
    )
    after = await daemon.service.submit(task_body(cmd("echo after")))
    assert (await wait_terminal(daemon, after.record.id)).status is TaskState.COMPLETED
