"""The frontend's listeners: a port still held after a crash is retried, then given up."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import trio

import frontend.server
from tests.conftest import INTERNAL_TOKEN


@pytest.fixture(name="held_port")
def _held_port() -> Iterator[socket.socket]:
    """A port another process still listens on (what a crashed daemon's leftovers do)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held


def _start(start_daemon: Callable[..., Any], port: int) -> Any:
    return start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=port,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
    )


async def test_a_port_in_use_is_retried_until_it_is_free(
    start_daemon: Callable[..., Any], held_port: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    port = held_port.getsockname()[1]

    async def release_later() -> None:
        await trio.sleep(1.0)  # the scenario: the old holder goes away after a second
        held_port.close()

    caplog.set_level(logging.WARNING, logger="frontend.server")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_later)
        daemon = await _start(start_daemon, port)
    assert daemon.urls[0] == f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{port}/openapi.json")
    assert r.status_code == 200
    waits = [r.getMessage() for r in caplog.records if r.name == "frontend.server"]
    assert waits and all(
        m.startswith(f"cannot listen on 127.0.0.1:{port}: address in use; retrying") for m in waits
    ), waits


async def test_a_port_still_in_use_fails_the_start(
    start_daemon: Callable[..., Any], held_port: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frontend.server, "BIND_RETRY_S", 0.6)
    with pytest.raises(BaseException) as raised:  # noqa: PT011  (OSError, maybe in a group)
        await _start(start_daemon, held_port.getsockname()[1])
    error = raised.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, OSError) and error.errno == errno.EADDRINUSE, raised.value
