"""Prometheus metrics of the orchestrator, in its own registry (a test process may run several).

Per-worker series are read from the registry at scrape time, so a removed worker leaves no stale series.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rbees_orcd.registry import Registry

_STATES = ("healthy", "unhealthy", "loading", "draining")
_DISPATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Live(Collector):
    """Queue depth per model and each worker's state and load, computed when scraped."""

    def __init__(self, registry: Registry, queue_depths: Callable[[], dict[str, int]]) -> None:
        self._registry = registry
        self._queue_depths = queue_depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("rbees_orcd_queue_depth", "Tasks waiting for a worker", labels=["model"])
        for model, n in sorted(self._queue_depths().items()):
            depth.add_metric([model], n)
        yield depth
        state = GaugeMetricFamily(
            "rbees_orcd_worker_state", "1 for the worker's current state", labels=["worker_id", "model", "state"]
        )
        active = GaugeMetricFamily(
            "rbees_orcd_worker_active_jobs", "Jobs relayed from the worker", labels=["worker_id"]
        )
        slots = GaugeMetricFamily("rbees_orcd_worker_slots", "Slots the worker reported", labels=["worker_id"])
        for w in self._registry.all():
            for s in _STATES:
                state.add_metric([w.worker_id, w.model, s], 1.0 if w.state == s else 0.0)
            active.add_metric([w.worker_id], w.active)
            slots.add_metric([w.worker_id], w.slots_total)
        yield state
        yield active
        yield slots


class _Relayed(Collector):
    """Token events relayed, by model: a plain count the relay adds to for each read from a worker (a counter's
    lock and checks, at every token of every stream, cost more than the rest of the relay's bookkeeping)."""

    def __init__(self, counts: dict[str, int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        relayed = CounterMetricFamily("rbees_orcd_tokens_relayed", "Token events relayed", labels=["model"])
        for model, n in sorted(self._counts.items()):
            relayed.add_metric([model], n)
        yield relayed


class OrcdMetrics:
    def __init__(self, registry: Registry, queue_depths: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.admissions = Counter("rbees_orcd_admissions", "Tasks admitted", ["model"], registry=r)
        self.rejections = Counter(
            "rbees_orcd_rejections", "Requests refused at admission", ["model", "code"], registry=r
        )
        self.dispatch_latency = Histogram(
            "rbees_orcd_dispatch_latency_seconds",
            "From admission to a worker accepting the task (queue wait included)",
            buckets=_DISPATCH_BUCKETS,
            registry=r,
        )
        self.tokens_relayed: defaultdict[str, int] = defaultdict(int)  # by model; see _Relayed
        self.tasks_ended = Counter("rbees_orcd_tasks_ended", "Tasks ended", ["model", "status"], registry=r)
        self.retries = Counter("rbees_orcd_retries", "Tasks moved off a worker before their first token", registry=r)
        self.worker_failures = Counter(
            "rbees_orcd_worker_failures", "Workers marked unhealthy", ["worker_id"], registry=r
        )
        r.register(_Live(registry, queue_depths))
        r.register(_Relayed(self.tokens_relayed))

    def render(self) -> bytes:
        return generate_latest(self.registry)
