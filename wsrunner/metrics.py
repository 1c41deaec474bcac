"""Prometheus metrics of one daemon: counters and histograms the runner feeds, gauges read at
scrape time. Labels are low-cardinality (status, priority, reason, route template), never ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cache
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from wsrunner import __version__

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_HTTP_SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
REQUEUE_REASONS: Final = ("shutdown", "dead_daemon", "start_failed", "missing_from_queue")
REAP_OUTCOMES: Final = ("requeued", "failed")
DEAD_LETTER_REASONS: Final = ("invalid_json", "invalid_payload")
WARM_STARTS: Final = ("ahead", "joined", "cold")  #: how a command that may run warm started
WARM_STOPS: Final = ("idle", "room", "replaced", "failed", "shutdown")

# A `_created` series per counter and histogram child only adds samples: Prometheus reads resets
# from the counters themselves. The switch is process-wide; this module is the only exporter.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it untyped


class Metrics:
    """One registry per daemon, so several daemons in one process keep apart."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tasks_started = Counter(
            "wsrunner_tasks_started_total",
            "Task starts (attempts), by priority",
            ["priority"],
            registry=r,
        )
        self.tasks_finished = Counter(
            "wsrunner_tasks_finished_total",
            "Tasks ended here, by final status and priority",
            ["status", "priority"],
            registry=r,
        )
        self.task_seconds = Histogram(
            "wsrunner_task_duration_seconds",
            "Run time of ended tasks, by final status",
            ["status"],
            buckets=_SECONDS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "wsrunner_step_duration_seconds",
            "Run time of steps, by action",
            ["action"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "wsrunner_queue_depth", "Tasks waiting, by priority queue", ["priority"], registry=r
        )
        self.slots_busy = Gauge("wsrunner_slots_busy", "Task slots running a task", registry=r)
        self.slots_capacity = Gauge(
            "wsrunner_slots_capacity", "Task slots of this daemon", registry=r
        )
        self.backend_errors = Counter(
            "wsrunner_backend_errors_total",
            "Failed calls to Redis or PostgreSQL",
            ["backend"],
            registry=r,
        )
        self.dir_operations = Counter(
            "wsrunner_task_dir_operations_total",
            "Task directories made or removed, by who did it: helper "
            "(the helper process) or thread (a worker thread: the case "
            "was unusual, or the helper was down)",
            ["by"],
            registry=r,
        )
        self.sse_subscribers = Gauge("wsrunner_sse_subscribers", "Open event streams", registry=r)
        self.policy_denials = Counter(
            "wsrunner_policy_denials_total",
            "Commands the policy denied (mode=audit: ran anyway), by rule",
            ["mode", "rule"],
            registry=r,
        )
        self.sandbox_refusals = Counter(
            "wsrunner_sandbox_refusals_total",
            "Commands refused because the host is below the isolation the policy requires",
            registry=r,
        )
        self.policy_reload_ok = Gauge(
            "wsrunner_policy_last_reload_successful",
            "1 if the last policy (re)load succeeded",
            registry=r,
        )
        self.policy_reload_time = Gauge(
            "wsrunner_policy_last_reload_success_timestamp_seconds",
            "When the policy was last loaded successfully",
            registry=r,
        )
        self.policy_reload_failures = Counter(
            "wsrunner_policy_reload_failures_total", "Policy reloads refused as invalid", registry=r
        )
        self.policy_info = Gauge(
            "wsrunner_policy_info", "The active policy version", ["digest"], registry=r
        )
        self.isolation = Enum(
            "wsrunner_isolation",
            "Isolation this host gives commands",
            states=["none", "partial", "full"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "wsrunner_task_queue_wait_seconds",
            "Time from a task's queueing (the payload's created_at) to "
            "its first start in a slot, by priority",
            ["priority"],
            buckets=_SECONDS,
            registry=r,
        )
        self.workspace_wait = Histogram(
            "wsrunner_workspace_wait_seconds",
            "Time a workspace's next task waited for the workspace to be free: from the "
            "first claim that found it full with tasks waiting to the claim that took one",
            buckets=_SECONDS,
            registry=r,
        )
        self.tasks_waiting = Gauge(
            "wsrunner_tasks_waiting",
            "Queued tasks by what holds them back: workspace_busy (its workspace runs as "
            "many as it may), token_limit (its token's max_running), no_free_slot (runnable), "
            "home_unavailable (its home host is gone)",
            ["reason"],
            registry=r,
        )
        self.requeues = Counter(
            "wsrunner_task_requeues_total",
            "Tasks handed back to the queue, by reason: shutdown (a stopping "
            "daemon gave back a task it ran or had just claimed), dead_daemon "
            "(the reaper took it from a daemon whose lease ran out), "
            "start_failed (the start could not be recorded), "
            "missing_from_queue (the store had it queued, the queue did not)",
            ["reason"],
            registry=r,
        )
        self.reaps = Counter(
            "wsrunner_task_reaps_total",
            "Tasks of dead daemons the lease reaper recovered, by outcome: "
            "requeued, or failed (max_attempts starts reached)",
            ["outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "wsrunner_task_dead_letters_total",
            "Payloads moved to the dead-letter list, by reason: invalid_json or invalid_payload",
            ["reason"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "wsrunner_http_request_duration_seconds",
            "Time from an HTTP request to the start of its response "
            "(an event stream is timed to its start, not its end), by "
            "api, method, route template (unmatched: no route) and "
            "status",
            ["api", "method", "route", "status"],
            buckets=_HTTP_SECONDS,
            registry=r,
        )
        # What the default registry has: the process (CPU, memory, descriptors), the
        # interpreter's version (python_info) and its garbage collector.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.warm = _WarmCollector()
        r.register(self.warm)
        build = Gauge("wsrunner_build_info", "Version of this daemon", ["version"], registry=r)
        build.labels(version=__version__).set(1)
        # The children every task feeds, by their label values in order, remembered: `labels()`
        # takes a lock and builds its key on each call, several times per task.
        self.started = cache(self.tasks_started.labels)  #: (priority)
        self.finished = cache(self.tasks_finished.labels)  #: (status, priority)
        self.task_time = cache(self.task_seconds.labels)  #: (status)
        self.step_time = cache(self.step_seconds.labels)  #: (action)
        self.dir_operation = cache(self.dir_operations.labels)  #: (by)
        self.waited = cache(self.queue_wait.labels)  #: (priority)
        self.requeue = cache(self.requeues.labels)  #: (reason)
        self.reap = cache(self.reaps.labels)  #: (outcome)
        self.dead_letter = cache(self.dead_letters.labels)  #: (reason)
        self.http_time = cache(self.http_seconds.labels)  #: (api, method, route, status)
        # Every known reason is exported from the start, at 0, so rate() sees the first one.
        for reason in REQUEUE_REASONS:
            self.requeue(reason)
        for outcome in REAP_OUTCOMES:
            self.reap(outcome)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letter(reason)

    def policy_loaded(self, digest: str, at: float) -> None:
        self.policy_reload_ok.set(1)
        self.policy_reload_time.set(at)
        self.policy_info.clear()
        self.policy_info.labels(digest=digest).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WarmCollector:
    """The warm sandboxes, as last seen (`seen`, at scrape time): gauges of the live ones and
    counters the sandbox pool keeps (every label value from the start, at 0)."""

    def __init__(self) -> None:
        self.alive = self.running = self.starts = 0
        self.commands: Mapping[str, int] = {}
        self.stops: Mapping[str, int] = {}

    def seen(
        self,
        alive: int,
        running: int,
        starts: int,
        commands: Mapping[str, int],
        stops: Mapping[str, int],
    ) -> None:
        self.alive, self.running, self.starts = alive, running, starts
        self.commands, self.stops = dict(commands), dict(stops)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("wsrunner_warm_sandboxes", "Live warm sandboxes", self.alive)
        yield GaugeMetricFamily(
            "wsrunner_warm_commands_running", "Commands running in warm sandboxes", self.running
        )
        yield CounterMetricFamily(
            "wsrunner_warm_sandbox_starts", "Warm sandboxes started", self.starts
        )
        stops = CounterMetricFamily(
            "wsrunner_warm_sandbox_stops", "Warm sandboxes ended, by why", labels=["reason"]
        )
        for reason in WARM_STOPS:
            stops.add_metric([reason], self.stops.get(reason, 0))
        yield stops
        commands = CounterMetricFamily(
            "wsrunner_warm_commands",
            "Commands that may run in a warm sandbox, by how they started: in cgroups made "
            "ahead, in cgroups made as they started, or cold",
            labels=["start"],
        )
        for start in WARM_STARTS:
            commands.add_metric([start], self.commands.get(start, 0))
        yield commands
