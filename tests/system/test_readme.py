"""The README's quick start, run as it stands in README.md, so the README cannot drift.

`./dev serve` and the README's block (read from README.md, not copied) run in a network
namespace of their own: the block names port 8080 literally, and a daemon a developer has
running on this host must not answer it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LEAD = "With `./dev serve` running, in another terminal"


def quick_start() -> str:
    """The shell block that follows the quick start's lead sentence in README.md."""
    text = (REPO / "README.md").read_text()
    found = re.search(re.escape(LEAD) + r".*?```sh\n(.*?)```", text, re.DOTALL)
    assert found, f"README.md has no ```sh block after {LEAD!r}"
    return found.group(1)


def test_the_block_is_the_quick_start() -> None:
    block = quick_start()
    assert "./dev wsrunner tokens create" in block and "echo hi" in block and "/events" in block


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace of its own needs root")
def test_the_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    block = tmp_path / "quick-start.sh"
    block.write_text(quick_start())
    log = tmp_path / "serve.log"
    # Inside the namespace: loopback up, the daemon as the README starts it, its readiness on
    # the internal port, then the block under `set -euo pipefail`, then a graceful stop.
    driver = f"""
        set -euo pipefail
        ip link set lo up
        ./dev serve > {shlex.quote(str(log))} 2>&1 &
        serve=$!
        # However the block ends, the daemon stops with it (it would outlive a failed run).
        trap 'kill -TERM "$serve" 2> /dev/null; wait "$serve" 2> /dev/null' EXIT
        for _ in $(seq 600); do
            curl -sf localhost:8081/health > /dev/null && break
            kill -0 "$serve" 2> /dev/null || {{ echo "./dev serve exited" >&2; exit 1; }}
            sleep 0.1
        done
        bash -euo pipefail {shlex.quote(str(block))}
        trap - EXIT
        kill -TERM "$serve"
        wait "$serve"
    """
    env = {
        **os.environ,
        "STATE_DIRECTORY": str(tmp_path / "state"),
        "WORKSPACE_VOLUME_PATH": str(tmp_path / "workspaces"),
        "WORKER_INTERNAL_TOKEN": "readme-test-internal-token",
    }
    for name in ("REDIS_URL", "DATABASE_URL", "WSRUNNER_CONFIG", "PUBLIC_API_PORT"):
        env.pop(name, None)  # the README's ./dev serve: the embedded backend on 8080
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is missing"
    done = subprocess.run(
        [unshare, "--net", "bash", "-c", driver],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    served = log.read_text() if log.exists() else ""
    assert done.returncode == 0, f"{done.stderr}\n--- ./dev serve:\n{served[-3000:]}"
    data = [
        json.loads(line[len("data: ") :])
        for line in done.stdout.splitlines()
        if line.startswith("data: ")
    ]
    assert {"step": 1, "stream": "stdout", "data": "hi\n"} in data, done.stdout
    assert data[-1]["status"] == "completed", done.stdout
