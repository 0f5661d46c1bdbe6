"""The product of many tokens of a float weight type (F16, BF16, F32): gemm_kernel, tiles in shared memory.

The quantized types take the tensor cores (mma); these keep float inputs, rounded to fp16 for F16
weights as llama.cpp rounds them (prep_kernel, which also applies the RMSNorm before the product).
"""

from __future__ import annotations

import functools

from numba import cuda, float32, int32

from rbees_workerd.kernels.cuda.device import EXACT, JIT, SIM, fp16_round, grid_ready, inv_rms
from rbees_workerd.kernels.cuda.formats import ROUND_F16, decode, elem
from rbees_workerd.kernels.cuda.outputs import MODE_ROWS, last_of_split, matrix_row, residual, split_sum, store

BM = 64  # weight rows per tile (32 x 32 tiles measured slower on the H100, even at 64 tokens)
BN = 64  # tokens per tile
PAD_M, PAD_N = BM + 1, BN + 1  # shared rows padded against bank conflicts (constants for numba)
TX = BN // 4  # threads along the tokens
THREADS = (BM // 4) * TX  # each thread 4 rows x 4 tokens
BLOCKS = 4 if SIM else 528  # a GEMM with fewer tiles than this splits K until it has about this many blocks
SPLIT_GROUPS = 2  # 32-blocks of K per split at least
PREP_THREADS = 32 if SIM else 128


@functools.cache
def prep_kernel(rnd: int):  # noqa: ANN201
    """xq = x (fp16-rounded for ROUND_F16), or the same of rmsnorm(x) * nw, also written to hout;
    one block per token: the input of a product that reads it many times, prepared once."""

    @cuda.jit(**EXACT)
    def kernel(x, norm, nw, eps, hout, xq):
        grid_ready()
        scratch = cuda.shared.array(PREP_THREADS, float32)
        t = cuda.blockIdx.x
        inv = inv_rms(x, t, x.shape[1], eps, scratch) if norm else float32(1.0)
        for c in range(cuda.threadIdx.x, x.shape[1], PREP_THREADS):
            v = x[t, c] * inv * nw[c] if norm else x[t, c]
            if norm:
                hout[t, c] = v
            xq[t, c] = fp16_round(v) if rnd == ROUND_F16 else v

    return kernel


@functools.cache
def gemm_kernel(qt: int, flags: int):  # noqa: ANN201
    """x[T, K] @ W_i.T for up to three matrices of float weight type qt (MODE_ROWS), a BM x BN output
    tile per block.

    Each step dequantizes a BM-row x 32 weight tile and a 32 x BN-token slice of x into shared
    memory; every weight is decoded once per BN tokens. Split over K (gridDim.z > 1, for matrices
    with too few tiles to fill the GPU): block z sums its share of the 32-blocks into part[z]; the
    tile's last block to finish (counted in count[tile], which it resets for the next launch) adds
    the parts in order of z, so the result does not depend on which block finished first.
    """

    @cuda.jit(**JIT)
    def kernel(x, m0, m1, m2, n0, n1, n2, part, count):
        grid_ready()
        w0, g0, s0, o0, b0 = m0
        w1, g1, s1, o1, b1 = m1
        w2, g2, s2, o2, b2 = m2
        ws = cuda.shared.array((32, PAD_M), float32)
        xs = cuda.shared.array((32, PAD_N), float32)
        last = cuda.shared.array(1, int32)
        wv = cuda.local.array(8, float32)
        acc = cuda.local.array(16, float32)
        tid = cuda.threadIdx.x
        tx = tid % TX
        ty = tid // TX
        r0 = cuda.blockIdx.x * BM
        t0 = cuda.blockIdx.y * BN
        n_tok = x.shape[0]
        total = n0 + n1 + n2
        for i in range(16):
            acc[i] = 0.0
        n_groups = x.shape[1] // 32
        split = cuda.gridDim.z
        z = cuda.blockIdx.z
        for g in range((n_groups * z) // split, (n_groups * (z + 1)) // split):
            for li in range(tid, BM * 4, THREADS):  # the tile's weight items
                lr = li // 4
                lq = li % 4
                row = r0 + lr
                if row < total:
                    which, lrow = matrix_row(row, n0, n1)
                    w, gs, sb = (w0, g0, s0) if which == 0 else ((w1, g1, s1) if which == 1 else (w2, g2, s2))
                    decode(qt, w, gs, sb, float32(0.0), lrow, g, lq, wv, True)
                    for j in range(8):
                        ws[elem(qt, lq, j), lr] = wv[j]
                else:
                    for j in range(8):
                        ws[elem(qt, lq, j), lr] = 0.0
            for idx in range(tid, 32 * BN, THREADS):
                tt = idx // 32
                kk = idx % 32
                xs[kk, tt] = x[t0 + tt, g * 32 + kk] if t0 + tt < n_tok else float32(0.0)
            cuda.syncthreads()
            for kk in range(32):
                a0 = ws[kk, ty * 4]
                a1 = ws[kk, ty * 4 + 1]
                a2 = ws[kk, ty * 4 + 2]
                a3 = ws[kk, ty * 4 + 3]
                for j in range(4):
                    b = xs[kk, tx * 4 + j]
                    acc[j] += a0 * b
                    acc[4 + j] += a1 * b
                    acc[8 + j] += a2 * b
                    acc[12 + j] += a3 * b
            cuda.syncthreads()
        if split > 1:
            for i in range(4):
                for j in range(4):
                    row = r0 + ty * 4 + i
                    t = t0 + tx * 4 + j
                    if row < total and t < n_tok:
                        part[z, t, row] = acc[4 * i + j]
            if not last_of_split(count, split, last):  # another block of the tile finishes it
                return
        for i in range(4):
            row = r0 + ty * 4 + i
            for j in range(4):
                t = t0 + tx * 4 + j
                if row < total and t < n_tok:
                    v = split_sum(part, split, t, row) if split > 1 else acc[4 * i + j]
                    which, r = matrix_row(row, n0, n1)
                    store(which, MODE_ROWS, flags, t, r, v, float32(0.0), o0, b0, o1, b1, o2, b2,
                          residual(flags, which, t, r, o0, o1, o2))  # fmt: skip

    return kernel


def split_of(tiles: int, k: int) -> int:
    """How many parts gemm_kernel splits K into for a product of `tiles` output tiles."""
    return max(1, min(-(-BLOCKS // tiles), (k // 32) // SPLIT_GROUPS))
