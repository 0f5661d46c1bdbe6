"""One batch-1 decode step between cuProfilerStart/Stop, for Nsight Compute's per-kernel figures.

    ncu --profile-from-start off --cache-control none --clock-control none --launch-skip 51 --launch-count 5 \
        --metrics gpu__time_duration.sum,smsp__inst_executed.sum python bench/cuda_step.py MODEL.gguf

Steps 0-21 compile, capture and warm up; step 22 is profiled (its graph's kernels: the embedding,
then five a layer, so --launch-skip 51 --launch-count 5 picks layer 10's q/k/v, attention, o, gate/up, down).
"""

from __future__ import annotations

import sys

import numpy as np
from cuda.bindings import driver as cu

from rbees_workerd.engine.engine import Engine
from rbees_workerd.kernels.backend import SamplingRow

PROFILED = 22


def main() -> None:
    engine = Engine.load(sys.argv[1], backend="cuda", slots=1, context_length=64, max_step_tokens=256)
    model, be = engine.model, engine.backend
    greedy = [SamplingRow(0.0, 0, 1.0, 0.0, 1.0, 0.0, np.zeros(0, np.int32))]
    zero = np.zeros(1, np.int32)
    tokens = np.ones(1, np.int32)
    for pos in range(PROFILED + 2):
        if pos == PROFILED:
            be.synchronize()
            cu.cuProfilerStart()
        tokens = be.sample(model.run(tokens, np.full(1, pos, np.int32), zero, zero), greedy)
        if pos == PROFILED:
            be.synchronize()
            cu.cuProfilerStop()


if __name__ == "__main__":
    main()
