"""Every Redis key and channel name wsrunner uses, in one place.

With the default prefix `workspace` these are exactly the reference system's names, so its
producers (`LPUSH workspace:tasks:normal ...`) and readers keep working. Tests use a unique prefix
each, which isolates them from each other on one Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsrunner.models import PRIORITY_ORDER, Priority


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "workspace"

    def queue(self, priority: Priority | str) -> str:
        """List of JSON payloads; producers LPUSH, daemons take from the right (FIFO)."""
        return f"{self.prefix}:tasks:{priority}"

    def queues(self) -> list[str]:
        """The four queues, highest priority first."""
        return [self.queue(p) for p in PRIORITY_ORDER]

    @property
    def dead(self) -> str:
        """List of payloads that could not be parsed, wrapped with the reason."""
        return f"{self.prefix}:tasks:dead"

    def status(self, task_id: str) -> str:
        """Hash: status, workspace_id, priority, worker_id, timestamps, error (TTL 7200 s)."""
        return f"{self.prefix}:task:{task_id}:status"

    def result(self, task_id: str) -> str:
        """String: the final result JSON (TTL 3600 s)."""
        return f"{self.prefix}:task:{task_id}:result"

    def events(self, task_id: str) -> str:
        """Stream of the task's events; the same name is the legacy pub/sub channel."""
        return f"{self.prefix}:task:{task_id}:events"

    def active(self, workspace_id: str) -> str:
        """Set of the workspace's task ids that are queued or running."""
        return f"{self.prefix}:ws:{workspace_id}:active_tasks"

    def heartbeat(self, worker_id: str) -> str:
        """String: unix time of the daemon's last beat; its TTL is the lease."""
        return f"{self.prefix}:worker:{worker_id}:heartbeat"

    def worker_tasks(self, worker_id: str) -> str:
        """Set of the task ids the daemon is running (refreshed with the heartbeat)."""
        return f"{self.prefix}:worker:{worker_id}:tasks"

    def inflight(self, worker_id: str) -> str:
        """Hash claim id -> payload: what the daemon has claimed and not yet acknowledged."""
        return f"{self.prefix}:worker:{worker_id}:inflight"

    @property
    def workers(self) -> str:
        """Set of daemon ids that may hold claims (read by the reaper)."""
        return f"{self.prefix}:workers"

    @property
    def claim_seq(self) -> str:
        """Counter that makes claim ids unique."""
        return f"{self.prefix}:claim_seq"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel: a task id published here is cancelled by whichever daemon runs it."""
        return f"{self.prefix}:cancel"
