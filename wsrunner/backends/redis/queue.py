"""Redis adapter: priority queues with leased claims, the status mirror, event streams, heartbeats.

Commands, pipelines and scripts go over wsrunner's native trio client (`resp.py`): through the
trio-asyncio bridge each call cost the daemon six times the CPU. Event streams are waited on by
one shared XREAD BLOCK on that client (`_StreamTail`), the idle wait for work by one BLMOVE per
queue on connections of its own (`_WorkWatch`). Only the cancel channel's subscription runs
redis-py's asyncio client through trio-asyncio, with `socket_timeout=None`, so trio
cancel scopes stay the only timeout mechanism.
Multi-step writes are Lua scripts, so each is atomic and costs one round trip:

- CLAIM takes the next runnable payload by the rules of `wsrunner.turns` (`turns.py` beside
  this module has the scripts) and records it in the daemon's in-flight hash, with what it holds
  (its workspace, its tenant), in the same step: a daemon that dies after a claim leaves the
  payload where the reaper finds it. Nothing is ever only in a dead process's memory.
- TRANSITION compare-and-sets the status hash against the lifecycle table and, only if the move
  applied, appends the event, stores the result, and acknowledges the claim; an event that
  follows the move (a task's first progress) can ride along, applied or not.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import redis.asyncio as aioredis
import trio
import trio_asyncio
from redis.exceptions import RedisError
from trio_asyncio import aio_as_trio, trio_as_aio

from wsrunner.backends.redis import turns
from wsrunner.backends.redis.keys import Keys
from wsrunner.backends.redis.resp import Arg, RespClient
from wsrunner.errors import UnavailableError
from wsrunner.models import (
    JSON,
    PRIORITY_ORDER,
    Claim,
    Event,
    Held,
    TaskState,
    TurnsConfig,
    Waiting,
    json_text,
    sources_of,
)
from wsrunner.turns import place_in

logger = logging.getLogger(__name__)

STATUS_TTL_S: Final = 7200
RESULT_TTL_S: Final = 3600
STREAM_MAXLEN: Final = 10_000  # events kept per task (approximate trim)
WAKE_BLOCK_S: Final = 5  # server-side bound of one idle wait; the poller just waits again

# KEYS: status, events, result, active set, inflight
# ARGV: target, allowed sources (JSON list), status ttl, fields (JSON object), event data JSON
#       ('' for none), event envelope JSON, timestamp, result JSON ('' for none), result ttl,
#       claim id ('' for none), terminal ('1'/'0'), task id, stream maxlen, the event `then`
#       (kind, data, envelope; '' for none), prefix
# Returns {1, event id or ''} when applied, {0, current status} when refused.
_TRANSITION: Final = (
    turns.LIB
    + """
local function emit_then()
  if ARGV[14] == '' then return end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[13], '*',
             'type', ARGV[14], 'data', ARGV[15], 'ts', ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('PUBLISH', KEYS[2], ARGV[16])
end
local current = redis.call('HGET', KEYS[1], 'status')
if current and current ~= ARGV[1] then
  local ok = false
  for _, s in ipairs(cjson.decode(ARGV[2])) do if s == current then ok = true end end
  if not ok then
    emit_then()
    return {0, current}
  end
