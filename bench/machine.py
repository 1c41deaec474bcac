"""The machine's CPU, read the same way by bench/peers.py and by the peers' rounds."""

from __future__ import annotations

import os


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy, all cores (idle and iowait left out): a
    worker, its children, Redis and, for wsrunner, PostgreSQL all count."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
