"""N concurrent SSE subscribers of a wsrunner daemon, in one process; prints a JSON line.

    python bench/sse_clients.py URL TOKEN N TASK_ID...

Subscriber k follows TASK_ID[k % len]. For each event received live (its stream id, a Redis
millisecond timestamp, is later than the moment the subscriber connected) the delivery latency
is the receive time minus that timestamp. Prints {"latencies_ms": [...], "connected": n,
"ended": n, "errors": [...]}.
"""

from __future__ import annotations

import json
import sys
import time

import httpx
import trio


async def main(url: str, token: str, n: int, task_ids: list[str]) -> None:
    latencies: list[float] = []
    errors: list[str] = []
    counts = {"connected": 0, "ended": 0}
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120, connect=60), limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as client:  # fmt: skip

        async def subscriber(k: int) -> None:
            tid = task_ids[k % len(task_ids)]
            since_ms = time.time() * 1000
            try:
                async with client.stream("GET", f"/api/tasks/{tid}/events") as r:
                    counts["connected"] += 1
                    async for line in r.aiter_lines():
                        if line.startswith("id:"):
                            stamp = int(line[3:].strip().split("-")[0])
                            if stamp > since_ms:
                                latencies.append(time.time() * 1000 - stamp)
                counts["ended"] += 1
            except httpx.HTTPError as exc:
                errors.append(repr(exc))

        async with trio.open_nursery() as nursery:
            for k in range(n):
                nursery.start_soon(subscriber, k)
    print(json.dumps({"latencies_ms": latencies, **counts, "errors": errors[:5]}))


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
