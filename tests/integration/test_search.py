"""Tenant regexes in grep: RE2's syntax and limits, explained refusals, and one answer from both
engines (ripgrep in the sandbox, the Python walk)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Api
from tests.integration.test_api_public import problem
from tests.system.test_fairness import python_slow, re2_slow
from wsrunner.errors import ValidationError
from wsrunner.workspace import search


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        (r"(a)\1", "backreferences (\\1 to \\9) are not supported"),
        (r"(?P<x>a)(?P=x)", "named backreferences ((?P=name)) are not supported"),
        (r"(?<x>a)\k<x>", "named backreferences (\\k<name>) are not supported"),
        (r"foo(?=bar)", "look-ahead ((?=...)) is not supported"),
        (r"foo(?!bar)", "negative look-ahead ((?!...)) is not supported"),
        (r"(?<=foo)bar", "look-behind ((?<=...)) is not supported"),
        (r"(?<!foo)bar", "negative look-behind ((?<!...)) is not supported"),
        (r"(?>a+)b", "atomic groups ((?>...)) are not supported"),
        (r"a++b", "possessive repetitions (++, *+, ?+) are not supported"),
        (r"end\Z", "\\Z is not supported; \\z is the end of the line"),
        (r"a{1001}", "a repetition count is over 1000"),
        (r"(a{100}){100}", "a repetition count is over 1000"),
        (r"\pL{300}", "it compiles to more than RE2's 2048 KiB"),
        (r"(?i)(\pL|\pN){200}", "it compiles to more than RE2's 2048 KiB"),
        ("\\p{L}" * 17, "expected at most 16 Unicode classes (\\p, \\P), found 17"),
        (r"a\Cb", "\\C (one byte) is not supported; ripgrep refuses it"),
        (r"\Qa.b\E", "\\Q...\\E (a quoted literal) is not supported; ripgrep refuses it"),
        ("a\nb", "on one line"),
        ("a" * 1001, "at most 1000 characters"),
        ("(", "not a valid regular expression: missing ): ("),
        (r"\u12", "not a valid regular expression: invalid escape sequence: \\u"),
    ],
)
def test_what_re2_cannot_do_is_refused_naming_the_pattern_and_what(pattern: str, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        search.check(pattern, None, 50)
    assert caught.value.field == "pattern"
    assert says in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    ("pattern", "line"),
    [
        (r"caf\u00e9", "café"),
        (r"caf\u{e9}", "café"),
        (r"caf\U000000e9", "café"),
        (r"\U{1F600}", "😀"),
        (r"\\u00e9", "\\u00e9"),
        (r"\x{e9}", "é"),
    ],
)
def test_ripgreps_unicode_escapes_mean_the_same_to_re2(pattern: str, line: str) -> None:
    regex = search.check(pattern, None, 50).regex
    assert regex.search(line.encode()) is not None
    assert regex.search(b"cafe") is None


def test_the_worst_patterns_found_cost_milliseconds_to_compile() -> None:
    """Python's re took over a second on each python_slow pattern (issue 18, finding 7)."""
    slowest, refused = 0.0, set()
    for i in range(24):
        for pattern in (python_slow(i), re2_slow(i)):
            start = time.perf_counter()
            try:
                search.check(pattern, None, 50)
            except ValidationError as exc:
                refused.add(exc.message.split(";")[0])
            slowest = max(slowest, time.perf_counter() - start)
    assert slowest < 0.25, f"the slowest pattern took {slowest:.3f} s to compile"
    assert refused == {"it compiles to more than RE2's 2048 KiB"}


def test_the_walk_skips_a_line_too_long_for_the_patterns_size(tmp_path: Path) -> None:
    """RE2's slowest engine is linear, but in the line's length times the program's size."""
    (tmp_path / "f").write_text("aQ\n" + "b" * 500_000 + "Q\n")
    heavy = search.check(r"(.{0,999})Q", None, 50)
    assert len("b" * 500_000) > search.MATCH_BUDGET // heavy.regex.programsize
    found, complete = search._walk(str(tmp_path), ".", heavy, deadline=float("inf"))
    assert [m["line"] for m in found] == [1] and not complete
    light = search.check("Q", None, 50)
    found, complete = search._walk(str(tmp_path), ".", light, deadline=float("inf"))
    assert [m["line"] for m in found] == [1, 2] and complete


