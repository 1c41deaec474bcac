"""A feed's window of frames (frontend/feeds.py): bounded in bytes however much a task says,
and it tells a stream when it no longer reaches back to the stream's cursor."""

from __future__ import annotations

from frontend.feeds import WINDOW_BYTES, Feed, event_key
from frontend.sse import frame
from wsrunner.models import Event


def output(n: int, size: int) -> Event:
    return Event(
        id=f"{1_000_000 + n}-0",
        type="output",
        task_id="t",
        data={"step": 0, "stream": "stdout", "data": "x" * size},
        timestamp="2026-12-08T00:00:00+00:00",
    )


def test_the_window_keeps_the_newest_frames_within_its_bytes() -> None:
    feed = Feed("t", (0, 0))
    events = [output(n, 1000) for n in range(3000)]  # some 3 MB of frames
    for i in range(0, len(events), 250):
        feed._append(events[i : i + 250])
    window = feed.frames_after(feed.floor)
    assert window is not None
    frames, last = window
    assert sum(map(len, frames)) <= WINDOW_BYTES
    assert frames == [frame(e.id, e.type, e.data) for e in events[-len(frames) :]]
    assert last == event_key(events[-1].id)
    assert feed.floor == event_key(events[-len(frames) - 1].id)
    assert feed.frames_after(event_key(events[0].id)) is None  # older: the stream reads the log
    assert feed.frames_after(last) == ([], last)  # up to date: nothing yet


def test_an_event_bigger_than_the_window_is_kept_alone() -> None:
    feed = Feed("t", (0, 0))
    small, big = output(1, 10), output(2, WINDOW_BYTES)
    feed._append([small, big])
    assert feed.frames_after(event_key(small.id)) == (
        [frame(big.id, big.type, big.data)],
        event_key(big.id),
    )
    assert feed.frames_after((0, 0)) is None


def test_the_task_s_final_status_ends_the_feed_and_what_follows_it_is_not_kept() -> None:
    feed = Feed("t", (0, 0))
    done = Event(
        id="1000001-0",
        type="status_changed",
        task_id="t",
        data={"status": "completed"},
        timestamp="2026-12-08T00:00:00+00:00",
    )
    feed._append([output(0, 5), done, output(2, 5)])
    assert feed.ended
    assert feed.frames_after((0, 0)) == (
        [frame(e.id, e.type, e.data) for e in (output(0, 5), done)],
        event_key(done.id),
    )
