"""Times of the tensor-core product's launch plans (8-token tiles a block, K split) on one GPU.

    python bench/mma_plan.py --shape llama-3.1-8b --tokens 64,512 [--nj 1,2,4,8] [--splits 1,2,4,8] [--json]
    python bench/mma_plan.py --shape llama-3.1-8b --warm --nj 8    # compile the kernels only (run several at once)
    python bench/mma_plan.py --slots 1:3,2:3,4:3,8:3 ...             # other blocks an SM (mma.SLOTS)
    python bench/mma_plan.py --hmma-registers 128 --tokens 512 ...   # hmma_kernel's register bound
    python bench/mma_plan.py --hmma-min-tokens 1 --tokens 64 ...     # hmma_kernel at fewer tokens too

Every product of one layer of the shape in llama.cpp's Q4_K_M mix (two layers: one whose attn_v and
ffn_down get Q6_K, one whose do not), its weights random blocks of those types (gguf_shapes), its input
random. A plan's time is the median over `--repeat` replays of a CUDA graph of `--reps` launches of the
product alone; the input's preparation is timed the same way, apart. Steps of hmma.MIN_TOKENS tokens or more
time hmma_kernel (float16), fewer mma_kernel (int8), as the backend launches them. `*` marks the plan that
`hmma.plan` or `mma.plan` chooses. Plans whose split leaves a part less than a stage of K, or
whose partial sums exceed mma.PART_BYTES, are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_shapes  # noqa: E402

from rbees_workerd.kernels import backend  # noqa: E402
from rbees_workerd.kernels.cuda import backend as cb  # noqa: E402
from rbees_workerd.kernels.cuda import hmma, mma  # noqa: E402
from rbees_workerd.kernels.cuda.outputs import MODE_ROWS  # noqa: E402


def _launches(shape: gguf_shapes.Shape) -> dict[str, list[tuple[str, int, int, int]]]:
    """{label: [(tensor, type, rows, k)]} of the product launches of a layer, one per distinct launch."""
    types = gguf_shapes.plan(shape, "q4_k_m")
    more = next(i for i in range(shape.n_layers) if gguf_shapes._use_more_bits(i, shape.n_layers))
    plain = next(i for i in range(shape.n_layers) if not gguf_shapes._use_more_bits(i, shape.n_layers))
    out: dict[str, list[tuple[str, int, int, int]]] = {}
    for layer in (more, plain):

        def mat(kind: str, layer: int = layer) -> tuple[str, int, int, int]:
            name = f"blk.{layer}.{kind}.weight"
            qt, (n, k) = types[name]
            return name, int(qt), n, k

        q, k, v = mat("attn_q"), mat("attn_k"), mat("attn_v")
        for qt in dict.fromkeys(m[1] for m in (q, k, v)):  # the launches of q/k/v by type (_groups)
            group = [m for m in (q, k, v) if m[1] == qt]
            out["+".join(m[0].split(".")[2].removeprefix("attn_") for m in group) + f" t{qt}"] = group
        out[f"o t{mat('attn_output')[1]}"] = [mat("attn_output")]
        out[f"gate+up t{mat('ffn_gate')[1]}"] = [mat("ffn_gate"), mat("ffn_up")]
        out[f"down t{mat('ffn_down')[1]}"] = [mat("ffn_down")]
    return out


def _time(be: cb.CudaBackend, launches: list[cb._Launch], reps: int, repeat: int) -> float:
    """Median µs of one launch of `launches`, from CUDA-graph replays of reps copies."""
    be._launch(launches)
    builder = be._core_stream.create_graph_builder()
    builder.begin_building()
    for _ in range(reps):
        be._launch(launches, builder)
    builder.end_building()
    graph = builder.complete()
    times = []
    for _ in range(repeat + 1):
        start, end = cuda.event(), cuda.event()
        start.record(be._stream)
        graph.launch(be._core_stream)
        end.record(be._stream)
        end.synchronize()
        times.append(cuda.event_elapsed_time(start, end) * 1000 / reps)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(gguf_shapes.SHAPES))
    ap.add_argument("--tokens", default="64,512")
    ap.add_argument("--nj", default=",".join(map(str, mma.TOKEN_TILES)))
    ap.add_argument("--splits", default="1,2,3,4,6,8,12,16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slots", default="", help="blocks an SM by token tiles, e.g. 1:3,2:3,4:3,8:3 (mma.SLOTS; "
                    "give each setting its own NUMBA_CACHE_DIR: the cache does not key on the register bound)")
    ap.add_argument("--hmma-registers", type=int, help="hmma_kernel's register bound (hmma.REGISTERS; a Numba "
                    "cache of its own for each, as for --slots)")
    ap.add_argument("--hmma-min-tokens", type=int, help="steps of this many tokens or more take hmma_kernel "
                    "(hmma.MIN_TOKENS)")
    ap.add_argument("--warm", action="store_true", help="compile the kernels only")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    shape = gguf_shapes.SHAPES[a.shape]
    mma.SLOTS.update({int(nj): int(n) for nj, n in (p.split(":") for p in a.slots.split(",") if p)})
    hmma.REGISTERS = a.hmma_registers or hmma.REGISTERS
    hmma.MIN_TOKENS = a.hmma_min_tokens or hmma.MIN_TOKENS
    be = cb.CudaBackend(0)
    chosen_plans = (mma.plan, hmma.plan)
    forced: list[tuple[int, int]] = [(0, 0)]
    mma.plan = hmma.plan = lambda t, rt, k, qt, sms: forced[0]  # (the backend's launches, with the plan under test)
    rng = np.random.default_rng(0)
    rows = []
    for label, mats in _launches(shape).items():
        weights = []
        for i, (_, qt, n, k) in enumerate(mats):
            raw = gguf_shapes._random_chunk((1, i), gguf_shapes.Q(qt), n * k, 1 / np.sqrt(k))
            weights.append(be.weight(qt, (n, k), raw))
        qt, k = mats[0][1], mats[0][3]
        groups = k // 32
        for t in (int(v) for v in a.tokens.split(",")):
            x = be.vector(rng.standard_normal((t, k)).astype(np.float32))
            prods = [backend.Product(w, be.zeros((t, w.shape[0]))) for w in weights]
            ns = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
            want = chosen_plans[hmma.takes(t, sum(ns), k)](t, mma.row_tiles(*ns), k, qt, be.sms)
            njs = [int(v) for v in a.nj.split(",")]
            plans = {(nj, int(v)) for nj in njs for v in a.splits.split(",")} | ({want} if want[0] in njs else set())
            for nj, split in sorted(plans):
                if (
                    -(-groups // mma.stage_groups(qt)) < split
                    or (a.warm and split > 2)
                    or (split > 1 and split * t * mma.BM * mma.row_tiles(*ns) * 4 > mma.PART_BYTES)
                ):
                    continue
                forced[0] = (nj, split)
                prep, product = cb._product_launches(be, x, prods, None, MODE_ROWS, None)
                if a.warm:
                    be._launch([prep, product])
                    continue
                us = _time(be, [product], a.reps, a.repeat)
                rows.append({"launch": label, "k": k, "tokens": t, "nj": nj, "split": split,
                             "blocks": product.grid[0] * product.grid[1] * product.grid[2], "us": round(us, 2),
                             "chosen": (nj, split) == want})  # fmt: skip
                if not a.json:
                    print(f"{label:18} k={k:6} t={t:4} nj={nj} split={split:2} blocks={rows[-1]['blocks']:5} "
                          f"{us:9.2f} us{' *' if rows[-1]['chosen'] else ''}", flush=True)  # fmt: skip
            if not a.warm:
                us = _time(be, [prep], a.reps, a.repeat)
                rows.append({"launch": label, "k": k, "tokens": t, "prep_us": round(us, 2)})
                if not a.json:
                    print(f"{label:18} k={k:6} t={t:4} preparation {us:9.2f} us", flush=True)
    be.synchronize()
    if a.json:
        print(json.dumps({"shape": a.shape, "device": be.device, "slots": mma.SLOTS, "rows": rows}))


if __name__ == "__main__":
    main()
