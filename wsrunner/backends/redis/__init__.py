"""Redis: work queue and claims, status mirror, events, membership, cancel bus.

Two clients, by role. `resp.py` is the per-task client: RESP over trio streams, a pool of its
own, every command a task costs and the blocking waits (events, idle wait for work). redis-py's
asyncio client, through trio-asyncio, keeps only the cancel channel's subscription (`queue.py`),
which is one long-lived connection per daemon. A round trip costs about a quarter of redis-py's
through trio-asyncio (`bench/clients.py`). Both raise redis-py's exception types; `queue.py`
turns them into `UnavailableError` in one place.
"""
