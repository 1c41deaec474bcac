"""The claim rules of `wsrunner.turns` (the Python half; Redis's script is checked against real
daemons in tests/integration/test_turns.py): runnable first, tenants and workspaces in turns,
the place in line, and what holds a task back."""

from __future__ import annotations

import json
import uuid

import pytest

from wsrunner.turns import Turns, place


def payload(ws: str, token: str | None = None, task_id: str | None = None) -> str:
    body = {"task_id": task_id or str(uuid.uuid4()), "workspace_id": ws, "priority": "normal"}
    if token is not None:
        body["token_id"] = token
    return json.dumps(body)


def drain(turns: Turns, *, hold: bool = False) -> list[str]:
    """Workspaces in the order taken; each claim released at once unless `hold`."""
    out = []
    n = 0
    while (taken := turns.take()) is not None:
        n += 1
        if hold:
            turns.hold(f"normal:{n}", taken)
        out.append(json.loads(taken.payload)["workspace_id"])
    return out


A, B = "aaaaaaaaaaaa", "bbbbbbbbbbbb"


def test_a_busy_workspace_is_skipped_not_waited_for() -> None:
    turns = Turns()
    for ws in ("w1", "w1", "w2"):
        turns.add("normal", payload(ws))
    assert drain(turns, hold=True) == ["w1", "w2"]  # w1's second waits for the first
    assert turns.depth("normal") == 1
    turns.release("normal:1")
    assert drain(turns) == ["w1"]


def test_tenants_take_turns_and_a_newcomer_waits_one_turn_at_most() -> None:
    turns = Turns()
    for i in range(6):
        turns.add("normal", payload(f"a{i}", A))
    turns.take()  # A is served: it goes to the back of the line, where B joins behind it
    turns.add("normal", payload("b", B))
    assert drain(turns)[:3] == ["a1", "b", "a2"]


def test_a_tenants_workspaces_take_turns_and_each_is_fifo() -> None:
    turns = Turns()
    ids = [str(uuid.uuid4()) for _ in range(4)]
    for ws, tid in zip(("x", "x", "x", "y"), ids, strict=True):
        turns.add("normal", payload(ws, A, tid))
    taken = []
    while (t := turns.take()) is not None:
        taken.append(json.loads(t.payload)["task_id"])
    assert taken == [ids[0], ids[3], ids[1], ids[2]]


def test_priority_first_and_a_given_back_task_goes_first() -> None:
    turns = Turns()
    turns.add("low", payload("l"))
    turns.add("normal", payload("n1"))
    turns.add("normal", payload("n2"))
    turns.add("critical", payload("c"))
    first = turns.take()
    assert first is not None and first.priority == "critical"
    second = turns.take()
    assert second is not None and second.workspace == "n1"
    turns.add("normal", second.payload, next_up=True)  # a daemon gave it back
    assert drain(turns) == ["n1", "n2", "l"]


def test_a_token_at_its_running_limit_waits_and_others_go_by() -> None:
    turns = Turns()
    turns.token_limits[A] = 1
    turns.add("normal", payload("a1", A))
    turns.add("normal", payload("a2", A))
    turns.add("normal", payload("b1", B))
    assert drain(turns, hold=True) == ["a1", "b1"]
    [(tid, waiting)] = [
        (t, turns.waiting(t)) for t in _waiting_ids(turns) if turns.waiting(t) is not None
    ]
    assert waiting is not None and waiting.reason == "token limit: 1 running"
    assert turns.counts() == {
        "workspace_busy": 0,
        "token_limit": 1,
        "no_free_slot": 0,
        "home_unavailable": 0,
    }
    assert tid


def _waiting_ids(turns: Turns) -> list[str]:
    return [
        task_id
        for level in turns._levels.values()
        for queue in level.lists.values()
        for task_id, _ in queue
    ]


def test_a_workspace_may_allow_more_and_the_wait_for_it_is_timed() -> None:
    turns = Turns()
    turns.workspace_limits["wide"] = 2
    for ws in ("wide", "wide", "narrow"):
        turns.add("normal", payload(ws))
    assert sorted(drain(turns, hold=True)) == ["narrow", "wide", "wide"]
    turns.add("normal", payload("wide"))
    assert turns.take(now=10.0) is None  # finds it full, with a task waiting
    turns.release("normal:1")
    taken = turns.take(now=12.5)
    assert taken is not None and taken.workspace_wait_s == pytest.approx(2.5)


def test_unreadable_payloads_go_first_and_hold_nothing() -> None:
    turns = Turns()
    turns.add("normal", payload("w"))
    turns.add("normal", "not json")
    turns.add("normal", json.dumps({"workspace_id": "../etc"}))
    first, second = turns.take(), turns.take()
    assert first is not None and first.payload == "not json" and first.workspace == ""
    assert second is not None and second.workspace == ""
    turns.hold("x", first)
    assert not turns.release("x")


@pytest.mark.parametrize("seed", range(20))
def test_the_place_in_line_is_where_the_rules_take_it(seed: int) -> None:
    """`place` against taking every task in turn, for random lines of three tenants."""
    import random

    rng = random.Random(seed)
    turns = Turns()
    ids: list[str] = []
    for _ in range(rng.randint(1, 25)):
        tid = str(uuid.uuid4())
        token = rng.choice([A, B, None])
        turns.add("normal", payload(rng.choice(["p", "q", "r"]), token, tid))
        ids.append(tid)
    expected = {}
    said = {tid: turns.waiting(tid) for tid in ids}
    n = 0
    while (taken := turns.take()) is not None:
        n += 1
        expected[json.loads(taken.payload)["task_id"]] = n
    assert {tid: w.position for tid, w in said.items() if w is not None} == expected


def test_place_counts_each_tenant_before_and_after() -> None:
    line = [("A", [("a1", 3), ("a2", 2)]), ("B", [("b", 1)])]
    order = [("A", "a1", 0), ("B", "b", 0), ("A", "a2", 0), ("A", "a1", 1)]
    assert [place(line, *where) for where in order] == [1, 2, 3, 4]
