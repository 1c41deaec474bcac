"""wsrunner's cold sandbox launch, replayed by a peer's job (`dramatiq+pg+bwrap` in peers.py).

The bench, where wsrunner is importable, asks wsrunner's Sandbox for the cold launch of one
command in a bench workspace and writes it out as a template (`export_cold_chain` in
bench/peers.py); BENCH_PEER_SANDBOX names that file. Each command here then goes through the
same chain as a cold wsrunner command: a cgroup of its own in every hierarchy (made, limited,
killed and removed by wsrunner's own cgroups.py), the set-up shell (joins the cgroups, sets the
rlimits), setpriv to the workspace's uid, and bubblewrap with wsrunner's profile and seccomp
filter, its arguments and data in fresh memfds, as wsrunner passes them.

Template tokens: `{cgroup.procs}` stands for the command's cgroup.procs files, `{fdN}` for the
descriptor of file N (given anew to every command: bubblewrap reads each one to its end), and
`{command}` for the command's argv.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def _cgroups_module() -> Any:
    """wsrunner's cgroups.py, loaded by path: it needs only the standard library, while its
    package needs wsrunner's dependencies, which the peers' venv does not have."""
    path = ROOT / "wsrunner" / "execution" / "sandbox" / "cgroups.py"
    spec = importlib.util.spec_from_file_location("wsrunner_cgroups", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class ColdChain:
    """The exported launch of one cold wsrunner command, ready to run any argv."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.cgroups = _cgroups_module()
        self.support = self.cgroups.CgroupSupport(
            tuple(
                self.cgroups.Hierarchy(h["kind"], h["base"], frozenset(h["controllers"]), h["kill"])
                for h in spec["cgroups"]
            )
        )
        self.limits: dict[str, Any] = spec["limits"]
        self.argv: list[str] = spec["argv"]
        self.env: dict[str, str] = spec["env"]
        #: each file: its bytes, or (the bwrap argument file) a template of its NUL-joined items
        self.files: list[bytes | list[str]] = [
            base64.b64decode(f["data"]) if "data" in f else f["args"] for f in spec["files"]
        ]

    @classmethod
    def load(cls, path: str) -> ColdChain:
        return cls(json.loads(Path(path).read_text()))

    def run(self, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        """Run `command` through the chain (`subprocess.run`'s contract, `kwargs` its own)."""
        group = self.cgroups.CommandGroup(self.support, f"peer-{uuid.uuid4().hex[:12]}")
        fds: list[int] = []
        try:
            group.create(**self.limits)
            tokens = {"{cgroup.procs}": group.procs_files, "{command}": command}
            for item in self.files:
                if isinstance(item, list):
                    item = b"".join(os.fsencode(a) + b"\0" for a in _expand(item, tokens))
                fds.append(fd := os.memfd_create("peer-launch"))
                os.write(fd, item)
                os.lseek(fd, 0, os.SEEK_SET)
                tokens[f"{{fd{len(fds) - 1}}}"] = [str(fd)]
            return subprocess.run(_expand(self.argv, tokens), pass_fds=fds, env=self.env, **kwargs)
        finally:
            for fd in fds:
                os.close(fd)
            if group.dirs:  # as wsrunner after every command: kill what is left, remove
                group.kill()
                group.remove()


def _expand(template: list[str], tokens: dict[str, list[str]]) -> list[str]:
    return [value for item in template for value in tokens.get(item, [item])]


CHAIN = (
    ColdChain.load(os.environ["BENCH_PEER_SANDBOX"]) if "BENCH_PEER_SANDBOX" in os.environ else None
)
