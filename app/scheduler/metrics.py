"""Prometheus metrics of the invoke path, the scheduler and the workers.

Each platform has its own registry, so that several control planes in one process (tests) do
not share counters. Instance gauges are computed when scraped, from the scheduler's view.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.scheduler.service import Scheduler

DURATION_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
)
WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class InstanceCollector(Collector):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily(
            "lambent_instances",
            "Live execution environments known to the scheduler",
            labels=["worker", "tenant", "function", "state"],
        )
        counts: Tally[tuple[str, str, str, str]] = Tally()
        for lease in list(self.scheduler.live.values()):
            counts[
                (
                    lease.worker.worker_id,
                    lease.spec.tenant_id,
                    lease.spec.function_name,
                    str(lease.state),
                )
            ] += 1
        for labels, count in counts.items():
            by_state.add_metric(list(labels), count)
        yield by_state

        memory = GaugeMetricFamily(
            "lambent_worker_memory_mb", "Worker memory for instances", labels=["worker", "kind"]
        )
        for worker in list(self.scheduler.workers):
            memory.add_metric([worker.worker_id, "capacity"], worker.capacity_mb)
            memory.add_metric([worker.worker_id, "free"], worker.free_mb)
        yield memory


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["tenant", "function"]
        self.invocations = Counter(
            "lambent_invocations",
            "Invocations by outcome",
            [*labels, "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lambent_invocation_errors",
            "Failed invocations by error type",
            [*labels, "error_type"],
            registry=self.registry,
        )
        self.throttles = Counter(
            "lambent_throttles",
            "Invocations refused by a concurrency limit",
            [*labels, "reason"],
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "lambent_cold_starts",
            "Invocations that started a new instance",
            labels,
            registry=self.registry,
        )
        self.duration = Histogram(
            "lambent_invocation_duration_seconds",
            "Function duration",
            labels,
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.init_duration = Histogram(
            "lambent_init_duration_seconds",
            "Init phase of cold starts",
            labels,
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "lambent_queue_wait_seconds",
            "Time invocations waited for worker capacity",
            labels,
            buckets=WAIT_BUCKETS_S,
            registry=self.registry,
        )

        # prometheus_client checks and looks up the label values on every labels() call; the
        # invoke path makes several per invocation, so the children are kept. Label sets are
        # never removed, so neither are they.
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def watch(self, scheduler: Scheduler) -> None:
        self.registry.register(InstanceCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)
