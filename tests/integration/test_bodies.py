"""frontend.bodies: a large request body decodes exactly as `json.loads` decodes it, value for
value and error for error, within its limits; and through the API, a large body still works."""

from __future__ import annotations

import json
import random

import pytest

from frontend import bodies
from frontend.bodies import INLINE_BYTES, MAX_DEPTH, MAX_VALUES, BodyLimitError
from tests.conftest import Api
from tests.integration.test_api_public import problem

VALID = [
    "0",
    "-0",
    "-12.5e-3",
    "1E400",
    "123456789012345678901234567890",
    "true",
    "false",
    "null",
    "NaN",
    "-Infinity",
    "Infinity",
    '""',
    '"a\\"b\\\\c\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00"',
    '"\\ud800"',
    '"é€😀"',
    "[]",
    "{}",
    " [ ] ",
    "\t{\n}\r",
    "[[[]]]",
    "[{}, [], {}]",
    '{"a": 1, "b": [1, 2.0, "x", null, true, {"c": {}}], "a": 2}',
    '{"": {"": [""]}}',
    '[1,2,3,{"k":[4,5,{"m":[6]}]},7]',
    '  {"a" : [ 1 , { "b" : [ ] } ] , "c" : "d" }  ',
    '{"x": [1, 2], "x": {"y": 3}, "z": [[], [[]], [{}]]}',
    "[1e5, 0.5, -0.0, 10E-2]",
]

INVALID = [
    "",
    " ",
    "[",
    "]",
    "{",
    "[1,]",
    "[,1]",
    "[1 2]",
    "[1,,2]",
    '{"a"}',
    '{"a":}',
    '{"a" 1}',
    '{"a":1,}',
    "{1:2}",
    "{'a':1}",
    '{"a":1 "b":2}',
    "[1]]",
    "[1] x",
    "[1]\n[2]",
    "tru",
    "[nul]",
    "01",
    "1.",
    "-",
    "+1",
    ".5",
    '"abc',
    '"\\x"',
    '"a\nb"',
    '"\\ud83d',
    '["\\u12"]',
    '{"a":[1,2}',
    '[{"a":1]',
    "\ufeff[]",
    "[1" + "0" * 5000 + "]",
    '["a"\t"b"]',
    "[-]",
]


def outcome(decode: object, raw: bytes) -> str:
    """What decoding `raw` gives: the value's repr (types, order, NaN) or the error."""
    try:
        return "value " + repr(decode(raw))  # type: ignore[operator]
    except ValueError as exc:
        return f"error {type(exc).__name__}: {exc}"


@pytest.mark.parametrize("text", VALID + INVALID)
def test_decode_is_json_loads(text: str) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    assert outcome(bodies.decode, raw) == outcome(json.loads, raw)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32-be", "latin-1"])
def test_decode_reads_the_encodings_json_loads_reads(encoding: str) -> None:
    raw = '{"é": ["ü", 1]}'.encode(encoding)  # latin-1: not UTF-8, an error
    assert outcome(bodies.decode, raw) == outcome(json.loads, raw)


def test_decode_matches_json_loads_on_mutated_documents() -> None:
    """Every prefix, and random edits, of documents: the same value or the same error."""
    rng = random.Random(18)
    alphabet = '[]{}",:0123456789.-+eEtruefalsnNI \n\\ua'
    for text in VALID[-6:]:
        for cut in range(len(text) + 1):
            raw = text[:cut].encode()
            assert outcome(bodies.decode, raw) == outcome(json.loads, raw), raw
        for _ in range(400):
            chars = list(text)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(chars) + 1)
                if rng.random() < 0.5 and at < len(chars):
                    del chars[at]
                else:
                    chars.insert(at, rng.choice(alphabet))
            raw = "".join(chars).encode()
            assert outcome(bodies.decode, raw) == outcome(json.loads, raw), raw


def test_the_limits_are_counted_exactly() -> None:
    fits = b"[" + b"0," * (MAX_VALUES - 2) + b"0]"  # the array and its elements
    assert len(bodies.decode(fits)) == MAX_VALUES - 1
    with pytest.raises(BodyLimitError, match=f"more than {MAX_VALUES} JSON values"):
        bodies.decode(b"[" + b"0," * (MAX_VALUES - 1) + b"0]")
    with pytest.raises(BodyLimitError, match=f"more than {MAX_VALUES} JSON values"):
        bodies.decode(b'{"a": [' + b"[[]]," * MAX_VALUES + b"[]]}")
    deepest = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert bodies.decode(deepest) == json.loads(deepest)
    with pytest.raises(BodyLimitError, match="nested too deeply"):
        bodies.decode(b'{"a": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}")
    # A body the event loop decodes itself cannot hold more values than a large one may.
    assert (INLINE_BYTES + 1) // 2 < MAX_VALUES


async def test_loads_decodes_small_bodies_inline_and_large_ones_alike() -> None:
    small = json.dumps({"content": "x" * (INLINE_BYTES - 100), "n": [1, 2.5]}).encode()
    large = json.dumps({"content": "é\n" * INLINE_BYTES, "steps": [{"a": [None]}] * 9}).encode()
    assert len(small) <= INLINE_BYTES < len(large)
    for raw in (small, large):
        assert await bodies.loads(raw) == json.loads(raw)


async def test_a_large_body_works_through_both_apis(api: Api) -> None:
    content = 'line, with {json} [brackets] and "quotes"\n' * 40_000  # 1.7 MB
    async with api.client() as public, api.internal_client() as internal:
        r = await public.post(
            "/api/tools/call",
            json={
                "workspace_id": "ws-big",
                "tool": "workspace_write_file",
                "arguments": {"path": "big.txt", "content": content},
            },
        )
        assert r.status_code == 200, r.text
        r = await internal.post(
            "/workspaces/ws-big/files/write", json={"path": "again.txt", "content": content}
        )
        assert r.status_code == 200, r.text
        for name in ("big.txt", "again.txt"):
            r = await internal.get("/workspaces/ws-big/files/content", params={"path": name})
            assert r.status_code == 200 and r.json()["content"] == content, r.text[:200]
        r = await public.post("/api/tasks/submit", content=b'{"steps": [1, 2' + b" " * 100_000)
        assert "not valid JSON: Expecting ',' delimiter" in problem(r, 400)["detail"]
