"""Where a batch-1 decode step's time goes on the CUDA backend: host-side phases, timed separately.

    python bench/cuda_profile.py MODEL.gguf [--steps 64] [--batch 1] [--prefill N] [--no-overlap]

"steps back to back" queues the step's graph `steps` times before one synchronization: the
device's time per step without the host's round trip between steps.

Run it under `ncu --metrics gpu__time_duration.sum --print-summary per-kernel`
for the per-kernel device times of the captured graph's nodes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from rbees_workerd.engine.engine import Engine
from rbees_workerd.kernels.backend import SamplingRow


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=0, help="time N-token prefill steps instead of decode")
    ap.add_argument("--no-overlap", action="store_true", help="graphs without programmatic dependent launch")
    args = ap.parse_args()
    from rbees_workerd.kernels.cuda import backend

    backend.PROGRAMMATIC = not args.no_overlap
    b = args.batch
    engine = Engine.load(args.model, backend="cuda", slots=b, context_length=max(args.steps + 1, args.prefill),
                         max_step_tokens=max(256, b, args.prefill))  # fmt: skip
    model, be = engine.model, engine.backend
    greedy = [SamplingRow(0.0, 0, 1.0, 0.0, 1.0, 0.0, np.zeros(0, np.int32))] * b
    slots = rows = np.arange(b, dtype=np.int32)
    tokens = np.ones(b, np.int32)
    phases: dict[str, list[float]] = {"step (upload + graph launch)": [], "step synchronized": [], "sample": []}
    if args.prefill:
        tokens = np.arange(args.prefill, dtype=np.int32) % engine.config.vocab_size
        greedy = greedy[:1]
    for pos in range(args.steps):
        t0 = time.perf_counter()
        if args.prefill:
            n = args.prefill
            logits = model.run(tokens, np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.array([n - 1], np.int32))
        else:
            logits = model.run(tokens, np.full(b, pos, np.int32), slots, rows)
        t1 = time.perf_counter()
        be.synchronize()
        t2 = time.perf_counter()
        ids = be.sample(logits, greedy)
        if not args.prefill:
            tokens = ids
        t3 = time.perf_counter()
        if pos >= 2:  # the first steps compile and capture
            phases["step (upload + graph launch)"].append(t1 - t0)
            phases["step synchronized"].append(t2 - t0)
            phases["sample"].append(t3 - t2)
    if not args.prefill:
        positions = np.zeros(b, np.int32)
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                model.run(tokens, positions, slots, rows)
            be.synchronize()
            phases.setdefault("steps back to back, each", []).append((time.perf_counter() - t0) / args.steps)
    for name, times in phases.items():
        print(f"{name:>32}: median {statistics.median(times) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
