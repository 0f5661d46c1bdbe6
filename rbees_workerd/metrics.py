"""Prometheus metrics of one worker, in its own registry (several workers may share a test process).

Named by Prometheus conventions: counters end in `_total` (prometheus-client adds it), gauges never do, no
label is named like its metric, sizes are `_bytes`. The process's own CPU, memory and file descriptors
(`process_*`), the engine process's (`rbees_engine_process_*`, once it has loaded: the model's memory is
there) and the Python runtime (`python_info`) come with them.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from rbees_workerd.schemas import WorkerState

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    """The counters, histograms and gauges `/metrics` exposes; prometheus-client makes them thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.engine_pid: int | None = None
        # (the collector reads /proc/PID: no such file before the engine has loaded, and so no samples)
        ProcessCollector(namespace="rbees_engine", pid=lambda: self.engine_pid, registry=r)
        PlatformCollector(registry=r)
        self.jobs_started = Counter("rbees_worker_jobs_started", "Jobs accepted into a slot", registry=r)
        self.jobs_completed = Counter(
            "rbees_worker_jobs_completed", "Jobs that ended normally", ["stop_reason"], registry=r
        )
        self.jobs_failed = Counter("rbees_worker_jobs_failed", "Jobs that ended with an error", registry=r)
        self.jobs_cancelled = Counter(
            "rbees_worker_jobs_cancelled", "Jobs cancelled by /cancel, a disconnect or a drain", registry=r
        )
        self.jobs_rejected = Counter(
            "rbees_worker_jobs_rejected", "Requests refused before starting", ["code"], registry=r
        )
        self.prompt_tokens = Counter("rbees_worker_prompt_tokens", "Prompt tokens processed", registry=r)
        self.tokens_generated = Counter("rbees_worker_tokens_generated", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "rbees_worker_time_to_first_token_seconds",
            "From submission to the first sampled token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "rbees_worker_token_latency_seconds",
            "Between consecutive tokens of one job",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.slots = Gauge("rbees_worker_slots", "Slots of this worker", registry=r)
        self.slots_in_use = Gauge("rbees_worker_slots_in_use", "Slots generating now", registry=r)
        self.model_bytes = Gauge("rbees_worker_model_bytes", "Memory the backend holds for the weights", registry=r)
        self.kv_cache_bytes = Gauge("rbees_worker_kv_cache_bytes", "Memory held for the KV cache", registry=r)
        self.vram_bytes = Gauge("rbees_worker_vram_bytes", "GPU memory the engine holds (all of it)", registry=r)
        self.load_progress = Gauge("rbees_worker_load_progress", "Model load progress, 0 to 1", registry=r)
        self._state = Gauge("rbees_worker_state", "1 for the lifecycle state the worker is in", ["state"], registry=r)

    def set_state(self, state: WorkerState) -> None:
        """The state's series 1, every other state's 0 (each state is a series from the start)."""
        for name in WorkerState:
            self._state.labels(name.value).set(1.0 if name is state else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