FILES = {
    "a.txt": "Café au lait\nCAFÉ\ncafe\nnaïve ÉCOLE école\nKelvin and \u017f\n".encode(),
    "b.py": b"def f(x):\n    return x  # TODO\n\tindented\r\nlast line, no newline",
    "latin1.txt": b"caf\xe9 in latin-1\ncafe in ascii\n",
    "sub/dir/c.md": b"# Title\n- [x] done\n- [ ] todo 42\n",
    ".hidden": "secret café\n".encode(),
}
PATTERNS = [
    "café",
    "(?i)café",
    "(?i)CAFÉ",
    r"\x{e9}",
    r"\u00e9",
    r"caf.$",
    r"^\s+",
    r"\d+",
    r"TODO$",
    r"^-\s\[[ x]\]",
    r"\pL+ \pL+",
    r"(?i)[a-zé]+ole",
    r"e\b",
    r"x\s*#",
    "lait|todo",
    r"[[:upper:]]{4}",
    r"(?i)\x{212A}",
    r"(?i)S",
    "(?i)ñ|é",
    r"(x+x+)+y",
    python_slow(0),
    "caf",
]


async def test_ripgrep_and_the_walk_give_the_same_matches(api: Api) -> None:
    ops = api.daemon.service.workspace
    base = api.daemon.settings.volume_path / "ws-same"
    async with api.internal_client() as c:  # creates the workspace
        await c.post("/workspaces/ws-same/files/write", json={"path": "x", "content": ""})
    for rel, data in FILES.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    saved = ops.rg
    for args in [(p,) for p in PATTERNS] + [("caf", ".", "*.txt"), ("o", "sub", "*.md")]:
        ops.rg = saved
        with_rg = await ops.grep("ws-same", *args)
        ops.rg = None
        try:
            walked = await ops.grep("ws-same", *args)
        finally:
            ops.rg = saved
        assert with_rg["engine"] == "ripgrep" and walked["engine"] == "python"
        assert with_rg["matches"] == walked["matches"], args
        assert with_rg["truncated"] == walked["truncated"], args
    # Not vacuous: the Unicode cases do match, and a line that is not UTF-8 is left out by both.
    found = (await ops.grep("ws-same", "(?i)CAFÉ"))["matches"]
    assert [(m["file"], m["line"]) for m in found] == [(".hidden", 1), ("a.txt", 1), ("a.txt", 2)]
    found = (await ops.grep("ws-same", "caf", ".", "*.txt"))["matches"]
    assert [(m["file"], m["line"]) for m in found] == [("a.txt", 3), ("latin1.txt", 2)]


async def test_a_line_whose_ripgrep_record_is_huge_matches_as_in_the_walk(api: Api) -> None:
    """One long line with a match in every few characters makes a `--json` record of megabytes
    (each submatch listed); it is read in part, off the loop, and gives the walk's match."""
    ops = api.daemon.service.workspace
    base = api.daemon.settings.volume_path / "ws-long"
    async with api.internal_client() as c:
        await c.post("/workspaces/ws-long/files/write", json={"path": "x", "content": ""})
    line = 'a"b\\c\td\x01é😀' * 30_000  # quotes, backslashes, escapes, surrogate pairs
    (base / "long.txt").write_text(f"short a\n{line}\nend a\n", encoding="utf-8")
    saved = ops.rg
    for pattern in ("a", "é", "😀"):
        with_rg = await ops.grep("ws-long", pattern)
        ops.rg = None
        try:
            walked = await ops.grep("ws-long", pattern)
        finally:
            ops.rg = saved
        assert with_rg["engine"] == "ripgrep" and walked["engine"] == "python"
        assert with_rg["matches"] == walked["matches"], pattern
    assert [m["line"] for m in with_rg["matches"]] == [2]
    assert len(with_rg["matches"][0]["content"]) == 500


async def test_refusals_through_both_apis_name_the_pattern(api: Api) -> None:
    async with api.internal_client() as c, api.client() as public:
        await c.post("/workspaces/ws-re/files/write", json={"path": "f", "content": "x\n"})
        r = await c.get("/workspaces/ws-re/files/grep", params={"pattern": r"(a)\1"})
        body = problem(r, 422)
        assert body["errors"][0]["field"] == "pattern"
        assert "backreferences" in body["detail"], body
        r = await public.post(
            "/api/tools/call",
            json={
                "workspace_id": "ws-re",
                "tool": "workspace_grep",
                "arguments": {"pattern": "(?<=a)b"},
            },
        )
        body = problem(r, 422)
        assert body["errors"][0]["field"] == "arguments.pattern"
        assert "look-behind" in body["detail"], body
        # RE2 takes this one (its \w is ASCII); ripgrep's Unicode \w{200} is over its limit.
        r = await c.get("/workspaces/ws-re/files/grep", params={"pattern": r"\w{200}"})
        body = problem(r, 422)
        assert body["errors"][0]["field"] == "pattern"
        assert (
            "ripgrep cannot search with it: Compiled regex exceeds size limit" in (body["detail"])
        ), body
