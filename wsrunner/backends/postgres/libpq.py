"""PostgreSQL from the trio thread: libpq in non-blocking mode, for the statements every task runs.

The store's psycopg pool works in worker threads (psycopg has no trio support), and a call there
costs two thread hops and a fight for the GIL on top of the round trip: about 1.5 ms of wall time
per statement in the daemon under load, against 0.3 ms for the round trip itself. The two writes
on every task's path (start and end) therefore go here instead: `psycopg.pq` (libpq) driven by
trio's `wait_readable`/`wait_writable`, one prepared statement per call, text parameters, no
transaction block (each is one statement, so autocommit is atomic). Everything else stays on the
pool in `store.py`.

Errors: a lost or refused connection is `UnavailableError`; the connection is dropped, never
reused. A statement the server rejects is `QueryError` with the SQLSTATE.

Cancellation: a call cancelled half-way asks the server to cancel the statement (shielded, for
at most CANCEL_TIMEOUT_S) and closes its connection. A statement that had already committed
stays committed, as it would with a lost reply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import psycopg
import trio
from psycopg import pq
from psycopg.conninfo import make_conninfo

from wsrunner.errors import BackendError, UnavailableError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 10  #: libpq's connect_timeout, whole seconds
CALL_TIMEOUT_S: Final = 40.0  #: beyond the server's statement_timeout (30 s): the link is dead
CANCEL_TIMEOUT_S: Final = 5.0
#: SQLSTATE classes that mean "the server cannot serve now" rather than "the statement is wrong":
#: connection exception, insufficient resources, operator intervention (shutdown, cancel).
_UNAVAILABLE_CLASSES: Final = ("08", "53", "57")

Row = tuple[str | None, ...]


class QueryError(BackendError):
    """The server rejected a statement; `code` is its SQLSTATE."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(sqlstate, f"PostgreSQL error {sqlstate}: {message}")


class _Connection:
    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self.pgconn = pgconn
        self.prepared: set[str] = set()

    @classmethod
    async def open(cls, conninfo: str) -> _Connection:
        # Connecting blocks (name resolution, TLS, authentication) and is rare: a worker thread.
        pgconn = await trio.to_thread.run_sync(
            pq.PGconn.connect, conninfo.encode(), abandon_on_cancel=True
        )
        if pgconn.status != pq.ConnStatus.OK:
            message = _message(pgconn)
            pgconn.finish()
            raise UnavailableError(f"PostgreSQL connection failed: {message}")
        pgconn.nonblocking = 1
        return cls(pgconn)

    async def call(self, name: str, sql: bytes, params: Sequence[bytes | None]) -> list[Row]:
        if name not in self.prepared:
            self.pgconn.send_prepare(name.encode(), sql)
            await self._results()
            self.prepared.add(name)
        self.pgconn.send_query_prepared(name.encode(), params)
        return await self._results()

    async def _results(self) -> list[Row]:
        """Send what is buffered, then read every result of the statement; the last one's rows."""
        pgconn = self.pgconn
        while pgconn.flush():
            await trio.lowlevel.wait_writable(pgconn.socket)
        rows: list[Row] = []
        error: QueryError | None = None
        while True:
            while pgconn.is_busy():
                await trio.lowlevel.wait_readable(pgconn.socket)
                pgconn.consume_input()
            res = pgconn.get_result()
            if res is None:
                break
            if res.status == pq.ExecStatus.FATAL_ERROR:
                state = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"?????").decode()
                message = (res.error_message or b"").decode(errors="replace").strip()
                error = QueryError(state, message)
            elif res.status == pq.ExecStatus.TUPLES_OK:
                rows = [
                    tuple(
                        None if (v := res.get_value(r, c)) is None else v.decode()
                        for c in range(res.nfields)
                    )
                    for r in range(res.ntuples)
                ]
        if error is not None:
            if error.code[:2] in _UNAVAILABLE_CLASSES:
                raise UnavailableError(str(error))
            raise error
        return rows

    async def cancel(self) -> None:
        """Ask the server to stop the statement running on this connection (best effort)."""
        try:
            cancel = self.pgconn.cancel_conn()
        except psycopg.Error:  # libpq older than 17: no non-blocking cancel; closing must do
            return
        try:
            cancel.start()
            while (poll := cancel.poll()) not in (pq.PollingStatus.OK, pq.PollingStatus.FAILED):
                if poll == pq.PollingStatus.READING:
                    await trio.lowlevel.wait_readable(cancel.socket)
                else:
                    await trio.lowlevel.wait_writable(cancel.socket)
        except psycopg.Error as exc:
            logger.warning("could not cancel a PostgreSQL statement: %s", exc)
        finally:
            cancel.finish()

    def close(self) -> None:
        self.pgconn.finish()


def _message(pgconn: pq.abc.PGconn) -> str:
    return pgconn.get_error_message().strip() or "no reason given"


class LibpqPool:
    """Up to `size` connections, opened by `fill()` or when first needed; `call()` runs one
    prepared statement."""

    def __init__(self, url: str, *, options: str, size: int) -> None:
        self._conninfo = make_conninfo(
            url, options=options, client_encoding="UTF8", connect_timeout=CONNECT_TIMEOUT_S
        )
        self._idle: list[_Connection] = []
        self._size = size
        self._slots = trio.Semaphore(size)

    async def fill(self) -> None:
        """Open the connections not open yet, all at once: a statement that finds none idle
        opens one itself, and waits for it (a few milliseconds) while calls sent after it
        overtake it. A connection that cannot be opened now is left to that (logged)."""

        async def one() -> None:
            try:
                self._idle.append(await _Connection.open(self._conninfo))
            except (UnavailableError, psycopg.OperationalError) as exc:
                logger.warning("could not open a PostgreSQL connection ahead: %s", exc)

        async with trio.open_nursery() as nursery:
            for _ in range(self._size - len(self._idle)):
                nursery.start_soon(one)

    async def call(self, name: str, sql: str, params: Sequence[str | None]) -> list[Row]:
        """Run `sql` (prepared once per connection as `name`) with text `params`; its rows.

        Raises:
            UnavailableError: no connection, or it broke (it is dropped).
            QueryError: the server rejected the statement (the connection stays usable).
        """
        data = [None if p is None else p.encode() for p in params]
        try:  # (no pass through the scheduler when a connection is free: the call makes one)
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            conn = self._idle.pop() if self._idle else await _Connection.open(self._conninfo)
            ok = False
            try:
                # A deadline scope, not `fail_after` (half the cost, on every task's two calls).
                with trio.CancelScope(deadline=trio.current_time() + CALL_TIMEOUT_S):
                    rows = await conn.call(name, sql.encode(), data)
                    ok = True
                    return rows
                raise UnavailableError(f"PostgreSQL did not answer within {CALL_TIMEOUT_S:g} s")
            except QueryError:
                ok = True  # the server answered: the connection is in step
                raise
            except trio.Cancelled:
                with trio.move_on_after(CANCEL_TIMEOUT_S) as cleanup:
                    cleanup.shield = True
                    await conn.cancel()
                raise
            except psycopg.OperationalError as exc:  # the link broke: libpq says how
                raise UnavailableError(f"PostgreSQL failed: {str(exc).strip()}") from exc
            finally:
                if ok and conn.pgconn.status == pq.ConnStatus.OK:
                    self._idle.append(conn)
                else:
                    conn.close()
        finally:
            self._slots.release()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
