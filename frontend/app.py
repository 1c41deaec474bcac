"""What wsrunner's two apps share: the Quart-Trio app class (with the keep-alive fix and the
request timing) and request helpers that turn malformed input into the core's errors."""

from __future__ import annotations

import time
from typing import Any, Final

import trio
from quart import Request, Response, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import BadRequest
from werkzeug.wrappers import Response as WerkzeugResponse

from frontend import bodies
from wsrunner.errors import ValidationError
from wsrunner.metrics import Metrics


async def json_body() -> Any:
    """The request body as JSON; a 400 problem when it is not JSON, or JSON that
    `frontend.bodies` refuses to decode (nested too deeply, too many values)."""
    raw = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    try:
        return await bodies.loads(raw)
    except bodies.BodyLimitError as exc:
        raise BadRequest(str(exc)) from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request body is JSON nested too deeply") from None


async def json_object() -> dict[str, Any]:
    """The request body as a JSON object; 400 when it is not JSON, 422 when not an object."""
    body = await json_body()
    if not isinstance(body, dict):
        raise ValidationError("", f"expected a JSON object, got {type(body).__name__}")
    return body


def concurrent(body: dict[str, Any]) -> bool:
    """The body's `concurrent` flag: run beside a task or call holding the workspace."""
    value = body.get("concurrent", False)
    if not isinstance(value, bool):
        raise ValidationError("concurrent", f"expected true or false, got {value!r}")
    return value


def required_arg(name: str) -> str:
    """A query parameter that must be given and not empty; a 422 naming it otherwise."""
    value = request.args.get(name)
    if value is None or value == "":
        raise ValidationError(name, "is required")
    return value


def query_int(name: str, default: int) -> int:
    """An integer query parameter; a 422 naming it when it is not one."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationError(name, f"expected an integer, got {raw!r}") from None


DRAIN_BYTES: Final = 64 * 1024 * 1024  #: an over-limit body up to this size is read and dropped
DRAIN_S: Final = 10.0  #: ... for at most this long


async def _read_past_the_limit(scope: Any, receive: Any, limit: int | None) -> Any:
    """`receive`, or, for a body declared over `limit`, one that has read and dropped it.

    The 413 for a body over the limit goes out before the body is read. The server then closes
    a connection with unread data in it, the kernel answers the client's next bytes with a
    reset, and a client still sending can lose the 413 it was sent (CI saw "server disconnected
    without sending a response" once). Reading the body first, within bounds, lets the client
    finish and read its 413 (nginx's "lingering close"). The app then sees an empty body with
    the declared length and answers 413 as usual.
    """
    declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
    if limit is None or not declared.isdigit() or not limit < int(declared) <= DRAIN_BYTES:
        return receive
    with trio.move_on_after(DRAIN_S):
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
    sent = False

    async def drained() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()  # type: ignore[no-any-return]

    return drained


class _ShieldFinalSend(TrioASGIHTTPConnection):
    """Shield the last body send of a response.

    Hypercorn starts its keep-alive idle timer from inside that send, which quart-trio runs in
    a nursery it cancels when the request ends; unshielded, the timer never starts, idle
    connections are never closed, and every shutdown waits out `graceful_timeout`.
    """

    async def _send_response(self, send: Any, response: Any) -> None:
        async def send_shielding_last(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await super()._send_response(send_shielding_last, response)  # type: ignore[arg-type]


#: Methods that get their own label; any other a client sends is counted as OTHER.
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED: Final = "unmatched"  #: the route label of a request no route matched


class App(QuartTrio):
    """QuartTrio (a plain Quart app answers 500 under hypercorn.trio) with the fix above, and
    each request timed into `metrics` as `api`, by its route template.

    No static folder: nothing is served that is not an API route.
    """

    asgi_http_class = _ShieldFinalSend

    def __init__(self, name: str, *, api: str, metrics: Metrics | None = None) -> None:
        super().__init__(name, static_folder=None)
        self.api, self.metrics = api, metrics

    async def handle_request(self, request: Request) -> Response | WerkzeugResponse:
        """Answer the request, and time it until its response starts (not to the end of its
        body: an event stream lasts as long as its reader stays). Labels come from the route
        template, never the path, so ids never reach a label."""
        began = time.perf_counter()
        response = await super().handle_request(request)
        if self.metrics is not None:
            rule = request.url_rule
            method = request.method if request.method in _METHODS else "OTHER"
            self.metrics.http_time(
                self.api,
                method,
                UNMATCHED if rule is None else rule.rule,
                str(response.status_code),
            ).observe(time.perf_counter() - began)
        return response

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            receive = await _read_past_the_limit(scope, receive, self.config["MAX_CONTENT_LENGTH"])
        await super().__call__(scope, receive, send)
