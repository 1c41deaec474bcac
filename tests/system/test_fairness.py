"""I7 as an attacker tries it: what one tenant sends must not stall the others or stop the daemon.

Issue 18, finding 7: the grep pattern was compiled with Python's `re` on the event loop (a
1,000-character case-insensitive class pattern takes over a second), and the Python walk
matched with `re` in a thread that holds the GIL through a catastrophic backtrack. Here tenant
A floods 24 greps with the worst patterns it can send, through the internal API and through the
public tools API with its own scoped token, or sends other input that was parsed without bound;
tenant B's plain calls must each be answered within a second meanwhile. The bound is the
issue's, and the old code misses it by seconds: a timed assertion with that much margin is the
point of these tests, not a benchmark. The daemon runs in the test's own event loop, so a
stall of the daemon's loop delays B's calls exactly as it would delay another client's.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio

from tests.conftest import Api, cmd, task_body, wait_for, wait_terminal
from tests.integration.test_api_public import problem

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


def worst(i: int) -> str:
    return (python_slow, re2_slow, lambda i: r"(x+x+)+y")[i % 3](i)


def patient(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """`client` waiting long enough to measure the old code's stall instead of timing out."""
    client.timeout = httpx.Timeout(300)
    return client


async def write(api: Api, workspace_id: str, path: str, content: str) -> None:
    async with api.internal_client() as c:
        r = await c.post(
            f"/workspaces/{workspace_id}/files/write", json={"path": path, "content": content}
        )
        assert r.status_code == 200, r.text


async def b_waits_while(api: Api, attack: Callable[[], Awaitable[None]]) -> list[tuple[str, float]]:
    """Tenant B's calls, each timed, from just before `attack` starts until it has ended.

    B lists the files of its workspace (internal API) and its tasks (public API, its own token).
    """
    _, token_b = await api.daemon.service.tokens.create("tenant-b", ["ws-b"])
    await write(api, "ws-b", "notes.md", "hello\n")
    latencies: list[tuple[str, float]] = []
    attacked = trio.Event()

    async def run_attack() -> None:
        await attack()
        attacked.set()

    async with (
        patient(api.internal_client()) as internal,
        patient(api.client(token_b)) as public,
        trio.open_nursery() as nursery,
    ):
        while not attacked.is_set() or len(latencies) < 6:
            start = time.monotonic()
            if not latencies:  # B's first call is timed before A begins: no stall unmeasured
                nursery.start_soon(run_attack)
            r = await internal.get("/workspaces/ws-b/files")
            latencies.append(("internal list_files", time.monotonic() - start))
            assert r.status_code == 200, r.text
            assert "notes.md" in [e["name"] for e in r.json()["entries"]]
            start = time.monotonic()
            r = await public.get("/api/tasks", params={"workspace_id": "ws-b"})
            latencies.append(("public list tasks", time.monotonic() - start))
            assert r.status_code == 200, r.text
    return latencies


def assert_b_answered_in_time(latencies: list[tuple[str, float]], attack: str) -> None:
    call, waited = max(latencies, key=lambda c: c[1])
    print(f"tenant B's slowest call while A {attack}: {call}, {waited:.3f} s")  # with -s
    assert waited < BOUND_S, (
        f"tenant B waited {waited:.2f} s for {call} while tenant A {attack} "
        f"({len(latencies)} calls)"
    )


@pytest.mark.parametrize("engine", ["ripgrep", "python"])
async def test_a_grep_flood_leaves_another_tenant_answered_within_a_second(
    api: Api, engine: str
) -> None:
    ops = api.daemon.service.workspace
    if engine == "python":
        ops.rg = None  # as on a host without ripgrep, or without the full sandbox
    _, token_a = await api.daemon.service.tokens.create("tenant-a", ["ws-a"])
    await write(api, "ws-a", "src/x.txt", f"{BACKTRACK_LINE}\nplain\n")
    await write(api, "ws-a", "src/y.py", "import os\n" * 1000)
    flooded: list[tuple[int, int, str]] = []

    async def grep_as_a(i: int, internal: httpx.AsyncClient, public: httpx.AsyncClient) -> None:
        if i % 2:
            r = await internal.get("/workspaces/ws-a/files/grep", params={"pattern": worst(i)})
        else:
            r = await public.post(
                "/api/tools/call",
                json={
                    "workspace_id": "ws-a",
                    "tool": "workspace_grep",
                    "arguments": {"pattern": worst(i)},
                },
            )
        flooded.append((i, r.status_code, r.text))

    async def flood() -> None:
        async with (
            patient(api.internal_client()) as internal,
            patient(api.client(token_a)) as public,
            trio.open_nursery() as nursery,
        ):
            for i in range(FLOOD):
                nursery.start_soon(grep_as_a, i, internal, public)

    latencies = await b_waits_while(api, flood)
    assert len(flooded) == FLOOD
    for i, status, text in flooded:
        # A is answered too: a search, or a refusal naming the pattern.
        assert status == 200 or (status == 422 and "pattern" in text), (i, status, text)
    assert_b_answered_in_time(latencies, f"flooded grep ({engine})")


