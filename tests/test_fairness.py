"""I7 as an attacker tries it: one tenant's grep flood must not stall another tenant's API.

Issue 18, finding 7: the grep pattern was compiled with Python's `re` on the event loop (a
1,000-character case-insensitive class pattern takes over a second), and the Python walk
matched with `re` in a thread that holds the GIL through a catastrophic backtrack. Tenant A
floods 24 greps with the worst patterns it can send, through the internal API and through the
public tools API with its own scoped token; tenant B's plain calls must each be answered
within a second meanwhile. The bound is the issue's, and the old code misses it by tens of
seconds: a timed assertion with that much margin is the point of the test, not a benchmark.
"""

from __future__ import annotations

import time

import httpx
import pytest
import trio

from tests.conftest import Api

FLOOD = 24
BOUND_S = 1.0  #: the issue's bound on B's latency
BACKTRACK_LINE = "x" * 25  #: `(x+x+)+y` takes Python's re about a second on it


def python_slow(i: int) -> str:
    """999 characters that Python's re compiles in about a second; RE2 in microseconds.

    Each case-insensitive range up to U+FFFF makes re fold the case of every character in it;
    `i` shifts them all, so that re's compile cache never answers.
    """
    return "(?i)[" + "".join(chr(0x101 + i + k) + "-\uffff" for k in range(331)) + "]"


def re2_slow(i: int) -> str:
    """The most RE2 work found in a pattern: Unicode classes, case-folded, repeated."""
    return rf"(?i)(\pL|\pN){{{200 + i}}}" if i % 2 else "(?i)" + r"\PL" * 16 + "[^a]" * (i + 1)


def patient(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """`client` waiting long enough to measure the old code's stall instead of timing out."""
    client.timeout = httpx.Timeout(300)
    return client


def worst(i: int) -> str:
    return (python_slow, re2_slow, lambda i: r"(x+x+)+y")[i % 3](i)


@pytest.mark.parametrize("engine", ["ripgrep", "python"])
async def test_a_grep_flood_leaves_another_tenant_answered_within_a_second(
    api: Api, engine: str
) -> None:
    ops = api.daemon.service.workspace
    if engine == "python":
        ops.rg = None  # as on a host without ripgrep, or without the full sandbox
    _, token_a = await api.daemon.service.tokens.create("tenant-a", ["ws-a"])
    _, token_b = await api.daemon.service.tokens.create("tenant-b", ["ws-b"])
    async with api.internal_client() as internal:
        for ws, path, text in (("ws-a", "src/x.txt", f"{BACKTRACK_LINE}\nplain\n"),
                               ("ws-a", "src/y.py", "import os\n" * 1000),
                               ("ws-b", "notes.md", "hello\n")):  # fmt: skip
            r = await internal.post(f"/workspaces/{ws}/files/write",
                                    json={"path": path, "content": text})  # fmt: skip
            assert r.status_code == 200, r.text
    flooded: list[tuple[int, int, str]] = []
    latencies: list[tuple[str, float]] = []
    flood_done = trio.Event()

    async def grep_as_a(i: int, internal: httpx.AsyncClient, public: httpx.AsyncClient) -> None:
        if i % 2:
            r = await internal.get("/workspaces/ws-a/files/grep", params={"pattern": worst(i)})
        else:
            r = await public.post("/api/tools/call", json={
                "workspace_id": "ws-a", "tool": "workspace_grep",
                "arguments": {"pattern": worst(i)}})  # fmt: skip
        flooded.append((i, r.status_code, r.text))

    async def flood() -> None:
        async with (
            patient(api.internal_client()) as internal,
            patient(api.client(token_a)) as public,
            trio.open_nursery() as nursery,
        ):
            for i in range(FLOOD):
                nursery.start_soon(grep_as_a, i, internal, public)
        flood_done.set()

    async with (
        patient(api.internal_client()) as internal,
        patient(api.client(token_b)) as public,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(flood)
        await trio.lowlevel.checkpoint()  # A's requests are under way first
        while not flood_done.is_set() or len(latencies) < 6:
            start = time.monotonic()
            r = await internal.get("/workspaces/ws-b/files")
            latencies.append(("internal list_files", time.monotonic() - start))
            assert r.status_code == 200, r.text
            assert "notes.md" in [e["name"] for e in r.json()["entries"]]
            start = time.monotonic()
            r = await public.get("/api/tasks", params={"workspace_id": "ws-b"})
            latencies.append(("public list tasks", time.monotonic() - start))
            assert r.status_code == 200, r.text

    assert len(flooded) == FLOOD
    for i, status, text in flooded:
        # A is answered too: a search, or a refusal naming the pattern.
        assert status == 200 or (status == 422 and "pattern" in text), (i, status, text)
    worst_call, worst_s = max(latencies, key=lambda c: c[1])
    assert worst_s < BOUND_S, (
        f"tenant B waited {worst_s:.2f} s for {worst_call} while tenant A flooded grep "
        f"({len(latencies)} calls)"
    )
