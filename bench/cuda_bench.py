"""Prefill and decode throughput of the CUDA backend on one GPU.

    python bench/cuda_bench.py MODEL.gguf [--batches 1,64,256] [--prompt 512] [--steps 128] [--json]
                                          [--gemm-min-tokens N] [--vec-max-tokens N] [--no-overlap]
                                          [--no-pipeline] [--vec-warps N] [--block-warps N]
                                          [--long-block-warps N] [--fetch-regs N]

Decode: B sequences step together from position 0 for `steps` tokens (like
llama-bench's tg128), each step a forward plus greedy sampling on the device;
tok/s = B * steps / time. Like the engine, each step is queued before the host reads the tokens
of the one before, which it takes on the device (`--no-pipeline`: the host reads each step's tokens
and uploads them for the next). Prefill: one `prompt`-token step; tok/s = prompt / time.
Every figure is the median of `--repeat` timed runs after a warm-up run
(which compiles or loads the kernels and captures the CUDA graphs).
--gemm-min-tokens moves the switch from the few-token kernel to the tiled GEMM, --vec-max-tokens
the one from the one-token-per-block kernel to the few-token kernel, --vec-warps, --block-warps,
--long-block-warps and --fetch-regs set the one-token kernel's warps, warps a block (short and long
inputs) and registers of prefetched weights
(tuning); --no-overlap captures
graphs without programmatic dependent launch (each kernel starts when the one before has ended).
--sweep runs the prefill and the decode batches again for each combination of tuning values, on the one
loaded model (an 8B shape loads in 30-60 s), its graphs captured anew for each: e.g.
`--sweep programmatic=0,1 hmma_large_min_tokens=65,33` gives four `decode_b64_tok_s[programmatic=1,...]`.
--variant NAME=V[,NAME=V] (again for more) runs them once more with those values, the others as they were
at the start.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import statistics
import time
from types import ModuleType

import numpy as np
import psutil

from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.gguf import load_gguf
from rbees_workerd.kernels.backend import SamplingRow


def _greedy(n: int) -> list[SamplingRow]:
    row = SamplingRow(0.0, 0, 1.0, 0.0, 1.0, 0.0, np.zeros(0, np.int32))
    return [row] * n


def _median_time(fn, repeat: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_tok_s(engine: Engine, batch: int, steps: int, repeat: int, pipeline: bool = True) -> float:
    model, be = engine.model, engine.backend
    slots = np.arange(batch, dtype=np.int32)
    rows = np.arange(batch, dtype=np.int32)
    rows_greedy = _greedy(batch)

    def run() -> None:
        tokens = np.full(batch, 1, np.int32)
        if not pipeline:
            for pos in range(steps):
                logits = model.run(tokens, np.full(batch, pos, np.int32), slots, rows)
                tokens = be.sample(logits, rows_greedy)
            return
        # as the engine does: each step queued, fed the last one's picks on the device, before the host reads them
        picks = None
        for pos in range(steps):
            logits = model.run(tokens, np.full(batch, pos, np.int32), slots, rows, feed=picks)
            queued = be.sample_async(logits, rows_greedy)
            if picks is not None:
                picks.ids()
            picks = queued
        picks.ids()

    return batch * steps / _median_time(run, repeat)


def prefill_tok_s(engine: Engine, prompt: int, repeat: int) -> float:
    model, be = engine.model, engine.backend
    tokens = (np.arange(prompt, dtype=np.int32) * 7919) % engine.config.vocab_size
    positions = np.arange(prompt, dtype=np.int32)
    slots = np.zeros(prompt, np.int32)

    def run() -> None:
        logits = model.run(tokens, positions, slots, np.array([prompt - 1], np.int32))
        be.sample(logits, _greedy(1))

    return prompt / _median_time(run, repeat)


def _sweep_settings(specs: list[str]) -> list[dict[str, int]]:
    """Every combination of `name=v1,v2` (names of _SETTINGS); none without specs."""
    axes = []
    for spec in specs:
        name, _, values = spec.partition("=")
        if name not in _SETTINGS or not values:
            raise SystemExit(f"--sweep takes NAME=V1,V2 with NAME one of {sorted(_SETTINGS)}, got {spec!r}")
        axes.append([(name, int(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else []


def _variant(spec: str) -> dict[str, int]:
    """`name=v,name=v` (names of _SETTINGS) as settings."""
    pairs = [item.partition("=") for item in spec.split(",")]
    if any(name not in _SETTINGS or not value for name, _, value in pairs):
        raise SystemExit(f"--variant takes NAME=V[,NAME=V] with NAMEs of {sorted(_SETTINGS)}, got {spec!r}")
    return {name: int(value) for name, _, value in pairs}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"rbees_workerd.kernels.cuda.{_SETTINGS[name][0]}")


def _apply(settings: dict[str, int]) -> None:
    for name, value in settings.items():
        setattr(_module(name), _SETTINGS[name][1], _SETTINGS[name][2](value))
    importlib.import_module("rbees_workerd.kernels.cuda.hmma").plan.cache_clear()  # (kept by their arguments)


# --sweep's names: (module of rbees_workerd.kernels.cuda, attribute, type)
_SETTINGS = {"programmatic": ("backend", "PROGRAMMATIC", bool),
             "hmma_min_tokens": ("hmma", "MIN_TOKENS", int),
             "hmma_large_min_tokens": ("hmma", "LARGE_MIN_TOKENS", int),
             "hmma_slots": ("hmma", "SLOTS", int),
             "att_group_min_blocks": ("ops", "ATT_GROUP_MIN_BLOCKS", int),
             "dense": ("dense", "ON", bool),
             "dense_min_tokens": ("dense", "MIN_TOKENS", int),
             "dense_chunk_bytes": ("dense", "CHUNK_BYTES", int)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--gemm-min-tokens", type=int)
    ap.add_argument("--vec-max-tokens", type=int)
    ap.add_argument("--hmma-min-tokens", type=int, help="tuning: hmma.MIN_TOKENS")
    ap.add_argument("--vec-warps", type=int, help="tuning: gemv.VEC_WARPS")
    ap.add_argument("--block-warps", type=int, help="tuning: gemv.BLOCK_WARPS")
    ap.add_argument("--long-block-warps", type=int, help="tuning: gemv.LONG_BLOCK_WARPS")
    ap.add_argument("--fetch-regs", type=int, help="tuning: gemv.FETCH_REGS")
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--no-pipeline", action="store_true")
    ap.add_argument("--sweep", nargs="*", default=[], metavar="NAME=V1,V2", help=f"one of {sorted(_SETTINGS)}")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=V[,NAME=V]")
    args = ap.parse_args()
    runs = _sweep_settings(args.sweep) + [_variant(v) for v in args.variant]
    from rbees_workerd.kernels.cuda import backend, gemv, hmma

    backend.PROGRAMMATIC = not args.no_overlap
    if args.gemm_min_tokens is not None:
        backend.GEMM_MIN_TOKENS = args.gemm_min_tokens
    if args.vec_max_tokens is not None:
        gemv.VEC_MAX_TOKENS = args.vec_max_tokens
    if args.hmma_min_tokens is not None:
        hmma.MIN_TOKENS = args.hmma_min_tokens
    for name in ("vec_warps", "block_warps", "long_block_warps", "fetch_regs"):
        if getattr(args, name) is not None:
            setattr(gemv, name.upper(), getattr(args, name))
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    engine = Engine.load(args.model, backend="cuda", gpu=args.gpu, slots=max(batches),
                         context_length=max(args.prompt, args.steps),
                         max_step_tokens=max(args.prompt, *batches))  # fmt: skip
    matrices = sum(t.raw.nbytes for name, t in load_gguf(args.model).tensors.items() if len(t.shape) == 2)
    result = {"device": engine.backend.device, "load_s": round(time.perf_counter() - t0, 2),
              "vram_bytes": engine.backend.memory_bytes(), "weights_vram_bytes": engine.model.weight_bytes,
              "weights_file_bytes": matrices, "host_rss_bytes": psutil.Process().memory_info().rss}  # fmt: skip
    result[f"prefill_{args.prompt}_tok_s"] = round(prefill_tok_s(engine, args.prompt, args.repeat), 1)
    for b in batches:
        result[f"decode_b{b}_tok_s"] = round(decode_tok_s(engine, b, args.steps, args.repeat, not args.no_pipeline), 1)
    start = {name: getattr(_module(name), _SETTINGS[name][1]) for name in _SETTINGS}
    for settings in runs:
        _apply({**start, **settings})
        engine.backend.forget_graphs()
        tag = ",".join(f"{k}={v}" for k, v in settings.items())
        result[f"prefill_{args.prompt}_tok_s[{tag}]"] = round(prefill_tok_s(engine, args.prompt, args.repeat), 1)
        for b in batches:
            tok_s = decode_tok_s(engine, b, args.steps, args.repeat, not args.no_pipeline)
            result[f"decode_b{b}_tok_s[{tag}]"] = round(tok_s, 1)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}  {v}")


if __name__ == "__main__":
    main()
