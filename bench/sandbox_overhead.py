"""Start-up cost of the sandbox: plain spawn against a warm sandbox and the cold launch chain.

    .venv/bin/python bench/sandbox_overhead.py [--runs N] [--json]

Runs as root (per-workspace uid, cgroups) or as a user (bwrap alone). Prints the median and p95
of each, in ms, side by side, measured in the same run, then what an idle warm sandbox holds
(memory) and uses (CPU over a few quiet seconds); nothing is asserted. A warm sandbox's first
command, which starts it, is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from wsrunner.execution.process import Capture, run_process
from wsrunner.execution.sandbox import Launch, NetworkMode, Sandbox, probe
from wsrunner.execution.sandbox.identity import UidRange, assign
from wsrunner.policy import EffectivePolicy, bundled_policy, load_policy


def _stats(samples: list[float]) -> str:
    samples = sorted(samples)
    p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
    return f"median {statistics.median(samples) * 1000:7.2f} ms   p95 {p95 * 1000:7.2f} ms"


def plain(runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        out.append(time.perf_counter() - t)
    return out


IDLE_S = 5.0  #: how long an idle warm sandbox's CPU use is watched


@dataclass
class Bench:
    """A sandbox, a workspace with its own uid and the bundled policy."""

    sandbox: Sandbox
    root: Path
    policy: EffectivePolicy

    @classmethod
    async def open(cls, volume: Path) -> Bench:
        iso = await trio.to_thread.run_sync(probe, str(volume), UidRange(200000, 265535))
        root = volume / "bench-ws"
        root.mkdir(mode=0o700, exist_ok=True)
        if iso.uids is not None:
            assign(str(volume), str(root), iso.uids)
        return cls(Sandbox(iso), root, load_policy(bundled_policy()).for_workspace("bench-ws"))

    def launch(
        self, argv: list[str], *, network: NetworkMode, warm: bool = False
    ) -> AbstractAsyncContextManager[Launch]:
        """`argv`'s launch in the bench workspace, with the bundled policy."""
        return self.sandbox.launch(
            argv,
            root=str(self.root),
            cwd=str(self.root),
            policy=self.policy.sandbox,
            limits=self.policy.limits,
            network=network,
            env={"PATH": "/usr/bin:/bin"},
            warm=warm,
        )

    async def true(self, *, network: NetworkMode, warm: bool = False) -> float:
        """The seconds `/bin/true` takes, from the launch to its end."""
        t = time.perf_counter()
        async with self.launch(["/bin/true"], network=network, warm=warm) as launch:
            rc = await launch.run(capture=Capture.capped(1024, 1024), kill_grace=1)
        assert rc == 0, rc
        assert not launch.sandbox_failures, launch.sandbox_failures
        assert (launch.warm is not None) == warm, "the warm sandbox was not used"
        return time.perf_counter() - t


async def chain(runs: int, volume: Path, *, network: NetworkMode) -> tuple[list[float], str]:
    bench = await Bench.open(volume)
    samples = [await bench.true(network=network) for _ in range(runs)]
    return samples, bench.sandbox.isolation.level


async def warm(runs: int, volume: Path, *, idle: bool = True) -> tuple[list[float], float, str]:
    """Commands in one warm sandbox: their samples, the first one's (which starts it), and
    what the idle sandbox holds and uses; no samples where the host keeps no warm sandbox."""
    bench = await Bench.open(volume)
    async with trio.open_nursery() as nursery:
        await nursery.start(bench.sandbox.serve_warm, 300.0, 4)
        if bench.sandbox.warm is None:
            nursery.cancel_scope.cancel()
            return [], 0.0, f"no warm sandbox: {bench.sandbox.warm_unavailable()}"
        first = await bench.true(network="none", warm=True)
        samples = [await bench.true(network="none", warm=True) for _ in range(runs)]
        (live,) = bench.sandbox.warm.sandboxes()
        pids = [live.pid, live.supervisor_pid, *_children(live.supervisor_pid)]
        held = await idle_cost(*pids) if idle else ""
        nursery.cancel_scope.cancel()
    return samples, first, held


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("Rss", "Pss"):
                fields[name] = int(value.split()[0])
    return fields["Rss"], fields["Pss"]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def idle_cost(*pids: int) -> str:
    """Memory and CPU of an idle warm sandbox: its bubblewrap, its supervisor and the spare
    the supervisor forked for the next command."""
    before = [_cpu_ticks(pid) for pid in pids]
    await trio.sleep(IDLE_S)
    ticks = sum(_cpu_ticks(pid) - b for pid, b in zip(pids, before, strict=True))
    rss, pss = (sum(m) for m in zip(*(_memory_kib(pid) for pid in pids), strict=True))
    per_tick = 1000 / os.sysconf("SC_CLK_TCK")
    return (
        f"idle warm sandbox ({len(pids)} processes): RSS {rss / 1024:.1f} MiB, "
        f"PSS {pss / 1024:.1f} MiB, CPU {ticks * per_tick:.0f} ms over {IDLE_S:g} s"
    )


async def trio_plain(runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        await run_process(["/bin/true"], env={}, capture=Capture.capped(1024, 1024), kill_grace=1)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="only the sandboxed median, as JSON")
    args = parser.parse_args()
    runs = args.runs
    with tempfile.TemporaryDirectory(prefix="wsr-bench-") as tmp:
        os.chmod(tmp, 0o711)
        volume = Path(tmp) / "volume"
        volume.mkdir(mode=0o711)

        async def measure() -> tuple[list[tuple[str, list[float]]], list[str]]:
            bare = await trio_plain(runs)
            rows = [
                ("subprocess.run /bin/true (no sandbox)", plain(runs)),
                ("wsrunner run_process /bin/true (no sandbox)", bare),
            ]
            notes = []
            samples, first, held = await warm(runs, volume)
            if samples:
                rows.append(("sandboxed /bin/true (warm sandbox, network none)", samples))
                ratio = statistics.median(samples) / statistics.median(bare)
                notes += [
                    f"warm / no sandbox: {ratio:.2f}x (medians)",
                    f"a warm sandbox's first command (starts it): {first * 1000:.1f} ms",
                ]
            notes.append(held)
            modes: tuple[NetworkMode, ...] = ("none", "egress", "host")
            for mode in modes:
                samples, level = await chain(runs, volume, network=mode)
                rows.append((f"sandboxed /bin/true ({level}, network {mode})", samples))
            return rows, notes

        if args.json:

            async def medians() -> dict[str, object]:
                samples, level = await chain(runs, volume, network="none")
                hot, _, _ = await warm(runs, volume, idle=False)
                return {
                    "sandbox_median_ms": statistics.median(samples) * 1000,
                    "warm_median_ms": statistics.median(hot) * 1000 if hot else None,
                    "level": level,
                }

            result = trio.run(medians)
            shutil.rmtree(volume, ignore_errors=True)
            print(json.dumps(result))
            return
        rows, notes = trio.run(measure)
        shutil.rmtree(volume, ignore_errors=True)
    print(
        f"{runs} runs each, {os.cpu_count()} CPUs, uid {os.geteuid()}, python {sys.version.split()[0]}"
    )
    for name, samples in rows:
        print(f"  {name:52} {_stats(samples)}")
    for note in notes:
        print(f"  {note}")


if __name__ == "__main__":
    main()
