"""N concurrent SSE subscribers of a wsrunner daemon, in one process; writes a JSON file.

    python bench/sse_clients.py OUT HOST PORT TOKEN N TASK_ID...

Subscriber k follows TASK_ID[k % len] over its own HTTP/1.1 connection. The client is kept as
light as it can be (raw trio sockets; only the `id:` lines are looked at) so that with a
thousand subscribers on a 2-core machine it is the daemon that is measured, not an HTTP parser.
For each event received live (its stream id, a Redis millisecond timestamp, is later than the
first bytes of the response: the history replayed on connecting is not counted) the delivery
latency is the receive time minus that timestamp.
Writes {"latencies_ms": [...], "connected": n, "ended": n, "errors": [...]} to OUT.
"""

from __future__ import annotations

import json
import re
import sys
import time

import trio

ID_LINE = re.compile(rb"(?m)^id: (\d+)-\d+\r?$")
END = b"0\r\n\r\n"  # the last chunk of a chunked response: the stream ended


async def main(out: str, host: str, port: int, token: str, n: int, task_ids: list[str]) -> None:
    latencies: list[float] = []
    errors: list[str] = []
    counts = {"connected": 0, "ended": 0}

    async def subscriber(k: int) -> None:
        request = (
            f"GET /api/tasks/{task_ids[k % len(task_ids)]}/events HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        since_ms = None
        try:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(request)
                counts["connected"] += 1
                tail = b""
                while data := await stream.receive_some(65536):
                    now = time.time() * 1000
                    if since_ms is None:  # the response began: from here on, events are live
                        since_ms, buf = now, tail + data
                        tail = buf[buf.rfind(b"\n") + 1 :]
                        continue
                    buf = tail + data
                    for m in ID_LINE.finditer(buf):
                        stamp = int(m.group(1))
                        if stamp > since_ms:
                            latencies.append(now - stamp)
                    if buf.endswith(END):
                        break
                    tail = buf[buf.rfind(b"\n") + 1 :]  # a line cut by the read
                counts["ended"] += 1  # the last chunk, or the server closed the stream
        except OSError as exc:
            errors.append(repr(exc))

    async with trio.open_nursery() as nursery:
        for k in range(n):
            nursery.start_soon(subscriber, k)
    result = json.dumps({"latencies_ms": latencies, **counts, "errors": errors[:5]})
    await trio.Path(out).write_text(result)


if __name__ == "__main__":
    out, host, port, token, n, *ids = sys.argv[1:]
    trio.run(main, out, host, int(port), token, int(n), ids)