end
local flat = {'status', ARGV[1]}
for k, v in pairs(cjson.decode(ARGV[4])) do flat[#flat + 1] = k; flat[#flat + 1] = v end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('EXPIRE', KEYS[1], ARGV[3])
local id = ''
if ARGV[5] ~= '' then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[13], '*',
                  'type', 'status_changed', 'data', ARGV[5], 'ts', ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('PUBLISH', KEYS[2], ARGV[6])
end
if ARGV[8] ~= '' then redis.call('SET', KEYS[3], ARGV[8], 'EX', ARGV[9]) end
if ARGV[10] ~= '' then settle(ARGV[17], KEYS[5], ARGV[10]) end
if ARGV[11] == '1' then redis.call('SREM', KEYS[4], ARGV[12]) end
emit_then()
return {1, id}
"""
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _flat(mapping: dict[str, str]) -> list[Arg]:
    return [x for kv in mapping.items() for x in kv]


def _envelope(kind: str, task_id: str, data: str, ts: str) -> str:
    """The reference system's pub/sub message for an event (as `Event.envelope()`), as JSON,
    around its `data` already in JSON: the same text as `json.dumps` of the whole, without
    encoding the data twice."""
    q = json.dumps
    return (
        f'{{"event_type": {q(kind)}, "task_id": {q(task_id)}, "data": {data}, '
        f'"timestamp": {q(ts)}}}'
    )


_PRIORITIES: Final = [p.value for p in PRIORITY_ORDER]

#: The states a task may move to each state from, as the transition script reads them.
_SOURCES: Final = {t: json.dumps(sorted(s.value for s in sources_of(t))) for t in TaskState}


def _pairs(flat: list[str]) -> dict[str, str]:
    """A flat [field, value, ...] reply (HGETALL, a stream entry) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _translate(exc: Exception) -> UnavailableError:
    return UnavailableError(f"Redis failed: {exc}")


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class _StreamTail:
    """One blocking XREAD, on one connection, for every event stream someone waits on.

    An SSE subscriber would otherwise hold a Redis connection in its own XREAD BLOCK for as long
    as it listens: a thousand subscribers, a thousand connections. Here waiters register the
    stream and the last id they have; one loop reads all the streams waited on and wakes the
    waiters of each stream that moved. A stream not in the current read restarts it at once; a
    stream nobody waits on any more is dropped at the next read.
    """

    BLOCK_MS: Final = 5000
    RECENT: Final = 1000  #: entries kept per stream for its waiters

    def entries_after(self, stream: str, after: str) -> list[tuple[str, dict[str, str]]] | None:
        """The entries after `after` the loop read, or None if it may not have them all."""
        cursor = _stream_id(after)
        recent = self._recent.get(stream)
        if (
            recent is None
            or cursor < self._since[stream]
            or (recent and cursor < recent[0][0] and len(recent) == recent.maxlen)
        ):
            return None
        return [(eid, fields) for key, eid, fields in recent if key > cursor]

    def __init__(self, client: RespClient) -> None:
        self._client = client
        self._last: dict[str, tuple[int, int]] = {}  # stream -> newest id the loop knows
        self._waiters: dict[str, set[trio.Event]] = {}
        self._reading: trio.CancelScope | None = None
        self._read: set[str] = set()  # the streams of the read in progress
        # Entries the loop read, per stream, complete from `_since`: the waiters of a stream
        # share them instead of each reading them again.
        self._since: dict[str, tuple[int, int]] = {}
        self._recent: dict[str, collections.deque[tuple[tuple[int, int], str, dict[str, str]]]] = {}
        self.failed: RedisError | None = None  #: the last read's error, while Redis is down

    async def wait(self, stream: str, after: str, timeout_s: float) -> None:
        """Return when `stream` has an entry after `after` (or may have), or after `timeout_s`."""
        want, known = _stream_id(after), self._last.get(stream)
        if known is not None and known > want:
            return  # the loop has seen newer entries than this waiter has
        if known is None:
            self._last[stream] = self._since[stream] = want
            self._recent[stream] = collections.deque(maxlen=self.RECENT)
        woken = trio.Event()
        self._waiters.setdefault(stream, set()).add(woken)
        if stream not in self._read and self._reading is not None:
            self._reading.cancel()  # read this stream too, from now on
        try:
            with trio.move_on_after(timeout_s):
                await woken.wait()
        finally:
            self._waiters[stream].discard(woken)

    async def serve(self) -> None:
        while True:
            reply = None
            with trio.CancelScope() as self._reading:
                for stream in [s for s, w in self._waiters.items() if not w]:
                    for held in (self._waiters, self._last, self._since, self._recent):
                        del held[stream]
                self._read = set(self._waiters)
                streams = list(self._read)
                if not streams:
                    await trio.sleep_forever()
                ids = [f"{ms}-{seq}" for ms, seq in (self._last[s] for s in streams)]
                try:
                    reply = await self._client.execute(
                        "XREAD",
                        "COUNT",
                        self.RECENT,
                        "BLOCK",
                        self.BLOCK_MS,
                        "STREAMS",
                        *streams,
                        *ids,
                    )
                    self.failed = None
                except RedisError as exc:
                    self.failed = exc
            self._reading, self._read = None, set()
            if self.failed is not None:
                for waiters in self._waiters.values():  # they read, fail and say so themselves
                    for woken in waiters:
                        woken.set()
                await trio.sleep(1.0)
            for stream, entries in reply or []:
                if stream not in self._last:
                    continue
                for eid, flat in entries:
                    key = _stream_id(eid)
                    if key > self._last[stream]:
                        self._recent[stream].append((key, eid, _pairs(flat)))
                        self._last[stream] = key
                for woken in self._waiters.get(stream, ()):
                    woken.set()


@dataclass(eq=False, slots=True)
class _WaitRequest:
    """One idle wait of the poller; whichever watcher sees work first ends it."""

    done: trio.Event = field(default_factory=trio.Event)
    found: bool = False
    error: UnavailableError | None = None


class _WorkWatch:
    """Wakes the idle poller when a queue gets work, over connections that stay open.

    Redis cannot block on "any of these lists" without popping, so each queue has a watcher
    blocked in `BLMOVE q q` on its own connection (moving a list's last element onto itself
    changes nothing), and producers that only LPUSH wake an idle daemon at once. A watcher
    blocks only while the poller waits, and after it woke one wait, not again before the next:
    a queue with a backlog never makes it spin. A wait that ends leaves the other watchers
    blocked where they are; cancelling them would close their connections (a half-read reply
    cannot be reused) and cost a new connection per queue at every idle moment.
    """

    def __init__(self, client: RespClient, queues: Iterable[str], wake: str) -> None:
        self._clients = {q: RespClient(client.address, pool_size=1) for q in [*queues, wake]}
        #: a list a release pushes to (bounded): popped, not moved, so one watcher wakes per push
        self._wake = wake
        self._request: _WaitRequest | None = None
        self._changed = trio.Event()

    async def wait(self) -> bool:
        """Block until some queue may have work (True), or WAKE_BLOCK_S passes (False)."""
        request = _WaitRequest()
        self._request = request
        self._changed.set()
        self._changed = trio.Event()
        try:
            with trio.move_on_after(WAKE_BLOCK_S):
                await request.done.wait()
        finally:
            if self._request is request:
                self._request = None
        if request.error is not None:
            raise request.error
        return request.found

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for queue, client in self._clients.items():
                    nursery.start_soon(self._watch, queue, client)
        finally:
            with trio.CancelScope(shield=True):
                for client in self._clients.values():
                    await client.aclose()

    async def _watch(self, queue: str, client: RespClient) -> None:
        served: _WaitRequest | None = None
        while True:
            while self._request is None or self._request is served:
                await self._changed.wait()
            request = self._request
            try:
                if queue == self._wake:
                    moved = await client.execute("BLPOP", queue, WAKE_BLOCK_S)
                else:
                    moved = await client.execute(
                        "BLMOVE", queue, queue, "RIGHT", "RIGHT", WAKE_BLOCK_S
                    )
            except RedisError as exc:  # this wait fails; the poller backs off and waits again
                request.error, served = _translate(exc), request
                request.done.set()
                continue
            if moved is not None:
                request.found, served = True, request
                request.done.set()


class RedisQueue:
    """Everything wsrunner keeps in Redis. Create with `open_redis_queue()`."""

    def __init__(self, client: RespClient, blocking: Any, keys: Keys) -> None:
        # Bound to the loop it was opened in, so any trio task may call it (an HTTP handler,
        # a test), not only tasks that inherited the loop's context.
        self._loop = trio_asyncio.current_loop.get()
        self.on_error: Callable[[], None] | None = None  #: called on each failed call (metrics)
        self._r = client  # commands, pipelines and scripts (native trio)
        self._blocking = blocking  # redis-py: the cancel channel's pub/sub
        self.keys = keys
        self._claim = client.script(turns.CLAIM)
        self._ack = client.script(turns.ACK)
        self._requeue = client.script(turns.REQUEUE)
        self._dead_letter = client.script(turns.DEAD_LETTER)
        self._waiting = client.script(turns.WAITING)
        self._counts = client.script(turns.COUNTS)
        self._hold = client.script(turns.HOLD)
        self._reassert = client.script(turns.REASSERT)
        self._steps_over = client.script(turns.STEPS_OVER)
        self._released = trio.Event()  #: set when a claim settled here may have freed work
        #: this host, its volume ('shared' or 'local'), and what to do when a home is gone
        self._placement: tuple[str, str, str] = ("", "shared", "fail")
        self._transition = client.script(_TRANSITION)
        self.tail = _StreamTail(client)  #: its `serve()` runs for as long as the queue is open
        #: so does its `serve()`; it also wakes on another daemon's release (`turns:wake`)
        self._work = _WorkWatch(client, keys.queues(), wake=f"{keys.prefix}:turns:wake")

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a redis-py (asyncio) method through the bridge."""
        try:
            return await aio_as_trio(fn, loop=self._loop)(*args, **kwargs)
        except RedisError as exc:
            self._failed()
            raise _translate(exc) from exc

    def _failed(self) -> None:
        if self.on_error is not None:
            self.on_error()

    async def _cmd(self, *args: Arg) -> Any:
        try:
            return await self._r.execute(*args)
        except RedisError as exc:
            self._failed()
            raise _translate(exc) from exc

    async def _pipe(self, commands: list[list[Arg]], *, transaction: bool = False) -> list[Any]:
        try:
            return await self._r.pipeline(commands, transaction=transaction)
        except RedisError as exc:
            self._failed()
            raise _translate(exc) from exc

    async def _script(self, script: Any, keys: list[Arg], args: list[Arg]) -> Any:
        try:
            return await script(keys, args)
        except RedisError as exc:
            self._failed()
            raise _translate(exc) from exc

    async def ping(self) -> None:
        await self._cmd("PING")

    # --- submit -------------------------------------------------------------------------------

    async def enqueue(
        self, payload: JSON, *, event_data: JSON, max_running: int | None = None
    ) -> str:
        """Queue a new task: status hash, active set, payload and `queued` event in one MULTI;
        with the payload's `token_id`, that token's `max_running` too (None: no limit), so that
        a limit Redis lost is back with the token's next task.

        Returns the id of the `queued` event.
        """
        tid, ws = payload["task_id"], payload["workspace_id"]
        ts = now_iso()
        status = {
            "status": TaskState.QUEUED.value,
            "workspace_id": ws,
            "submitted_at": ts,
            "priority": payload["priority"],
            "task_type": payload.get("task_type", "background_job"),
        }
        k = self.keys
        results = await self._pipe(
            [
                ["HSET", k.status(tid), *_flat(status)],
                ["EXPIRE", k.status(tid), STATUS_TTL_S],
                ["SADD", k.active(ws), tid],
                *self._event_commands(tid, "status_changed", event_data, ts),
                ["LPUSH", k.queue(payload["priority"]), json.dumps(payload)],
                *self._token_limit(payload.get("token_id"), max_running),
            ],
            transaction=True,
        )
        return str(results[3])

    def _token_limit(self, token_id: object, max_running: int | None) -> list[list[Arg]]:
        if not isinstance(token_id, str):
            return []
        key = f"{self.keys.prefix}:turns:limits:token"
        if max_running is None:
            return [["HDEL", key, token_id]]
        return [["HSET", key, token_id, max_running]]

    async def requeue_payload(self, payload: JSON) -> None:
        """Put a payload rebuilt from PostgreSQL back on its queue, with a fresh status hash."""
        tid = payload["task_id"]
        k = self.keys
        status = {
            "status": "queued",
            "workspace_id": payload["workspace_id"],
            "priority": payload["priority"],
        }
        await self._pipe(
            [
                ["HSET", k.status(tid), *_flat(status)],
                ["EXPIRE", k.status(tid), STATUS_TTL_S],
                ["SADD", k.active(payload["workspace_id"]), tid],
                ["RPUSH", k.queue(payload["priority"]), json.dumps(payload)],
            ],
            transaction=True,
        )

    # --- claims -------------------------------------------------------------------------------

    async def claim(self, worker_id: str) -> Claim | None:
        """Take the next runnable payload (`wsrunner.turns`) and lease it to `worker_id`.

        Cancellation: shielded; the claim either happened (and is leased) or did not.
        """
        self._released = trio.Event()  # a release from now on may free what this one skips
        with trio.CancelScope(shield=True):
            res = await self._script(
                self._claim,
                [],
                [self.keys.prefix, self.keys.inflight(worker_id), *self._placement, *_PRIORITIES],
            )
        if res is None:
            return None
        waited = int(res[2])
        return Claim(
            str(res[0]),
            str(res[1]),
            None if waited < 0 else waited / 1000,
            str(res[3]),
            str(res[4]) or None,
        )

    async def wait_for_work(self) -> bool:
        """Block until a queue gets a payload or a claim settled here frees one (True), or
        WAKE_BLOCK_S passes (False). Another daemon's release is seen by the next claim."""
        if self._released.is_set():
            return True
        found, failed = False, None
        async with trio.open_nursery() as nursery:

            async def released() -> None:
                nonlocal found
                await self._released.wait()
                found = True
                nursery.cancel_scope.cancel()

            async def arrived() -> None:
                nonlocal found, failed
                try:
                    found = await self._work.wait() or found
                except UnavailableError as exc:  # raised below as itself, not in a group
                    failed = exc
                nursery.cancel_scope.cancel()

            nursery.start_soon(released)
            nursery.start_soon(arrived)
        if failed is not None:
            self._failed()
            raise failed
        return found

    async def ack(self, worker_id: str, claim_id: str) -> None:
        await self._script(self._ack, [self.keys.inflight(worker_id)], [claim_id, self.keys.prefix])
        self._released.set()

    async def requeue_claim(self, worker_id: str, claim_id: str, priority: str) -> bool:
        """Move a claimed payload back to the front of its line; False if it was not there."""
        k = self.keys
        with trio.CancelScope(shield=True):
            moved = await self._script(
                self._requeue, [k.inflight(worker_id)], [claim_id, k.prefix, priority]
            )
        self._released.set()
        return bool(moved)

    async def dead_letter(self, worker_id: str, claim_id: str, reason: str) -> None:
        """Move a claimed payload that cannot run to the dead-letter list, with the reason."""
        k = self.keys
        await self._script(
            self._dead_letter,
            [k.inflight(worker_id), k.dead],
            [claim_id, reason, worker_id, now_iso(), k.prefix],
        )
        self._released.set()

    async def inflight(self, worker_id: str) -> dict[str, str]:
        return _pairs(await self._cmd("HGETALL", self.keys.inflight(worker_id)))

    # --- status mirror and events -------------------------------------------------------------

    async def transition(
        self,
        task_id: str,
        workspace_id: str,
        target: TaskState,
        *,
        fields: dict[str, str] | None = None,
        event: JSON | None = None,
        result: JSON | None = None,
        ack: tuple[str, str] | None = None,
        then: tuple[str, JSON] | None = None,
    ) -> tuple[bool, str]:
        """Compare-and-set the status hash to `target`; on success also emit, store and ack.
        The event `then` (kind, data) is appended last, applied or not: one round trip.

        Returns (applied, event id) or (False, current status). A missing hash (expired, or
        Redis was wiped) accepts any move: PostgreSQL has already arbitrated it.
        """
        k = self.keys
        ts = now_iso()
        worker, claim_id = ack if ack is not None else ("-", "")
        follow: list[Arg] = ["", "", ""]  # the event `then`: kind, data, envelope
        if then is not None:
            data = json.dumps(then[1])
            follow = [then[0], data, _envelope(then[0], task_id, data, ts)]
        said = "" if event is None else json.dumps(event)
        res = await self._script(
            self._transition,
            [
                k.status(task_id),
                k.events(task_id),
                k.result(task_id),
                k.active(workspace_id),
                k.inflight(worker),
            ],
            [
                target.value,
                _SOURCES[target],
                STATUS_TTL_S,
                json.dumps(fields or {}),
                said,
                "" if event is None else _envelope("status_changed", task_id, said, ts),
                ts,
                "" if result is None else json_text(result),
                RESULT_TTL_S,
                claim_id,
                "1" if target.terminal else "0",
                task_id,
                STREAM_MAXLEN,
                *follow,
                k.prefix,
            ],
        )
        if claim_id:
            self._released.set()
        return bool(int(res[0])), str(res[1])

    def _event_commands(self, task_id: str, kind: str, data: JSON, ts: str) -> list[list[Arg]]:
        """XADD to the task's stream, renew its TTL, PUBLISH the legacy envelope."""
        stream, said = self.keys.events(task_id), json.dumps(data)
        return [
            [
                "XADD",
                stream,
                "MAXLEN",
                "~",
                STREAM_MAXLEN,
                "*",
                "type",
                kind,
                "data",
                said,
                "ts",
                ts,
            ],
            ["EXPIRE", stream, STATUS_TTL_S],
            ["PUBLISH", stream, _envelope(kind, task_id, said, ts)],
        ]

    async def emit(self, task_id: str, kind: str, data: JSON) -> str:
        """Append one event to the task's stream (and the legacy channel); returns its id."""
        results = await self._pipe(self._event_commands(task_id, kind, data, now_iso()))
        return str(results[0])

    async def read_events(
        self, task_id: str, after: str = "0-0", *, block_ms: int | None = None, count: int = 500
    ) -> list[Event]:
        """Events after `after`, oldest first; with `block_ms`, wait that long for new ones."""
        stream = self.keys.events(task_id)
        raw: list[tuple[str, dict[str, str]]]
        # Blocking: wait on the shared tail (one XREAD for all streams), then read what came.
        if block_ms is None:
            entries = await self._cmd("XRANGE", stream, f"({after}", "+", "COUNT", count)
            raw = [(eid, _pairs(flat)) for eid, flat in entries]
        else:
            await self.tail.wait(stream, after, block_ms / 1000)
            if self.tail.failed is not None:
                self._failed()
                raise _translate(self.tail.failed)
            shared = self.tail.entries_after(stream, after)
            if shared is not None:
                raw = shared[:count]
            else:
                entries = await self._cmd("XRANGE", stream, f"({after}", "+", "COUNT", count)
                raw = [(eid, _pairs(flat)) for eid, flat in entries]
        return [
            Event(
                id=eid,
                type=f["type"],
                task_id=task_id,
                data=json.loads(f["data"]),
                timestamp=f["ts"],
            )
            for eid, f in raw
        ]

    async def depths(self) -> dict[str, int]:
        """Payloads waiting in each priority (arrived, in line, or unreadable), one round trip."""
        k = self.keys
        line = f"{k.prefix}:turns"
        commands: list[list[Arg]] = []
        for p in _PRIORITIES:
            commands += [
                ["LLEN", k.queue(p)],
                ["GET", f"{line}:{p}:count"],
                ["LLEN", f"{line}:{p}:unreadable"],
            ]
        counts = await self._pipe(commands)
        return {
            p: sum(int(n or 0) for n in counts[3 * i : 3 * i + 3])
            for i, p in enumerate(_PRIORITIES)
        }

    # --- turns --------------------------------------------------------------------------------

    async def configure(self, config: TurnsConfig) -> bool:
        """Take the claim rules' settings: workspace limits (shared by every daemon on this
        Redis: the last to configure sets them), this host's placement, and the homes and
        token limits the durable record knows, where Redis lost them or they changed.

        Returns whether Redis had none of it (a first start, or a restart without its data):
        then the caller gives it the homes."""
        self._placement = (
            config.host,
            "shared" if config.volume_shared else "local",
            config.home_unavailable,
        )
        line = f"{self.keys.prefix}:turns"
        limits = {"*": str(config.workspace_limit)}
        limits.update({k: str(v) for k, v in config.workspace_limits.items()})
        commands: list[list[Arg]] = [
            ["EXISTS", f"{line}:limits:ws"],  # gone only with the rest of Redis's data
            ["DEL", f"{line}:limits:ws"],
            ["HSET", f"{line}:limits:ws", *_flat(limits)],
        ]
        commands += [["HSETNX", f"{line}:homes", ws, h] for ws, h in config.homes.items()]
        for token, n in config.token_limits.items():
            key = f"{line}:limits:token"
            commands.append(["HDEL", key, token] if n is None else ["HSET", key, token, n])
        replies = await self._pipe(commands, transaction=True)
        return not replies[0]

    async def reassert(self, held: Sequence[Held]) -> None:
        """Hold again what running tasks' claims hold, where Redis lost it (see REASSERT)."""
        if not held:
            return
        args: list[Arg] = [self.keys.prefix]
        for h in held:
            tenant = f"t:{h.token_id}" if h.token_id else f"w:{h.workspace_id}"
            args += [h.claim_id, h.workspace_id, tenant, h.task_id]
        await self._script(self._reassert, [], args)

    async def steps_over(self, claim_id: str) -> None:
        """The claim's task ran its steps: its workspace and tenant are free for the next."""
        await self._script(self._steps_over, [], [self.keys.prefix, claim_id])
        self._released.set()

    async def hold_workspace(self, workspace_id: str, hold_id: str, ttl_s: float) -> str | None:
        """Hold `workspace_id` for an API call that writes, for at most `ttl_s`; None when it
        holds it now, else what holds it (a task id, or 'api')."""
        holder = await self._script(
            self._hold, [], [self.keys.prefix, workspace_id, hold_id, max(1, int(ttl_s * 1000))]
        )
        return str(holder) or None

    async def release_workspace(self, workspace_id: str, hold_id: str) -> None:
        line = f"{self.keys.prefix}:turns"
        await self._pipe(
            [
                ["ZREM", f"{line}:calls:{workspace_id}", hold_id],
                ["LPUSH", f"{line}:wake", "1"],
                ["LTRIM", f"{line}:wake", 0, 63],
            ]
        )
        self._released.set()

    async def waiting_counts(self) -> dict[str, int]:
        """Waiting tasks by what holds them back (`Waiting.kind`)."""
        raw = await self._script(self._counts, [], [self.keys.prefix, *_PRIORITIES])
        return {k: int(v) for k, v in json.loads(raw).items()}

    async def waiting(
        self, task_id: str, workspace_id: str, token_id: str | None, priority: str
    ) -> Waiting | None:
        """Where a queued task stands in line and what holds it back; None if it is not in
        line (being claimed, or not queued)."""
        tenant = f"t:{token_id}" if token_id else f"w:{workspace_id}"
        raw = await self._script(
            self._waiting,
            [],
            [self.keys.prefix, task_id, workspace_id, tenant, priority, *_PRIORITIES],
        )
        found = json.loads(raw)
        if not found:
            return None
        spaces = [(str(w), int(n)) for w, n in found["spaces"]]
        position = found["before"] + place_in(
            spaces, workspace_id, found["index"], found["ahead"], found["behind"]
        )
        return Waiting(
            position=position,
            workspace_holder=found["holder"] if found["held"] >= found["ws_limit"] else None,
            running=found["running"],
            token_limit=None if found["token_limit"] < 0 else found["token_limit"],
            home_gone=found["home_gone"] or None,
        )

    async def statuses(self, task_ids: Iterable[str]) -> dict[str, str | None]:
        """The `status` field of each task (None where the hash is missing), in one round trip."""
        ids = list(task_ids)
        if not ids:
            return {}
        replies = await self._pipe([["HGET", self.keys.status(tid), "status"] for tid in ids])
        return dict(zip(ids, replies, strict=True))

    # --- daemons ------------------------------------------------------------------------------

    async def heartbeat(self, worker_id: str, running: Iterable[str], ttl_s: float) -> None:
        """Renew this daemon's lease and publish which tasks it runs."""
        k = self.keys
        ttl = max(1, int(ttl_s + 0.999))
        commands: list[list[Arg]] = [
            ["SET", k.heartbeat(worker_id), str(int(time.time())), "EX", ttl],
            ["SADD", k.workers, worker_id],
            ["DEL", k.worker_tasks(worker_id)],
        ]
        ids = list(running)
        if ids:
            commands += [
                ["SADD", k.worker_tasks(worker_id), *ids],
                ["EXPIRE", k.worker_tasks(worker_id), ttl],
            ]
        host, volume, _ = self._placement
        if host:  # the host's lease, kept by each of its daemons
            commands.append(["SET", f"{k.prefix}:turns:host:{host}", volume, "EX", ttl])
            if volume == "shared":
                commands.append(["SADD", f"{k.prefix}:turns:shared", host])
        await self._pipe(commands, transaction=True)

    async def retire(self, worker_id: str) -> None:
        """Remove a stopped daemon's heartbeat. A claim it still holds (a slot that failed to
        settle one) keeps it among the daemons, so that the reaper hands that claim on."""
        k = self.keys
        await self._pipe(
            [
                ["DEL", k.heartbeat(worker_id), k.worker_tasks(worker_id)],
                ["SADD", k.workers, worker_id],
            ],
            transaction=True,
        )
        await self.forget_worker(worker_id)  # leaves the set only when its in-flight is empty

    async def dead_workers(self) -> list[str]:
        """Daemons registered in the worker set whose heartbeat (lease) has expired."""
        k = self.keys
        workers = sorted(await self._cmd("SMEMBERS", k.workers))
        if not workers:
            return []
        alive = await self._pipe([["EXISTS", k.heartbeat(w)] for w in workers])
        return [w for w, a in zip(workers, alive, strict=True) if not a]

    async def is_alive(self, worker_id: str) -> bool:
        return bool(await self._cmd("EXISTS", self.keys.heartbeat(worker_id)))

    async def forget_worker(self, worker_id: str) -> None:
        """Drop a dead daemon from the worker set once its in-flight hash is empty."""
        k = self.keys
        if not await self._cmd("EXISTS", k.inflight(worker_id)):
            await self._cmd("SREM", k.workers, worker_id)

    # --- cancellation -------------------------------------------------------------------------

    async def publish_cancel(self, task_id: str) -> None:
        await self._cmd("PUBLISH", self.keys.cancel_channel, task_id)

    async def serve_cancel_listener(
        self, send: trio.MemorySendChannel[str], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Forward task ids published on the cancel channel to `send`, until cancelled.

        The whole subscription loop runs on the asyncio side: one bridge crossing per message.
        """
        channel = self.keys.cancel_channel
        ready = trio.Event()

        async def loop() -> None:  # asyncio flavoured
            pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                ready.set()  # plain sync call: trio.Event.set is thread-agnostic within the loop
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        await trio_as_aio(send.send)(msg["data"])
            finally:
                await pubsub.aclose()

        failed: UnavailableError | None = None
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal failed
                try:
                    await self._call(loop)
                except UnavailableError as exc:  # raised below as itself, not in a group
                    failed = exc
                    nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            await ready.wait()
            task_status.started()
        if failed is not None:
            raise failed


@asynccontextmanager
async def open_redis_queue(url: str, prefix: str) -> AsyncIterator[RedisQueue]:
    """Connect to Redis (inside `trio_asyncio.open_loop()`) and check it answers.

    Raises:
        UnavailableError: Redis cannot be reached.
    """
    # socket_timeout=None: on Python 3.11 a set socket timeout makes redis-py wrap calls in
    # asyncio.wait_for, which can swallow a cancellation.
    opts: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": None,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
    }
    client = RespClient.from_url(url)
    blocking = aioredis.Redis.from_url(url, **opts)
    try:
        queue = RedisQueue(client, blocking, Keys(prefix))
        await queue.ping()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.tail.serve)
            nursery.start_soon(queue._work.serve)
            yield queue
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(10) as cleanup:  # shielded, and bounded
            cleanup.shield = True
            await client.aclose()
            try:
                await aio_as_trio(blocking.aclose)()
            except (RedisError, OSError):  # already broken; nothing left to release
                pass
