"""Start-up cost of the sandbox: plain spawn against the launch chain every command goes through.

    .venv/bin/python bench/sandbox_overhead.py [--runs N]

Runs as root (per-workspace uid, cgroups) or as a user (bwrap alone). Prints the median and p95
of each, in ms, side by side, measured in the same run; nothing is asserted.
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
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from wsrunner.execution.process import Capture, run_process
from wsrunner.execution.sandbox import Sandbox, probe
from wsrunner.execution.sandbox.identity import UidRange, assign
from wsrunner.policy import bundled_policy, load_policy


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


async def chain(runs: int, volume: Path, *, network: str) -> tuple[list[float], str]:
    iso = await trio.to_thread.run_sync(probe, str(volume), UidRange(200000, 265535))
    sandbox = Sandbox(iso)
    root = volume / "bench-ws"
    root.mkdir(mode=0o700, exist_ok=True)
    if iso.uids is not None:
        assign(str(volume), str(root), iso.uids)
    policy = load_policy(bundled_policy()).for_workspace("bench-ws")
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        async with sandbox.launch(
            ["/bin/true"],
            root=str(root),
            cwd=str(root),
            policy=policy.sandbox,
            limits=policy.limits,
            network=network,
            env={"PATH": "/usr/bin:/bin"},
        ) as launch:
            rc = await run_process(
                launch.argv,
                env=launch.env,
                capture=Capture.capped(1024, 1024),
                kill_grace=1,
                pass_fds=launch.pass_fds,
            )
        out.append(time.perf_counter() - t)
        assert rc == 0, rc
    return out, iso.level


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

        async def measure() -> list[tuple[str, list[float]]]:
            rows = [
                ("subprocess.run /bin/true (no sandbox)", plain(runs)),
                ("wsrunner run_process /bin/true (no sandbox)", await trio_plain(runs)),
            ]
            for mode in ("none", "egress", "host"):
                samples, level = await chain(runs, volume, network=mode)
                rows.append((f"sandboxed /bin/true ({level}, network {mode})", samples))
            return rows

        if args.json:
            samples, level = trio.run(partial(chain, runs, volume, network="none"))
            shutil.rmtree(volume, ignore_errors=True)
            print(
                json.dumps({"sandbox_median_ms": statistics.median(samples) * 1000, "level": level})
            )
            return
        rows = trio.run(measure)
        shutil.rmtree(volume, ignore_errors=True)
    print(
        f"{runs} runs each, {os.cpu_count()} CPUs, uid {os.geteuid()}, python {sys.version.split()[0]}"
    )
    for name, samples in rows:
        print(f"  {name:48} {_stats(samples)}")


if __name__ == "__main__":
    main()
