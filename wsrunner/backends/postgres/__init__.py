"""PostgreSQL: the durable task records and API tokens, and migrations.

Two clients, by role. `libpq.py` is the per-task client: the two statements every task runs
(start, end), prepared, with libpq in non-blocking mode on the trio thread. The psycopg pool in
`store.py` runs everything else (transactions, migrations, listings, tokens) in worker threads.
A statement on the per-task client costs about a quarter of one through the pool and a thread
hop (`bench/clients.py`). Both raise only `UnavailableError` and `BackendError` past this package.
"""
