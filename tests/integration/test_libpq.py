"""libpq from the trio thread (`wsrunner.backends.postgres.libpq`), against the real PostgreSQL."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import DATABASE_URL
from wsrunner.backends.postgres.libpq import LibpqPool
from wsrunner.errors import BackendError, UnavailableError


async def test_a_statement_runs_prepared_and_a_rejected_one_keeps_its_connection() -> None:
    pool = LibpqPool(DATABASE_URL, options="", size=1)
    try:
        assert await pool.call("add", "SELECT $1::int + 1, NULL", ["41"]) == [("42", None)]
        # A statement the server refuses is the project's BackendError, with its SQLSTATE.
        with pytest.raises(BackendError, match="22P02") as refused:  # invalid text for an integer
            await pool.call("add", "SELECT $1::int + 1, NULL", ["x"])
        assert refused.value.code == "22P02"
        pid = await pool.call("pid", "SELECT pg_backend_pid()", [])
        assert await pool.call("pid", "SELECT pg_backend_pid()", []) == pid  # the same one
    finally:
        pool.close()


async def test_a_statement_over_the_call_timeout_fails_and_its_connection_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("wsrunner.backends.postgres.libpq.CALL_TIMEOUT_S", 0.3)
    pool = LibpqPool(DATABASE_URL, options="", size=1)
    try:
        first = await pool.call("pid", "SELECT pg_backend_pid()", [])
        started = trio.current_time()
        with pytest.raises(UnavailableError, match=r"did not answer within 0\.3 s"):
            await pool.call("sleep", "SELECT pg_sleep(5)", [])
        assert 0.3 <= trio.current_time() - started < 2
        # The next statement gets a new connection: the old one still owes the sleep's reply.
        second = await pool.call("pid", "SELECT pg_backend_pid()", [])
        assert second != first
    finally:
        pool.close()