async def test_greps_of_one_long_line_leave_another_tenant_answered(api: Api) -> None:
    """One line of 1.2 million `a` and the pattern `a`: ripgrep's `--json` record lists every
    match, 60 MB; decoded whole on the loop it held it 1.2-1.7 s per grep (a review's find)."""
    _, token_a = await api.daemon.service.tokens.create("tenant-a", ["ws-a"])
    await write(api, "ws-a", "a.txt", "a" * 1_200_000 + "\n")
    answers: list[httpx.Response] = []

    async def greps_as_a() -> None:
        async with patient(api.client(token_a)) as public, trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(grep_as_a, public)

    async def grep_as_a(public: httpx.AsyncClient) -> None:
        answers.append(
            await public.post(
                "/api/tools/call",
                json={
                    "workspace_id": "ws-a",
                    "tool": "workspace_grep",
                    "arguments": {"pattern": "a"},
                },
            )
        )

    latencies = await b_waits_while(api, greps_as_a)
    assert_b_answered_in_time(latencies, "grepped one long line")
    assert len(answers) == 12 and all(r.status_code == 200 for r in answers), answers[0].text
    assert answers[0].json()["result"]["matches"][0]["line"] == 1


async def test_a_long_quoted_git_argument_leaves_another_tenant_answered(api: Api) -> None:
    """`shlex.split` is quadratic in a quoted word: one megabyte took 6.5 s on the loop."""
    _, token_a = await api.daemon.service.tokens.create("tenant-a", ["ws-a"])
    await write(api, "ws-a", "f", "x\n")
    answers: list[httpx.Response] = []

    async def git_as_a() -> None:
        async with patient(api.client(token_a)) as public:
            answers.append(
                await public.post(
                    "/api/tools/call",
                    json={
                        "workspace_id": "ws-a",
                        "tool": "workspace_git",
                        "arguments": {"operation": "log", "args": "'" + "a" * 1_000_000 + "'"},
                    },
                )
            )

    latencies = await b_waits_while(api, git_as_a)
    assert_b_answered_in_time(latencies, "sent a long quoted git argument")
    assert problem(answers[0], 422)["errors"][0]["field"] == "arguments.args"


async def test_deeply_nested_json_is_a_clear_refusal_not_an_internal_error(api: Api) -> None:
    deep = b"[" * 100_000
    async with api.client() as public, api.internal_client() as internal:
        for r in (
            await public.post("/api/tasks/submit", content=deep),
            await public.post("/api/tools/call", content=deep),
            await internal.post("/workspaces/ws-a/exec", content=deep),
        ):
            assert "nested" in problem(r, 400)["detail"], r.text
        cursor = base64.urlsafe_b64encode(b"[" * 10_000).decode()
        r = await public.get("/api/tasks", params={"cursor": cursor})
        assert problem(r, 422)["errors"][0]["field"] == "cursor"


async def test_a_deeply_nested_metadata_file_does_not_stop_the_daemon(api: Api) -> None:
    """The workspace's metadata file lies in the tenant's tree: its commands can replace it."""
    meta = api.daemon.settings.volume_path / "ws-meta" / ".workspace_meta.json"
    plant = "head -c 1000000 /dev/zero | tr '\\0' '[' > m.new && mv -f m.new .workspace_meta.json"
    async with api.client() as public:
        for command in (plant, "true"):
            r = await public.post(
                "/api/tasks/submit", json=task_body(cmd(command), workspace_id="ws-meta")
            )
            assert r.status_code == 202, r.text
            record = await wait_terminal(api.daemon, r.json()["task_id"])
            assert record.status.value == "completed", record
        # The daemon's metadata writer read the planted file and wrote its own over it.
        await wait_for(lambda: meta.read_bytes()[:1] == b"{", timeout=10)
        assert (await public.get("/api/tasks")).status_code == 200


def many_small_values(i: int) -> bytes:
    """A submit body of about 9 MB (under the 10 MiB limit) that is 4.5 million small ints.

    Reading it is cheap; decoding it is not: Python's C parser holds the GIL through the whole
    array (about 0.15 s). Even bodies put the array in `steps` (a field that refuses it), odd
    ones in a field nobody reads, so that nothing but the decoding costs.
    """
    ints = b"[" + b"0," * 4_500_000 + b"0]"
    if i % 2:
        return b'{"workspace_id": "ws-a", "padding": ' + ints + b', "steps": []}'
    return b'{"workspace_id": "ws-a", "steps": ' + ints + b"}"


async def test_large_json_bodies_leave_another_tenant_answered_within_a_second(api: Api) -> None:
    _, token_a = await api.daemon.service.tokens.create("tenant-a", ["ws-a"])
    answers: list[tuple[int, httpx.Response]] = []

    async def submit_as_a(i: int, public: httpx.AsyncClient) -> None:
        r = await public.post(
            "/api/tasks/submit",
            content=many_small_values(i),
            headers={"Content-Type": "application/json"},
        )
        answers.append((i, r))

    async def flood() -> None:
        async with patient(api.client(token_a)) as public, trio.open_nursery() as nursery:
            for i in range(FLOOD):
                nursery.start_soon(submit_as_a, i, public)

    latencies = await b_waits_while(api, flood)
    assert_b_answered_in_time(latencies, "sent large JSON bodies of small values")
    assert len(answers) == FLOOD
    for i, r in answers:
        # A is answered too: its body is refused for holding too many values, a clear 400.
        assert "more than 50000 JSON values" in problem(r, 400)["detail"], (i, r.text)
