"""One forward step between cuProfilerStart/Stop, for Nsight Compute's per-kernel figures.

    ncu --profile-from-start off --cache-control none --clock-control none --launch-skip 51 --launch-count 5 \
        --metrics gpu__time_duration.sum,smsp__inst_executed.sum python bench/cuda_step.py MODEL.gguf
    ... python bench/cuda_step.py MODEL.gguf --batch 64      # a decode step of 64 sequences
    ... python bench/cuda_step.py MODEL.gguf --prefill 512   # one 512-token prompt

Decode steps 0-21 compile, capture and warm up; step 22 is profiled (at batch 1 its graph's kernels
are the embedding, then five a layer, so --launch-skip 51 --launch-count 5 picks layer 10's q/k/v,
attention, o, gate/up, down). A prompt is run twice and the second run profiled.
"""

from __future__ import annotations

import argparse

import numpy as np
from cuda.bindings import driver as cu

from rbees_workerd.engine.engine import Engine
from rbees_workerd.kernels.backend import SamplingRow

PROFILED = 22


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--hmma-min-tokens", type=int, help="tuning: hmma.MIN_TOKENS")
    args = ap.parse_args()
    if args.hmma_min_tokens is not None:
        from rbees_workerd.kernels.cuda import hmma

        hmma.MIN_TOKENS = args.hmma_min_tokens
    b, n = args.batch, args.prefill
    engine = Engine.load(args.model, backend="cuda", slots=b, context_length=max(64, n), max_step_tokens=max(256, b, n))
    model, be = engine.model, engine.backend
    greedy = [SamplingRow(0.0, 0, 1.0, 0.0, 1.0, 0.0, np.zeros(0, np.int32))] * b
    slots = np.arange(b, dtype=np.int32)
    if n:
        tokens = (np.arange(n, dtype=np.int32) * 7919) % engine.config.vocab_size
        positions, zeros, last = np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.array([n - 1], np.int32)
        for run in range(2):
            be.synchronize()
            if run:
                cu.cuProfilerStart()
            be.sample(model.run(tokens, positions, zeros, last), greedy[:1])
            be.synchronize()
        cu.cuProfilerStop()
        return
    tokens = np.ones(b, np.int32)
    for pos in range(PROFILED + 2):
        if pos == PROFILED:
            be.synchronize()
            cu.cuProfilerStart()
        tokens = be.sample(model.run(tokens, np.full(b, pos, np.int32), slots, slots), greedy)
        if pos == PROFILED:
            be.synchronize()
            cu.cuProfilerStop()


if __name__ == "__main__":
    main()
