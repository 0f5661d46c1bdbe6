"""Benchmark the CPU quantized matmul kernels on a real model's weight matrices.

Times one decode step's worth of matrix-vector products (every 2-D weight, plus the
tied output projection when there is no output.weight) and one T=256 prefill's worth
of matrix products (the layer matrices at T=256, the output projection only for the
last token, as the engine computes logits), and reports ms, GB/s of weights read and
the equivalent tok/s. Times are wall-clock best-of-N: run it on an otherwise idle machine.

    NUMBA_CACHE_DIR=.numba-cache .venv/bin/python bench/quant_cpu.py [MODEL] [--threads 2] [--level avx2] [--json]

--level picks the kernels (`simd`'s levels: portable, avx2, vnni; default: the best the host has).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from rbees_workerd.kernels.cpu import quant, simd

DEFAULT_MODEL = os.environ.get("RBEES_TEST_MODEL", "models-cache/SmolLM2-135M-Instruct.Q4_1.gguf")
OUTPUT = ("output.weight", "output(tied)")


def _load(path: str, level: int) -> list[tuple[str, quant.QMatrix]]:
    reader = GGUFReader(path)
    mats = []
    for t in reader.tensors:
        if len(t.shape) == 2:
            n, k = int(t.shape[1]), int(t.shape[0])
            raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(n, -1)
            mats.append((t.name, quant.prepare(int(t.tensor_type), (n, k), raw, level=level)))
    names = {name for name, _ in mats}
    if "output.weight" not in names:  # tied embeddings: the table is also the output projection
        mats += [("output(tied)", w) for name, w in mats if name == "token_embd.weight"]
    # the embedding table itself is only read row-wise during a step
    return [(name, w) for name, w in mats if name != "token_embd.weight"]


def _time(mats: list[tuple[str, quant.QMatrix]], t: int, repeats: int) -> float:
    """Best-of-`repeats` seconds for one pass of x[t, K] @ w.T over the layer matrices (t tokens)
    and the output projection (1 token)."""
    rng = np.random.default_rng(0)
    rows = [1 if name in OUTPUT else t for name, _ in mats]
    bufs = [
        (rng.standard_normal((r, w.shape[1])).astype(np.float32), np.empty((r, w.shape[0]), np.float32))
        for r, (_, w) in zip(rows, mats, strict=True)
    ]
    for (_, w), (x, out) in zip(mats, bufs, strict=True):  # compile / warm up
        quant.matmul(x, w, out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for (_, w), (x, out) in zip(mats, bufs, strict=True):
            quant.matmul(x, w, out)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=256, help="tokens of the prefill pass")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--level", choices=[simd.LEVEL_NAMES[v] for v in (simd.PORTABLE, simd.AVX2, simd.VNNI)],
                    default=simd.LEVEL_NAMES[simd.LEVEL])  # fmt: skip
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    level = next(v for v, name in simd.LEVEL_NAMES.items() if name == args.level)
    if level > simd.HOST_LEVEL:
        ap.error(f"this CPU runs up to the {simd.LEVEL_NAMES[simd.HOST_LEVEL]} kernels")
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    t0 = time.perf_counter()
    mats = _load(args.model, level)
    load_s = time.perf_counter() - t0
    gguf_bytes = 0
    for _, w in mats:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(w.qtype)]
        gguf_bytes += w.shape[0] * w.shape[1] // block * size
    decode_s = _time(mats, 1, args.repeats)
    prefill_s = _time(mats, args.prefill, max(1, args.repeats // 5))
    res = {
        "model": os.path.basename(args.model),
        "threads": numba.get_num_threads(),
        "level": args.level,
        "matrices": len(mats),
        "weight_mb": round(gguf_bytes / 1e6, 1),
        "prepared_mb": round(sum(w.nbytes for _, w in mats) / 1e6, 1),
        "prepare_s": round(load_s, 2),
        "decode_ms": round(decode_s * 1e3, 2),
        "decode_gbps": round(gguf_bytes / decode_s / 1e9, 2),
        "decode_tok_s": round(1 / decode_s, 1),
        "prefill_tokens": args.prefill,
        "prefill_ms": round(prefill_s * 1e3, 1),
        "prefill_tok_s": round(args.prefill / prefill_s, 1),
    }
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>15}: {v}")


if __name__ == "__main__":
    main()
