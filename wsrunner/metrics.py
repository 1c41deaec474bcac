"""Prometheus metrics of one daemon: counters and histograms the runner feeds, gauges read at
scrape time. Labels are low-cardinality (status, priority, action, backend), never ids.
"""

from __future__ import annotations

from functools import cache
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from wsrunner import __version__

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """One registry per daemon, so several daemons in one process keep apart."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tasks_started = Counter("wsrunner_tasks_started_total",
                                     "Task starts (attempts), by priority", ["priority"], registry=r)  # fmt: skip
        self.tasks_finished = Counter("wsrunner_tasks_finished_total",
                                      "Tasks ended here, by final status and priority",
                                      ["status", "priority"], registry=r)  # fmt: skip
        self.task_seconds = Histogram("wsrunner_task_duration_seconds",
                                      "Run time of ended tasks, by final status", ["status"],
                                      buckets=_SECONDS, registry=r)  # fmt: skip
        self.step_seconds = Histogram("wsrunner_step_duration_seconds",
                                      "Run time of steps, by action", ["action"],
                                      buckets=_SECONDS, registry=r)  # fmt: skip
        self.queue_depth = Gauge("wsrunner_queue_depth", "Tasks waiting, by priority queue",
                                 ["priority"], registry=r)  # fmt: skip
        self.slots_busy = Gauge("wsrunner_slots_busy", "Task slots running a task", registry=r)
        self.slots_total = Gauge("wsrunner_slots_total", "Task slots of this daemon", registry=r)
        self.backend_errors = Counter("wsrunner_backend_errors_total",
                                      "Failed calls to Redis or PostgreSQL", ["backend"],
                                      registry=r)  # fmt: skip
        self.dir_operations = Counter("wsrunner_task_dir_operations_total",
                                      "Task directories made or removed, by who did it: helper "
                                      "(the helper process) or thread (a worker thread: the case "
                                      "was unusual, or the helper was down)", ["by"], registry=r)  # fmt: skip
        self.sse_subscribers = Gauge("wsrunner_sse_subscribers", "Open event streams", registry=r)
        self.policy_denials = Counter("wsrunner_policy_denials_total",
                                      "Commands the policy denied (mode=audit: ran anyway), by rule",
                                      ["mode", "rule"], registry=r)  # fmt: skip
        self.sandbox_refusals = Counter("wsrunner_sandbox_refusals_total",
                                        "Commands refused because the host is below the "
                                        "isolation the policy requires", registry=r)  # fmt: skip
        self.policy_reload_ok = Gauge("wsrunner_policy_last_reload_successful",
                                      "1 if the last policy (re)load succeeded", registry=r)  # fmt: skip
        self.policy_reload_time = Gauge("wsrunner_policy_last_reload_success_timestamp_seconds",
                                        "When the policy was last loaded successfully", registry=r)  # fmt: skip
        self.policy_reload_failures = Counter("wsrunner_policy_reload_failures_total",
                                              "Policy reloads refused as invalid", registry=r)  # fmt: skip
        self.policy_info = Gauge("wsrunner_policy_info", "The active policy version",
                                 ["digest"], registry=r)  # fmt: skip
        self.isolation = Gauge("wsrunner_isolation_level",
                               "Isolation this host gives commands: 2 full, 1 partial, 0 none",
                               registry=r)  # fmt: skip
        build = Gauge("wsrunner_build_info", "Version of this daemon", ["version"], registry=r)
        build.labels(version=__version__).set(1)
        # The children every task feeds, by their label values in order, remembered: `labels()`
        # takes a lock and builds its key on each call (2.5 µs; six calls per task).
        self.started = cache(self.tasks_started.labels)  #: (priority)
        self.finished = cache(self.tasks_finished.labels)  #: (status, priority)
        self.task_time = cache(self.task_seconds.labels)  #: (status)
        self.step_time = cache(self.step_seconds.labels)  #: (action)
        self.dir_operation = cache(self.dir_operations.labels)  #: (by)

    def policy_loaded(self, digest: str, at: float) -> None:
        self.policy_reload_ok.set(1)
        self.policy_reload_time.set(at)
        self.policy_info.clear()
        self.policy_info.labels(digest=digest).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
