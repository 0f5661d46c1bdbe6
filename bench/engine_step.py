"""The engine's own Python per step, as the GPU worker runs it: the real Engine (batching, sampling rows,
accepting tokens) and the scheduler thread's grouping of a step's events, over a device whose steps take no
time (bench/timed_engine.py; the GPU's share of a step is bench/cuda_bench.py's). Each figure is host time on the
thread that owns the GPU, which the serving path's event loop shares through the GIL.

    python bench/engine_step.py --streams 64,256 --steps 400 --rounds 5

Per round, the median step (and the mean, which the garbage collector's pauses and other processes raise);
the median of the rounds' figures is printed.

The device queues ahead as a GPU does, so every step after the first two takes the GPU's path: the next step
batched and launched before this one's picks are read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timed_engine import timed_engine  # noqa: E402

from rbees_workerd.engine.types import GenerationParams  # noqa: E402
from rbees_workerd.scheduler import Scheduler  # noqa: E402


def measure(streams: int, steps: int) -> list[float]:
    """µs of host time of each of `steps` steps (Engine.step and the scheduler's grouping) with `streams`
    greedy sequences."""
    engine = timed_engine(SimpleNamespace(eos_ids=frozenset({0})), streams, 0.0, [100])
    scheduler = Scheduler(engine, lambda out: None, lambda e: None)
    params = GenerationParams(max_tokens=1 << 30, temperature=0.0)
    for i in range(streams):
        engine.submit([1, 2, 3], params, seq_id=f"job-{i}", detokenize=False)
        scheduler._running.add(f"job-{i}")
    for _ in range(3):  # the prompts, then the steady state (a step queued ahead of each read)
        scheduler._step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        scheduler._step()
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="64,256")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    for streams in (int(v) for v in a.streams.split(",")):
        rounds = [measure(streams, a.steps) for _ in range(a.rounds)]
        medians = [statistics.median(r) for r in rounds]
        med = statistics.median(medians)
        mean = statistics.median(statistics.fmean(r) for r in rounds)
        print(json.dumps({
            "streams": streams, "us_per_step_median": round(med, 1), "us_per_sequence": round(med / streams, 3),
            "us_per_step_mean": round(mean, 1), "round_medians": [round(m, 1) for m in medians],
        }))  # fmt: skip


if __name__ == "__main__":
    main()
