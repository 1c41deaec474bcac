"""The internal API (files, exec, grep, git) served by a real daemon, through httpx."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
from httpx_sse import aconnect_sse

from tests.conftest import INTERNAL_TOKEN, Api, git_repo, host_pids, unique_seconds, wait_for
from tests.integration.test_api_public import problem
from wsrunner.workspace import search
from wsrunner.workspace.operations import git_arguments

WS = "/workspaces/ws-int"


def root(api: Api) -> Path:
    return api.daemon.settings.volume_path / "ws-int"


async def test_token_is_required_except_for_health(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.internal) as anon:
        assert (await anon.get("/health")).json()["status"] == "healthy"
        assert (await anon.get("/openapi.json")).status_code == 200
        for headers in (
            {},
            {"X-Internal-Token": "wrong"},
            {"X-Internal-Token": INTERNAL_TOKEN + "x"},
        ):
            r = await anon.get(f"{WS}/files", headers=headers)
            body = problem(r, 401)
            assert body["error"] == body["detail"]  # where the reference's clients read it
            r = await anon.post(f"{WS}/exec", json={"command": "touch /tmp/never"}, headers=headers)
            problem(r, 401)


async def test_write_read_list_round_trip(api: Api) -> None:
    async with api.internal_client() as c:
        r = await c.post(
            f"{WS}/files/write", json={"path": "src/deep/a.py", "content": "print(1)\n"}
        )
        assert r.json() == {"written": True, "path": "src/deep/a.py", "size_bytes": 9}
        r = await c.get(f"{WS}/files/content", params={"path": "src/deep/a.py"})
        body = r.json()
        assert body["content"] == "print(1)\n" and body["encoding"] == "utf-8"
        assert body["language"] == "python" and body["size"] == 9 and not body["binary"]
        (root(api) / "blob.bin").write_bytes(b"\x00\x01\xffdata")
        body = (await c.get(f"{WS}/files/content", params={"path": "blob.bin"})).json()
        assert body["binary"] and body["encoding"] == "base64" and body["content"] == "AAH/ZGF0YQ=="
        listing = (await c.get(f"{WS}/files")).json()
        names = [e["name"] for e in listing["entries"]]
        assert names[:3] == ["artifacts", "repos", "src"] and "blob.bin" in names
        assert not {"tasks", ".workspace_meta.json", ".wsrunner_meta.lock"} & set(names)
        sub = (await c.get(f"{WS}/files", params={"path": "src"})).json()
        assert sub["entries"][0]["path"] == "src/deep" and sub["entries"][0]["type"] == "dir"


async def test_file_errors(api: Api) -> None:
    async with api.internal_client() as c:
        await c.post(f"{WS}/files/write", json={"path": "a.txt", "content": "x"})
        problem(await c.get(f"{WS}/files/content", params={"path": "missing.txt"}), 404)
        problem(await c.get("/workspaces/nobody/files"), 404)
        problem(await c.get(f"{WS}/files/content"), 422)
        problem(await c.get(f"{WS}/files/content", params={"path": "src"}), 404)
        (root(api) / "big").write_bytes(b"x" * (2 * 1024 * 1024 + 1))
        assert (
            "2097152"
            in problem(await c.get(f"{WS}/files/content", params={"path": "big"}), 413)["detail"]
        )
        r = await c.post(f"{WS}/files/write", json={"path": "b.txt", "content": 5})
        assert problem(r, 422)["errors"][0]["field"] == "content"
        problem(await c.post(f"{WS}/files/write", content=b"nope"), 400)


@pytest.mark.parametrize(
    "path",
    [
        "../outside",
        "/etc/passwd",
        "a/../../x",
        "%2e%2e/x",
        "link-out/passwd",
        "link-out",
        "tasks/x",
        ".workspace_meta.json",
        "~root",
    ],
)
async def test_containment_on_every_file_endpoint(api: Api, path: str) -> None:
    async with api.internal_client() as c:
        await c.post(f"{WS}/files/write", json={"path": "ok.txt", "content": "x"})
        link = root(api) / "link-out"
        if not link.is_symlink():
            link.symlink_to("/etc")
        raw = f"path={path}"  # sent as typed: %2e%2e reaches the server encoded
        for r in (
            await c.get(f"{WS}/files?{raw}"),
            await c.get(f"{WS}/files/content?{raw}"),
            await c.get(f"{WS}/files/grep?pattern=root&{raw}"),
            await c.post(
                f"{WS}/files/write", json={"path": path.replace("%2e", "."), "content": "pwn"}
            ),
            await c.post(f"{WS}/exec", json={"command": "pwd", "cwd": path.replace("%2e", ".")}),
            await c.post(
                f"{WS}/git", json={"operation": "status", "cwd": path.replace("%2e", ".")}
            ),
        ):
            # 403 refused, 404 not found; 422 for writing over the symlink itself
            assert r.status_code in (403, 404, 422), (r.request.url, r.text)
            assert r.headers["content-type"] == "application/problem+json"
    assert not Path("/etc/pwn").exists() and not (root(api).parent / "outside").exists()


async def test_workspace_ids_in_the_path_are_validated(api: Api) -> None:
    async with api.internal_client() as c:
        for ws in ("%2e%2e", "..", "a%2fb", "-x"):
            r = await c.get(f"/workspaces/{ws}/files")
            assert r.status_code in (404, 422), (ws, r.text)


async def test_exec_results_and_timeouts(api: Api, tmp_path: Path) -> None:
    async with api.internal_client() as c:
        r = await c.post(f"{WS}/exec", json={"command": "echo out; echo err >&2; exit 3"})
        body = r.json()
        assert r.status_code == 200 and body["exit_code"] == 3
        assert (
            body["stdout"] == "out\n"
            and body["stderr"] == "err\n"
            and body["error"] == "exit code 3"
        )
        await c.post(f"{WS}/files/write", json={"path": "d/f", "content": ""})
        assert (
            (await c.post(f"{WS}/exec", json={"command": "pwd", "cwd": "d"}))
            .json()["stdout"]
            .endswith("/ws-int/d\n")
        )
        env = (await c.post(f"{WS}/exec", json={"command": "env"})).json()["stdout"]
        assert INTERNAL_TOKEN not in env and "DATABASE_URL" not in env
        t = unique_seconds()
        async with trio.open_nursery() as nursery:
            replies: list[httpx.Response] = []

            async def run() -> None:
                body = {"command": f"sleep {t} & sleep {t}; wait", "timeout": 2}
                replies.append(await c.post(f"{WS}/exec", json=body))

            nursery.start_soon(run)
            await wait_for(lambda: len(host_pids(t)) == 2, timeout=5)
        body = replies[0].json()
        assert body["timed_out"] and body["exit_code"] == -1
        await wait_for(lambda: not host_pids(t), timeout=5)
        for bad in (
            {"command": ""},
            {"command": "true", "timeout": 0},
            {"command": "true", "timeout": 601},
            {"command": ["ls"]},
            {"command": "true", "timeout": "5"},
        ):
            problem(await c.post(f"{WS}/exec", json=bad), 422)


async def test_exec_stream_sends_output_then_the_result(api: Api) -> None:
    async with api.internal_client() as c:
        events = []
        body = {"command": "echo a; sleep 0.7; echo b >&2; exit 1"}
        async with aconnect_sse(c, "POST", f"{WS}/exec/stream", json=body) as source:
            async for ev in source.aiter_sse():
                events.append((ev.event, json.loads(ev.data)))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "exit" and set(kinds[:-1]) == {"output"}
    assert [d["text"] for k, d in events if k == "output"] == ["a\n", "b\n"]
    assert events[-1][1]["exit_code"] == 1 and events[-1][1]["stdout"] == "a\n"


async def test_exec_stream_disconnect_kills_the_command(api: Api) -> None:
    t = unique_seconds()
    async with api.internal_client() as c:
        body = {"command": f"echo started; exec sleep {t}"}
        async with c.stream("POST", f"{WS}/exec/stream", json=body) as r:
            async for chunk in r.aiter_bytes():
                if b"started" in chunk:
                    break
            await wait_for(lambda: len(host_pids(t)) == 1, timeout=5)
        await wait_for(lambda: not host_pids(t), timeout=10)
        problem(await c.post(f"{WS}/exec/stream", json={"command": ""}), 422)


async def test_grep(api: Api) -> None:
    async with api.internal_client() as c:
        for path, text in (
            ("src/a.py", "import os\nx = 1\nimport re\n"),
            ("src/b.txt", "import nothing\n"),
            ("README", "no match\n"),
        ):
            await c.post(f"{WS}/files/write", json={"path": path, "content": text})
        (root(api) / "tasks" / "secret").write_text("import secret\n")
        r = await c.get(f"{WS}/files/grep", params={"pattern": r"^import \w+"})
        body = r.json()
        assert [(m["file"], m["line"]) for m in body["matches"]] == [
            ("src/a.py", 1),
            ("src/a.py", 3),
            ("src/b.txt", 1),
        ]
        assert body["total"] == 3 and not body["truncated"] and body["engine"] == "ripgrep"
        body = (
            await c.get(f"{WS}/files/grep", params={"pattern": "import", "include": "*.py"})
        ).json()
        assert {m["file"] for m in body["matches"]} == {"src/a.py"}
        body = (
            await c.get(f"{WS}/files/grep", params={"pattern": "import", "max_results": "1"})
        ).json()
        assert len(body["matches"]) == 1 and body["truncated"] and body["total"] == 3
        for params, field in (
            ({"pattern": "("}, "pattern"),
            ({}, "pattern"),
            ({"pattern": "x", "max_results": "500"}, "max_results"),
            ({"pattern": "x", "max_results": "many"}, "max_results"),
        ):
            assert (
                problem(await c.get(f"{WS}/files/grep", params=params), 422)["errors"][0]["field"]
                == field
            )


async def test_grep_fallback_gives_the_same_results_as_ripgrep(api: Api) -> None:
    ops = api.daemon.service.workspace
    files = {
        "a/x.py": "alpha\nbeta alpha\n",
        "a/.hidden": "alpha\n",
        "b/y.md": "ALPHA alpha\r\n",
        ".git/config": "alpha\n",
        "bin.dat": "alpha\x00\n",
        "z": "gamma\n",
    }
    base = root(api)
    for rel, text in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    (base / "link.py").symlink_to(base / "a" / "x.py")
    for args in (("alpha",), ("alpha", "a"), ("alpha", ".", "*.py"), ("^b",)):
        with_rg = await ops.grep("ws-int", *args)
        ops.rg, saved = None, ops.rg
        try:
            fallback = await ops.grep("ws-int", *args)
        finally:
            ops.rg = saved
        assert with_rg["engine"] == "ripgrep" and fallback["engine"] == "python"
        assert with_rg["matches"] == fallback["matches"] and with_rg["matches"], args
    assert all(m["file"] not in (".git/config", "bin.dat", "link.py") for m in with_rg["matches"])


async def test_git_operations(api: Api, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    git_repo(origin, {"f": "1\n"}, "c1")
    async with api.internal_client() as c:
        r = await c.post(
            f"{WS}/git", json={"operation": "clone", "args": f"file://{origin}", "branch": "main"}
        )
        assert r.json()["exit_code"] == 0 and r.json()["repo_path"] == "repos/origin", r.text
        (root(api) / "repos" / "origin" / "f").write_text("2\n")
        # A hook in the repository must not run: hooks are off for API git operations.
        hook = root(api) / "repos" / "origin" / ".git" / "hooks" / "pre-commit"
        hook.write_text(f"#!/bin/sh\ntouch {root(api)}/hook-ran\n")
        hook.chmod(0o755)
        status = (
            await c.post(
                f"{WS}/git", json={"operation": "status", "cwd": "repos/origin", "args": "--short"}
            )
        ).json()
        assert status["stdout"] == " M f\n" and status["operation"] == "status"
        await c.post(f"{WS}/git", json={"operation": "add", "cwd": "repos/origin", "args": ["f"]})
        commit = (
            await c.post(
                f"{WS}/git",
                json={"operation": "commit", "cwd": "repos/origin", "args": ["-m", "two words"]},
            )
        ).json()
        assert commit["exit_code"] == 0, commit
        log = (
            await c.post(
                f"{WS}/git", json={"operation": "log", "cwd": "repos/origin", "args": "--format=%s"}
            )
        ).json()
        assert log["stdout"] == "two words\nc1\n"
        assert not (root(api) / "hook-ran").exists()
        for body, field in (
            ({"operation": "gc"}, "operation"),
            ({"operation": "diff", "args": "--output=/tmp/x"}, "args[0]"),
            ({"operation": "diff", "args": ["--no-index", "/etc/passwd", "f"]}, "args[0]"),
            ({"operation": "fetch", "args": "--upload-pack=touch /tmp/x origin"}, "args[0]"),
            ({"operation": "clone", "args": "-u touch x"}, "args[0]"),
            ({"operation": "log", "args": "-c core.pager=x"}, "args[0]"),
            ({"operation": "pull", "args": "--upl=x"}, "args[0]"),
            ({"operation": "status", "args": {"a": 1}}, "args"),
            ({"operation": "status", "args": "'unclosed"}, "args"),
        ):
            r = await c.post(f"{WS}/git", json={"cwd": "repos/origin", **body})
            assert problem(r, 422)["errors"][0]["field"] == field, body


def test_git_arguments_allow_ordinary_options() -> None:
    assert git_arguments("log", "--oneline -n 5 -- 'a b'") == ["--oneline", "-n", "5", "--", "a b"]
    assert git_arguments("push", "-u origin main") == ["-u", "origin", "main"]  # --set-upstream
    assert git_arguments("diff", ["--", "--output=x"]) == ["--", "--output=x"]  # a path after --


async def test_write_respects_the_quota(start_daemon) -> None:
    daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
        workspace_quotas={"ws-int": 64 * 1024},
    )
    async with httpx.AsyncClient(
        base_url=daemon.urls[1], headers={"X-Internal-Token": INTERNAL_TOKEN}
    ) as c:
        r = await c.post(f"{WS}/files/write", json={"path": "big", "content": "x" * 100_000})
        assert "quota" in problem(r, 507)["detail"]
        assert (
            await c.post(f"{WS}/files/write", json={"path": "small", "content": "x"})
        ).status_code == 200


async def test_stop_ends_open_streams_at_once(start_daemon, tmp_path: Path) -> None:
    daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
    )
    async with httpx.AsyncClient(
        base_url=daemon.urls[1], headers={"X-Internal-Token": INTERNAL_TOKEN}, timeout=30
    ) as c:
        body = {"command": "echo started; exec sleep 100"}
        # The hub ends the stream: a clean end of the chunked body. Left to Hypercorn's graceful
        # timeout it would be cut instead, and httpx would raise RemoteProtocolError.
        async with c.stream("POST", f"{WS}/exec/stream", json=body) as r:
            async for chunk in r.aiter_bytes():
                if b"started" in chunk:
                    daemon.stop()
    await wait_for(lambda: daemon.slots.statistics().running == 0)


async def test_exec_waits_for_a_command_slot_then_503(start_daemon, monkeypatch) -> None:
    monkeypatch.setattr("wsrunner.workspace.operations.SLOT_WAIT_S", 0.5)
    daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
        concurrency=1,
    )
    headers = {"X-Internal-Token": INTERNAL_TOKEN}
    async with httpx.AsyncClient(base_url=daemon.urls[1], headers=headers, timeout=30) as c:
        first: list[httpx.Response] = []

        async def hold_the_slot() -> None:
            first.append(await c.post(f"{WS}/exec", json={"command": "sleep 2"}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_the_slot)
            await trio.sleep(0.5)
            # (another workspace: the first call holds this one's writer turn)
            r = await c.post("/workspaces/ws-other/exec", json={"command": "true"})
            body = problem(r, 503)
            assert "command slots" in body["detail"] and r.headers["retry-after"] == "5"
        assert first[0].status_code == 200 and first[0].json()["exit_code"] == 0


def test_fallback_search_stops_at_its_deadline(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"f{i}").write_text("needle\n")
    query = search.check("needle", None, 50)
    assert search._walk(str(tmp_path), ".", query, deadline=0.0) == ([], False)
    found, complete = search._walk(str(tmp_path), ".", query, deadline=float("inf"))
    assert complete and sorted(m["file"] for m in found) == ["f0", "f1", "f2"]
