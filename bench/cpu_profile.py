"""Where a CPU step's time goes: each backend op's share of a prefill step and of the decode steps.

    python bench/cpu_profile.py --model M [--threads 2] [--prompt-tokens 128] [--gen-tokens 33]

Wraps the CPU backend's ops with timers (the CPU computes as it is called, so a call's wall
time is its op's) and runs one greedy generation after a warm-up one; matrix products are
told apart by type, shape and token count. The timers add ~1 µs a call.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType

from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.types import FinishEvent, GenerationParams

OPS = ("embed", "rmsnorm", "rope", "attention", "swiglu", "add", "gather_rows", "sample_async", "upload")


def _matmul_key(x: np.ndarray, w: object, out: np.ndarray, bias: object = None) -> str:  # noqa: ARG001
    n, k = w.shape
    return f"matmul {GGMLQuantizationType(w.qtype).name} {n}x{k} T={x.shape[0]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=33)
    args = ap.parse_args()
    engine = Engine.load(args.model, backend="cpu", threads=args.threads,
                         context_length=args.prompt_tokens + args.gen_tokens + 8)  # fmt: skip
    be = engine.backend
    stats: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    phase = ["prefill"]

    def timed(name: str, fn: Callable, key: Callable | None = None) -> Callable:
        def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            result = fn(*a, **kw)
            entry = stats[(phase[0], key(*a, **kw) if key else name)]
            entry[0] += 1
            entry[1] += time.perf_counter() - t0
            return result

        return call

    for name in OPS:
        setattr(be, name, timed(name, getattr(be, name)))
    be.matmul = timed("matmul", be.matmul, _matmul_key)
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 20000, args.prompt_tokens)]
    params = GenerationParams(max_tokens=args.gen_tokens, temperature=0.0)
    steps = {}
    for _ in range(2):  # a warm-up generation, then the measured one
        stats.clear()
        seq = engine.submit(prompt, params)
        phase[0], count, done = "prefill", 0, False
        t0 = time.perf_counter()
        while not done:
            events = engine.step()
            done = any(isinstance(e, FinishEvent) and e.seq_id == seq.id for e in events)
            count += 1
            if count == 1:
                t1 = time.perf_counter()
                phase[0] = "decode"
        steps = {"prefill": (1, t1 - t0), "decode": (count - 1, time.perf_counter() - t1)}
    for ph, (n, total) in steps.items():
        ops = sum(t for (p, _), (_, t) in stats.items() if p == ph)
        print(f"{ph}: {n} step(s), {total / n * 1e3:.2f} ms a step, of which ops {ops / n * 1e3:.2f} ms")
        for (p, key), (calls, t) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
            if p == ph:
                print(f"  {key:36s} {calls / n:6.1f} calls {t / n * 1e3:8.3f} ms {t / calls * 1e6:9.1f} us a call")


if __name__ == "__main__":
    main()
