"""Loading a worker: progress by phase (the engine's callback and the daemon's /ready), and `--threads`
applied where the steps run (Numba's thread count is per thread)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numba
import pytest
from worker_harness import run_daemon

from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.types import GenerationParams
from rbees_workerd.scheduler import Scheduler, StepOutput

PHASES = ("loading", "compiling kernels", "warming up")


def test_the_engine_reports_weights_by_bytes_then_compiling_then_warming_up(model_path: Path) -> None:
    reports: list[tuple[str, float]] = []
    engine = Engine.load(model_path, slots=1, context_length=64, on_progress=lambda p, f: reports.append((p, f)))
    phases = [phase for phase, _ in reports]
    assert phases[0] == "loading" and set(phases) == set(PHASES)
    assert phases == sorted(phases, key=PHASES.index)  # in order, each phase once begun is never returned to
    loading = [fraction for phase, fraction in reports if phase == "loading"]
    assert loading[0] == 0.0 and loading[-1] == 1.0 and loading == sorted(loading)
    assert len(loading) > engine.config.n_layers * 7  # one report a tensor, not one a layer
    assert reports[-1] == ("warming up", 1.0)


def test_ready_reports_real_progress_and_its_phase_while_loading(tmp_path: Path) -> None:
    """Every /ready answer before Ready is a 503 with progress below 1; progress never goes back; the phase
    names what loading is doing; Ready is 200 with progress 1 and no phase."""
    seen: list[dict[str, Any]] = []
    with run_daemon(tmp_path, "--slots", "4", "--context-length", "2048", wait_ready=False) as daemon:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not seen or not seen[-1]["ready"]):
            assert daemon.proc.poll() is None, daemon.log_path.read_text()
            time.sleep(0.01)
            try:
                r = httpx.get(f"{daemon.url}/ready", timeout=5)
            except httpx.TransportError:
                continue
            seen.append({**r.json(), "status_code": r.status_code})
    assert seen and seen[-1]["ready"], seen[-5:]
    loading = [s for s in seen if not s["ready"]]
    assert loading, "the daemon was never seen loading"
    for s in loading:
        assert s["status_code"] == 503 and 0.0 <= s["load_progress"] < 1.0, s
        assert (s["state"], s["phase"]) == ("Starting", None) or (s["state"] == "Loading" and s["phase"] in PHASES), s
    progress = [s["load_progress"] for s in seen]
    assert progress == sorted(progress)
    phases = [s["phase"] for s in loading if s["phase"] is not None]
    assert phases and phases == sorted(phases, key=PHASES.index), phases
    assert {k: seen[-1][k] for k in ("status_code", "state", "load_progress", "phase")} == {
        "status_code": 200,
        "state": "Ready",
        "load_progress": 1.0,
        "phase": None,
    }


def _threads_while_generating(engine: Engine) -> set[int]:
    """Numba's thread count as the scheduler's own thread sees it while it runs a job."""
    seen: set[int] = set()
    done = threading.Event()

    def on_step(step: StepOutput) -> None:  # called on the scheduler thread, once per step
        seen.add(numba.get_num_threads())
        if any(job.finish is not None for job in step.jobs):
            done.set()

    scheduler = Scheduler(engine, on_step, on_fatal=lambda e: done.set())
    scheduler.start()
    try:
        scheduler.submit("threads", [1, 2, 3], GenerationParams(max_tokens=3, temperature=0.0)).result(60)
        assert done.wait(120)
    finally:
        scheduler.stop(timeout=30)
    return seen


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one CPU: no thread count below the default")
def test_threads_apply_in_the_scheduler_thread(model_path: Path) -> None:
    try:
        engine = Engine.load(model_path, slots=1, context_length=64, threads=1)
        assert _threads_while_generating(engine) == {1}
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # this (loading) thread's count, set by the load
    default = Engine.load(model_path, slots=1, context_length=64)
    assert _threads_while_generating(default) == {numba.config.NUMBA_NUM_THREADS}
