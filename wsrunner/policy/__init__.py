"""Command policies: versioned YAML files that decide, early and with reasons, what may run.

The policy is the gate (fast, explainable errors); the OS sandbox (`wsrunner.execution.sandbox`) is the
boundary. `LivePolicy` is what the daemon holds: the current `PolicySet`, swapped atomically on
reload only after the new files validated, so a bad edit never leaves the daemon without one.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from wsrunner.policy.engine import (
    Decision,
    EffectivePolicy,
    Limits,
    PolicySet,
    SandboxPolicy,
    Verdict,
)
from wsrunner.policy.loader import PolicyError, bundled_policy, load_policy_files

__all__ = [
    "Decision",
    "EffectivePolicy",
    "Limits",
    "LivePolicy",
    "PolicyError",
    "PolicySet",
    "SandboxPolicy",
    "Verdict",
    "bundled_policy",
    "load_policy",
]

logger = logging.getLogger(__name__)


def load_policy(
    base: str | os.PathLike[str],
    dropin_dir: str | os.PathLike[str] | None = None,
    overlays: tuple[str | os.PathLike[str], ...] = (),
) -> PolicySet:
    """Load and validate a base policy and its drop-ins; raises PolicyError with every problem."""
    return PolicySet(load_policy_files(base, dropin_dir, overlays))


@dataclass(slots=True)
class LivePolicy:
    """The daemon's current policy and the outcome of its last reload."""

    base_file: Path
    dropin_dir: Path | None
    current: PolicySet
    last_reload_ok: bool = True
    last_reload_at: float = field(default_factory=time.time)
    reload_failures: int = 0

    @classmethod
    def open(cls, base: Path, dropin_dir: Path | None) -> LivePolicy:
        return cls(base, dropin_dir, load_policy(base, dropin_dir))

    def for_workspace(self, workspace: str) -> EffectivePolicy:
        return self.current.for_workspace(workspace)

    def base(self) -> EffectivePolicy:
        """The policy without workspace-specific overlays (what the start-up checks judge)."""
        return self.current.for_workspace("")

    def reload(self) -> bool:
        """Load the files again; keep the old policy if they are invalid. Blocks: use a thread."""
        try:
            fresh = load_policy(self.base_file, self.dropin_dir)
        except PolicyError as exc:
            self.last_reload_ok = False
            self.reload_failures += 1
            logger.error(
                "policy reload failed; policy %s stays active:\n%s", self.current.digest, exc
            )
            return False
        old, self.current = self.current.digest, fresh
        self.last_reload_ok, self.last_reload_at = True, time.time()
        logger.info("policy reloaded: %s -> %s (%s)", old, fresh.digest, ", ".join(fresh.sources))
        return True
