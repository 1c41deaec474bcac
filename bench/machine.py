"""CPU time from /proc, read the same way by every script of bench/ and the peers' rounds."""

from __future__ import annotations

import os


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy, all cores (idle and iowait left out): a
    worker, its children, Redis and, for wsrunner, PostgreSQL all count."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_s(stat: str, *, children: bool = False) -> float:
    """CPU seconds (user + system) in a /proc `stat` file (`/proc/PID/stat`, or a thread's):
    its process's or thread's own, or its reaped children's; 0 if it is gone."""
    try:
        with open(stat) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")
