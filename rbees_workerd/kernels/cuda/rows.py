"""The product of a few tokens (3 to GEMM_MIN_TOKENS - 1) of float weights: rows_kernel, a warp per row.

(The quantized types take the tensor cores from three tokens on: backend._many_tokens.) A block
stages TB tokens' inputs in shared memory (normalized and rounded there, as llama.cpp rounds the
activations of the weight type: fp16 for F16 weights, so no separate launch does it), then each warp
takes a row at a time (grid-stride): its lanes take consecutive items, convert them and the warp
sums the row; a weight item read once serves TB tokens.
"""

from __future__ import annotations

import functools

from numba import cuda, float32

from rbees_workerd.kernels.cuda.device import DEVICE, EXACT, SIM, UNROLL, grid_ready, inv_rms, warp_sum
from rbees_workerd.kernels.cuda.formats import decode, integer, round_lane, rounding, slot
from rbees_workerd.kernels.cuda.outputs import MODE_ROWS, MODE_SWIGLU, NORM, matrix_row, residual, store

TB = 4  # tokens per block
WARPS = 1 if SIM else 4  # warps per block (one in the slow simulator)
BLOCK = 32 * WARPS
KC = 256 if SIM else 2048  # input columns per token staged in shared memory at a time
KC_ITEMS = KC // 8  # (a constant for numba's shared array shape)
# blocks at most (3 resident per SM of 132): their warps loop over the rows, and each block stages its
# input once; the simulator runs few blocks, its cost grows with the stagings
ROW_BLOCKS = 2 if SIM else 396


@cuda.jit(**DEVICE)
def _stage(x, t0, n_tok, c0, nbk, qt, rnd, norm, inv, nw, write_h, hout, xs, scratch):
    """Input columns c0 .. c0 + 32 * nbk of the block's tokens into shared memory, normalized and
    rounded, each item's 8 elements a column apart (xs[tt, j, item]): the lanes' reads of consecutive
    items then hit distinct banks."""
    lane = cuda.threadIdx.x % 32
    sl = slot(qt, lane)
    for tt in range(TB):
        t = t0 + tt
        if t < n_tok:  # the same for the whole block
            for b0 in range(cuda.threadIdx.x // 32, nbk, WARPS * UNROLL):
                for u in range(UNROLL):
                    b = b0 + WARPS * u
                    if b < nbk:  # the same for the whole warp
                        c = c0 + b * 32 + lane
                        v = x[t, c] * inv[tt] * nw[c] if norm else x[t, c]
                        if write_h:
                            hout[t, c] = v
                        xs[tt, sl % 8, b * 4 + sl // 8] = round_lane(v, rnd, scratch)[0]


@cuda.jit(**DEVICE)
def _dot(xs, it, n, wv, acc):
    """acc[tt] += the item's 8 weights times token tt's staged inputs, for the block's n tokens."""
    for tt in range(TB):
        if tt < n:
            s = float32(0.0)
            for j in range(8):
                s += wv[j] * xs[tt, j, it]
            acc[tt] += s


@cuda.jit(**DEVICE)
def _two_items(qt, w, gs, sb, r, c0, it, items, xs, n, wv, wv2, acc):
    """Items it and it + 32 of row r (the second only where it exists) into acc: both decoded
    before either is used, so their loads overlap."""
    it2 = min(it + 32, items - 1)
    decode(qt, w, gs, sb, float32(0.0), r, c0 // 32 + it // 4, it % 4, wv, True)
    decode(qt, w, gs, sb, float32(0.0), r, c0 // 32 + it2 // 4, it2 % 4, wv2, True)
    _dot(xs, it, n, wv, acc)
    if it + 32 < items:
        _dot(xs, it2, n, wv2, acc)


@functools.cache
def rows_kernel(qt: int, mode: int, flags: int):  # noqa: ANN201
    """out_i[T, N_i] = x[T, K] @ W_i.T for up to three matrices of float weight type qt (see outputs for
    the modes and flags), all fixed when compiled: only that type's conversion is compiled in."""
    if integer(qt):
        raise ValueError(f"GGML type {qt} takes the tensor-core product from three tokens on, not rows_kernel")
    rnd = rounding(qt)
    norm = (flags & NORM) != 0

    @cuda.jit(**EXACT)
    def kernel(x, m0, m1, m2, n0, n1, n2, nw, eps, hout):
        grid_ready()
        w0, g0, s0, o0, b0 = m0
        w1, g1, s1, o1, b1 = m1
        w2, g2, s2, o2, b2 = m2
        xs = cuda.shared.array((TB, 8, KC_ITEMS), float32)
        scratch = cuda.shared.array(BLOCK, float32)
        wv = cuda.local.array(8, float32)
        wv2 = cuda.local.array(8, float32)
        acc_a = cuda.local.array(TB, float32)
        acc_b = cuda.local.array(TB, float32)
        inv = cuda.local.array(TB, float32)
        lane = cuda.threadIdx.x % 32
        t0 = cuda.blockIdx.y * TB
        n_tok = x.shape[0]
        n = n_tok - t0
        k = x.shape[1]
        for tt in range(TB):
            inv[tt] = 1.0
            if norm and tt < n:  # every warp computes its block's norms (K is small next to N * K)
                inv[tt] = inv_rms(x, t0 + tt, k, eps, scratch)
        total = n0 if mode == MODE_SWIGLU else n0 + n1 + n2
        n_chunks = (k + KC - 1) // KC
        first = cuda.blockIdx.x * WARPS
        for rb in range(first, total, cuda.gridDim.x * WARPS):  # the same trips for the whole block
            row = rb + cuda.threadIdx.x // 32
            which, r = matrix_row(row, n0, n1) if mode == MODE_ROWS else (0, row)
            # one decode call site per matrix role: each inlined copy of decode is large
            w, gs, sb = (w0, g0, s0) if which == 0 else ((w1, g1, s1) if which == 1 else (w2, g2, s2))
            for tt in range(TB):
                acc_a[tt] = 0.0
                acc_b[tt] = 0.0
            for ci in range(n_chunks):
                c0 = ci * KC
                nbk = min(KC, k - c0) // 32
                if n_chunks > 1 or rb == first:
                    cuda.syncthreads()
                    _stage(x, t0, n_tok, c0, nbk, qt, rnd, norm, inv, nw, norm and cuda.blockIdx.x == 0, hout, xs,
                           scratch)  # fmt: skip
                    cuda.syncthreads()
                if row < total:
                    items = nbk * 4
                    for it in range(lane, items, 64):  # two items a lane at a time: both loads in flight
                        _two_items(qt, w, gs, sb, r, c0, it, items, xs, n, wv, wv2, acc_a)
                        if mode == MODE_SWIGLU:
                            _two_items(qt, w1, g1, s1, r, c0, it, items, xs, n, wv, wv2, acc_b)
            for tt in range(TB):
                t = t0 + tt
                if t >= n_tok:  # the same for the whole block: the reductions below stay uniform
                    break
                a = warp_sum(acc_a[tt], scratch)
                b = warp_sum(acc_b[tt], scratch) if mode == MODE_SWIGLU else float32(0.0)
                if lane == 0 and row < total:
                    res = residual(flags, which, t, r, o0, o1, o2) if mode == MODE_ROWS else float32(0.0)
                    store(which, mode, flags, t, r, a, b, o0, b0, o1, b1, o2, b2, res)

    return kernel
