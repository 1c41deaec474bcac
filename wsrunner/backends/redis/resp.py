"""A small native trio Redis client for the commands a task costs.

redis-py's asyncio client runs under trio through trio-asyncio, and that bridge is most of what a
Redis call costs the daemon: measured on the benchmark machine, an HGET took 250 µs of CPU through
it and 40 µs over a trio socket. Every task makes several calls (claim, start, events, end), so
the daemon sends its plain commands, pipelines and scripts here: RESP written by hand, replies
parsed by hiredis. Blocking waits and pub/sub stay on redis-py (see `queue.py`).

Errors are redis-py's exception types, so callers have one vocabulary. A connection whose call
was cancelled or failed half-way is closed, never reused: its reply stream is out of step.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import trio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

CALL_TIMEOUT_S: Final = 30.0  #: a command (or pipeline) that takes longer fails the call
CONNECT_TIMEOUT_S: Final = 5.0
POOL_SIZE: Final = 16  #: connections kept and used at once; more callers wait for one

Arg = str | bytes | int | float


@dataclass(frozen=True, slots=True)
class Address:
    """Where and how to connect, from a redis://, rediss:// or unix:// URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  #: a unix socket
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def from_url(cls, url: str) -> Address:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"REDIS_URL: expected redis://, rediss:// or unix://, got {parts.scheme!r}"
            )
        db = query.get("db", [""])[0]
        if parts.scheme != "unix" and parts.path.strip("/"):
            db = parts.path.strip("/")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            path=unquote(parts.path) if parts.scheme == "unix" else None,
            tls=parts.scheme == "rediss",
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            db=int(db or 0),
        )


def encode(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings (str as UTF-8, numbers as their repr),
    packed by hiredis's C code."""
    # (hiredis's stub types the argument as a tuple of one)
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]
    return packed


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace")
        #: a plain socket's descriptor (TLS goes through the stream): see `roundtrip`
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1

    async def roundtrip(self, payload: bytes, replies: int) -> list[Any]:
        """Send `payload`, then read `replies` replies."""
        await self._send(payload)
        out: list[Any] = []
        while len(out) < replies:
            reply = self.reader.gets()
            if reply is not False:
                out.append(reply)
                continue
            data = await self._receive()
            if not data:
                raise RedisConnectionError("Redis closed the connection")
            self.reader.feed(data)
        return out

    # On a plain socket these are system calls on its descriptor, with one wait per read: the
    # stream adds a pass through the scheduler after every send and read that succeeds at once.
    # (With the helper's datagrams and the free connections taken without a pass, a task's
    # passes through the scheduler went from 35 to 22.)

    async def _send(self, payload: bytes) -> None:
        if self.fd < 0:
            await self.stream.send_all(payload)
            return
        view = memoryview(payload)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)

    async def _receive(self) -> bytes:
        """Whatever came next (b"" at the end of the connection); always a checkpoint."""
        if self.fd < 0:
            return bytes(await self.stream.receive_some(65536))
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                return os.read(self.fd, 65536)
            except BlockingIOError:
                continue


class RespClient:
    """A pool of native trio connections to one Redis database."""

    def __init__(self, address: Address, *, pool_size: int = POOL_SIZE) -> None:
        self.address = address
        self._idle: list[_Connection] = []
        self._limit = trio.CapacityLimiter(pool_size)

    @classmethod
    def from_url(cls, url: str) -> RespClient:
        return cls(Address.from_url(url))

    async def _connect(self) -> _Connection:
        a = self.address
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                if a.path is not None:
                    stream: trio.abc.Stream = await trio.open_unix_socket(a.path)
                else:
                    stream = await trio.open_tcp_stream(a.host, a.port)
                if a.tls:
                    stream = trio.SSLStream(
                        stream, ssl.create_default_context(), server_hostname=a.host
                    )
                conn = _Connection(stream)
                hello: list[list[Arg]] = []
                if a.password is not None:
                    hello.append(
                        ["AUTH", a.password]
                        if a.username is None
                        else ["AUTH", a.username, a.password]
                    )
                if a.db:
                    hello.append(["SELECT", a.db])
                if hello:
                    for reply in await conn.roundtrip(b"".join(map(encode, hello)), len(hello)):
                        _check(reply)
                return conn
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise RedisConnectionError(
                f"cannot connect to Redis at {a.path or f'{a.host}:{a.port}'}: {exc}"
            ) from exc

    async def _roundtrip(self, payload: bytes, replies: int) -> list[Any]:
        try:  # (no pass through the scheduler when a connection is free: the call makes one)
            self._limit.acquire_nowait()
        except trio.WouldBlock:
            await self._limit.acquire()
        try:
            conn = self._idle.pop() if self._idle else await self._connect()
            reusable = False
            try:
                # A deadline scope, not `fail_after` (half the cost, on every call of every task).
                with trio.CancelScope(deadline=trio.current_time() + CALL_TIMEOUT_S):
                    out = await conn.roundtrip(payload, replies)
                    reusable = True
                    return out
                raise RedisTimeoutError(f"Redis did not answer within {CALL_TIMEOUT_S:g}s")
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise RedisConnectionError(f"Redis connection failed: {exc}") from exc
            except hiredis.ProtocolError as exc:
                raise RedisConnectionError(f"Redis protocol error: {exc}") from exc
            finally:
                if reusable:
                    self._idle.append(conn)
                else:  # out of step with its replies (or broken): never reused
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(conn.stream)
        finally:
            self._limit.release()

    async def execute(self, *args: Arg) -> Any:
        """One command; its reply (str, int, list, None), or ResponseError."""
        [reply] = await self._roundtrip(encode(args), 1)
        return _check(reply)

    async def pipeline(
        self, commands: Sequence[Sequence[Arg]], *, transaction: bool = False
    ) -> list[Any]:
        """Several commands in one round trip; with `transaction`, inside MULTI/EXEC.

        Raises the first command's error, as redis-py's pipelines do.
        """
        if transaction:
            commands = [["MULTI"], *commands, ["EXEC"]]
        replies = await self._roundtrip(b"".join(map(encode, commands)), len(commands))
        if transaction:
            for reply in replies[:-1]:
                _check(reply)  # MULTI's OK, each QUEUED, or a command refused before EXEC
            replies = _check(replies[-1])
            if replies is None:
                raise ResponseError("transaction aborted")
        return [_check(r) for r in replies]

    def script(self, source: str) -> Script:
        return Script(self, source)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)


class Script:
    """A Lua script, sent by its SHA1 (EVALSHA), and in full the first time Redis lacks it."""

    def __init__(self, client: RespClient, source: str) -> None:
        self.client, self.source = client, source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted (or flushed) Redis: EVAL loads it again
            return await self.client.execute("EVAL", self.source, len(keys), *keys, *args)


def _check(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        message = str(reply)
        if message.startswith("NOSCRIPT"):
            raise NoScriptError(message)
        raise ResponseError(message)
    return reply
