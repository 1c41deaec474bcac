"""Task definitions of the peer queues, one module each, for bench/peers.py.

Every peer runs the same job: note its start time, run `true` as a child process, note its end
time, both in the peer's own Redis database (`BENCH_REDIS_URL`).
"""
