"""Request bodies decoded as JSON with a bound on what one body costs the event loop (I7).

Python's C JSON parser holds the GIL for a whole document, and a body of millions of small
values (numbers, empty lists) keeps it for a large fraction of a second, longer when the
garbage collector walks the lists it creates; running that call in a thread does not help,
since no other thread, the event loop's included, runs until it returns. A body of at most
`INLINE_BYTES` is decoded on the loop by that parser, the fastest way for the bodies the APIs
are made for. A larger one is decoded by `decode`, one value at a time, in a worker thread,
one body at a time: Python code runs between values, so the loop gets the GIL back within the
interpreter's switch interval, and a single call into the C parser reads one string or number,
never a container. `decode` refuses a body with more than `MAX_VALUES` values, so that neither
decoding nor anything the handler does with the result (validating it, showing it in an
error, freeing it) grows with the number of values a tenant can fit into `max_request_bytes`.
"""

from __future__ import annotations

import json
import re
from _json import make_scanner, scanstring  # the C parts of `json`, one value at a time
from json.decoder import JSONDecodeError
from typing import Any, Final

import trio

INLINE_BYTES: Final = 64 * 1024  #: a body up to this size is decoded on the event loop
#: Values (arrays, objects, strings, numbers, literals; keys not counted) in a larger body. No
#: body the APIs take holds more than a few hundred; a body of INLINE_BYTES holds at most
#: 32,768 (`[0,0,...]`), so the inline path never meets this limit either.
MAX_VALUES: Final = 50_000
#: Nesting of a larger body. The inline path stops where Python's recursion limit (1000) does;
#: half of that leaves room for whatever reads the decoded value recursively.
MAX_DEPTH: Final = 500

#: Process-wide: one large body is decoded at a time, whichever app and tenant sent it.
_LARGE_BODIES: Final = trio.CapacityLimiter(1)

_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")  # JSON's, as `json` skips it
#: The value at an index, as `json.loads` reads it. Typeshed wants a scanner as its context;
#: any object with the decoder's attributes (a JSONDecoder) is what C reads.
_scan_scalar: Final = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


class BodyLimitError(ValueError):
    """Well-formed JSON that `decode` refuses: too many values or nested too deeply.

    The message is a whole sentence about "the request body", ready for a 400.
    """


async def loads(raw: bytes) -> Any:
    """`raw` decoded as `json.loads(raw)` would, without stalling the event loop.

    Errors:
        ValueError: `raw` is not JSON (`json.JSONDecodeError`, `UnicodeDecodeError`), or
            `BodyLimitError` for a large body over `MAX_VALUES` or `MAX_DEPTH`.
        RecursionError: a small body nested deeper than Python's recursion limit allows.

    Cancellation: waiting for the limiter can be cancelled; a decode already running in the
    worker thread is waited for (it is bounded by `MAX_VALUES` and the body's size).
    """
    if len(raw) <= INLINE_BYTES:
        return json.loads(raw)
    return await trio.to_thread.run_sync(decode, raw, limiter=_LARGE_BODIES)


def decode(raw: bytes) -> Any:
    """`raw` decoded as `json.loads(raw)`: the same values and the same errors (messages and
    positions), except that more than `MAX_VALUES` values or `MAX_DEPTH` levels of nesting
    raise `BodyLimitError`, and no nesting raises RecursionError.

    Blocking: for a worker thread. Each call into C reads one string, number or run of
    whitespace, so the GIL is held at most for the longest of those (milliseconds for 10 MB).
    """
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    return _decode_text(text)


def _decode_text(s: str) -> Any:
    budget = MAX_VALUES
    parents: list[tuple[list[Any] | dict[str, Any], str]] = []  # each with its child's key
    current: list[Any] | dict[str, Any] | None = None  # the innermost open container
    key = ""  # where the next value goes when `current` is an object
    i = _skip_ws(s, 0)
    while True:
        # At the start of a value.
        budget -= 1
        if budget < 0:
            raise BodyLimitError(f"the request body holds more than {MAX_VALUES} JSON values")
        char = s[i : i + 1]
        if char == "[" or char == "{":
            if len(parents) + (current is not None) >= MAX_DEPTH:
                raise BodyLimitError(
                    f"the request body is JSON nested too deeply (more than {MAX_DEPTH} levels)"
                )
            opened: list[Any] | dict[str, Any] = [] if char == "[" else {}
            i = _skip_ws(s, i + 1)
            if s[i : i + 1] == ("]" if char == "[" else "}"):
                value: Any = opened
                i += 1
            else:
                if current is not None:
                    parents.append((current, key))
                current = opened
                if char == "{":
                    key, i = _member_key(s, i)
                continue
        else:
            try:
                value, i = _scan_scalar(s, i)
            except StopIteration as err:
                raise JSONDecodeError("Expecting value", s, err.value) from None
        # A whole value: store it, closing every container it completes, up to the next value.
        while True:
            if current is None:
                end = _skip_ws(s, i)
                if end != len(s):
                    raise JSONDecodeError("Extra data", s, end)
                return value
            if isinstance(current, list):
                current.append(value)
                closer = "]"
            else:
                current[key] = value
                closer = "}"
            i = _skip_ws(s, i)
            char = s[i : i + 1]
            if char == ",":
                i = _skip_ws(s, i + 1)
                if closer == "}":
                    key, i = _member_key(s, i)
                break
            if char != closer:
                raise JSONDecodeError("Expecting ',' delimiter", s, i)
            value, i = current, i + 1
            current, key = parents.pop() if parents else (None, "")


def _skip_ws(s: str, i: int) -> int:
    """The index of the first character at or after `i` that is not whitespace."""
    match = _WHITESPACE.match(s, i)
    return i if match is None else match.end()


def _member_key(s: str, i: int) -> tuple[str, int]:
    """The key of the object member at `i`, and the index of its value."""
    if s[i : i + 1] != '"':
        raise JSONDecodeError("Expecting property name enclosed in double quotes", s, i)
    key, i = scanstring(s, i + 1)
    i = _skip_ws(s, i)
    if s[i : i + 1] != ":":
        raise JSONDecodeError("Expecting ':' delimiter", s, i)
    return key, _skip_ws(s, i + 1)
