"""The native trio Redis client, against the real Redis."""

from __future__ import annotations

import pytest
import redis
import trio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.conftest import REDIS_URL
from wsrunner.backends.redis.resp import Address, RespClient, encode


def test_urls_name_host_port_db_auth_tls_and_unix_sockets() -> None:
    assert Address.from_url("redis://127.0.0.1:6380/3") == Address("127.0.0.1", 6380, db=3)
    secure = Address.from_url("rediss://bob:p%40ss@cache.internal/2")
    assert (secure.tls, secure.username, secure.password, secure.db, secure.port) == (
        True,
        "bob",
        "p@ss",
        2,
        6379,
    )
    assert Address.from_url("redis://:secret@h").password == "secret"
    unix = Address.from_url("unix:///run/redis/redis.sock?db=4")
    assert (unix.path, unix.db) == ("/run/redis/redis.sock", 4)
    with pytest.raises(ValueError, match="REDIS_URL: expected redis://"):
        Address.from_url("http://127.0.0.1:6379")


def test_commands_are_encoded_as_resp_arrays_of_bulk_strings() -> None:
    assert encode(["SET", "k", "vé", 7, b"\x00"]) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\xc3\xa9\r\n$1\r\n7\r\n$1\r\n\x00\r\n"
    )


async def test_commands_pipelines_transactions_and_errors(prefix: str) -> None:
    client = RespClient.from_url(REDIS_URL)
    key = f"{prefix}:resp"
    try:
        assert await client.execute("SET", key, "v") == "OK"
        assert await client.execute("GET", key) == "v"
        assert await client.execute("GET", f"{key}:missing") is None
        assert await client.pipeline(
            [["HSET", f"{key}:h", "a", 1, "b", "x"], ["HGETALL", f"{key}:h"]]
        ) == [2, ["a", "1", "b", "x"]]
        assert await client.pipeline(
            [["INCR", f"{key}:n"], ["INCR", f"{key}:n"]], transaction=True
        ) == [1, 2]
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.pipeline([["INCR", f"{key}:n"], ["LPUSH", key, "x"]], transaction=True)
        # EXEC ran the first command; the error named is the one Redis gave for the second.
        assert await client.execute("GET", f"{key}:n") == "3"
        with pytest.raises(ResponseError, match="unknown command"):
            await client.execute("NO-SUCH-COMMAND")
        assert await client.execute("PING") == "PONG"  # the connection is still in step
    finally:
        await client.execute("DEL", key, f"{key}:h", f"{key}:n")
        await client.aclose()


async def test_a_script_is_loaded_again_after_redis_forgets_it(prefix: str) -> None:
    client = RespClient.from_url(REDIS_URL)
    script = client.script(f"return {{KEYS[1], ARGV[1], '{prefix}'}}")
    try:
        assert await script(["k"], ["a"]) == ["k", "a", prefix]
        redis.Redis.from_url(REDIS_URL).script_flush()
        assert await script(["k2"], [5]) == ["k2", "5", prefix]
    finally:
        await client.aclose()


async def test_a_cancelled_call_never_leaves_its_connection_out_of_step(prefix: str) -> None:
    client = RespClient.from_url(REDIS_URL)
    key = f"{prefix}:blocked"
    try:
        with trio.move_on_after(0.2) as scope:
            await client.execute("BLPOP", key, 5)  # cancelled while Redis holds the reply back
        assert scope.cancelled_caught
        redis.Redis.from_url(REDIS_URL).rpush(key, "late")
        await trio.sleep(0.1)
        # A reused connection would read the BLPOP reply here; a fresh one reads its own.
        assert await client.execute("ECHO", "mine") == "mine"
        assert await client.execute("LPOP", key) == "late"
    finally:
        await client.aclose()


async def test_a_call_redis_does_not_answer_in_time_fails_and_its_connection_goes(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("wsrunner.backends.redis.resp.CALL_TIMEOUT_S", 0.3)
    client = RespClient.from_url(REDIS_URL)
    key = f"{prefix}:held"
    try:
        started = trio.current_time()
        with pytest.raises(RedisTimeoutError, match=r"did not answer within 0\.3s"):
            await client.execute("BLPOP", key, 5)  # Redis holds the reply back for 5 s
        assert 0.3 <= trio.current_time() - started < 2
        redis.Redis.from_url(REDIS_URL).rpush(key, "late")
        await trio.sleep(0.1)
        assert await client.execute("ECHO", "mine") == "mine"  # not the BLPOP's late reply
        assert await client.execute("LPOP", key) == "late"
    finally:
        await client.aclose()


async def test_an_unreachable_redis_is_a_connection_error() -> None:
    client = RespClient.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(RedisConnectionError, match=r"cannot connect to Redis at 127\.0\.0\.1:1"):
        await client.execute("PING")


class _Steps(trio.abc.Instrument):
    """Counts the scheduler's steps of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task, self.steps = task, 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task is self.task


class _Wrapped(trio.abc.Stream):
    """A stream that is not a SocketStream (as a TLS one is not), over a real connection."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_round_trip_on_a_plain_socket_is_one_wait_and_other_streams_still_work() -> None:
    """On a plain socket a round trip costs the calling task one pass through the scheduler
    (its wait for the reply), not one after every send and read; a stream that is not a
    plain socket (TLS) goes through the stream, with the same replies."""
    from wsrunner.backends.redis.resp import _Connection

    address = Address.from_url(REDIS_URL)
    plain = _Connection(await trio.open_tcp_stream(address.host, address.port))
    wrapped = _Connection(_Wrapped(await trio.open_tcp_stream(address.host, address.port)))
    try:
        assert plain.fd >= 0 and wrapped.fd == -1
        steps = _Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(steps)
        try:
            for conn in (plain, wrapped):
                assert await conn.roundtrip(
                    encode(["PING"]) + encode(["ECHO", "é" * 70_000]), 2
                ) == ["PONG", "é" * 70_000]
            before = steps.steps
            assert await plain.roundtrip(encode(["PING"]), 1) == ["PONG"]
            one = steps.steps - before
            assert await wrapped.roundtrip(encode(["PING"]), 1) == ["PONG"]
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert one == 1 and steps.steps - before - one > 1
    finally:
        await plain.stream.aclose()
        await wrapped.stream.aclose()
