"""The product of many tokens of a quantized weight type on the tensor cores: mma_kernel.

The input is normalized and rounded to Q8 once (prep_q8_kernel, in vec_kernel's staged layout:
formats.stage_q8), then int8 mma products over each 32-block are scaled in float.
"""

from __future__ import annotations

import functools

from numba import cuda, float32, int32, uint32

from rbees_workerd.kernels.cuda.device import DEVICE, EXACT, JIT, SIM, grid_ready, inv_rms, mma_s8, mma_s8_k16
from rbees_workerd.kernels.cuda.formats import (
    OFFSET,
    Q6_K,
    ROUND_Q8_1,
    fetch_norm,
    group_scales,
    item_words,
    rounding,
    stage_q8,
)  # fmt: skip
from rbees_workerd.kernels.cuda.outputs import MODE_ROWS, last_of_split, residual, split_sum, store

WARPS = 1 if SIM else 4  # warps per block of mma_kernel, one above the other
MI, NJ = 2, 4  # a warp's output tile: MI 16-row by NJ 8-token tensor-core tiles
BM, BN = 16 * MI * WARPS, 8 * NJ  # a block's rows and tokens
ACC, COLS, ROWS = MI * NJ * 4, 2 * NJ, 2 * MI  # a lane's accumulators, tokens, rows
PAD = BN + 1  # the block's output tile in shared memory, rows padded against bank conflicts
THREADS = 32 * WARPS
SCRATCH = THREADS if SIM else 1  # (the simulator's mma twins exchange the fragments through it)
PREP_THREADS = 32 if SIM else 512  # (a K of 4,096 is 512 items: one each)


@functools.cache
def prep_q8_kernel(qt: int):  # noqa: ANN201
    """Many tokens' inputs normalized and rounded to Q8 once, for mma_kernel, in vec_kernel's staged
    layout (stage_q8, the item order of weight type qt): xw[t] the int8 values four a word, xd[t]
    and xs[t] each 32-block's scale and sum term. One block per token."""
    rnd = rounding(qt)

    @cuda.jit(**EXACT)
    def kernel(x, norm, nw, eps, hout, xw, xd, xs):
        scratch = cuda.shared.array(PREP_THREADS, float32)
        wv = cuda.local.array(8, float32)
        nwv = cuda.local.array(8, float32)
        t = cuda.blockIdx.x
        if norm and cuda.threadIdx.x < x.shape[1] // 8:
            fetch_norm(nw, qt, cuda.threadIdx.x, nwv)
        grid_ready()
        inv = inv_rms(x, t, x.shape[1], eps, scratch) if norm else float32(1.0)
        stage_q8(x, t, x.shape[1] // 8, inv, norm, nw, nwv, norm, hout, qt, rnd, xw[t], xd[t], xs[t], scratch, wv)

    return kernel


@functools.cache
def mma_kernel(qt: int, flags: int):  # noqa: ANN201
    """Many tokens of Q8-rounded inputs (prep_q8_kernel) times up to three matrices of weight type qt.

    A block takes BM rows of one of the matrices and BN tokens, its blocks along y those of matrix 0,
    then 1, then 2, so the weights a block reads are chosen once. Lane l of a warp takes item l % 4 of each
    32-block: the two words item_words gives are exactly its A fragment (rows l // 4 and + 8 of a
    16-row tile) and the token's two staged input words its B fragment (token l // 4 of an 8-token
    tile); the mma sums over the items' k-order, which the weights and the inputs share (Q6_K, whose
    group halves have scales of their own: two mma over 16 columns). Each element (row, token) then
    adds d_w * d_x * dot plus the min term (Q8_1: m_w * xs) or the offset term (Q8_0: d_w * off * xs),
    as vec_kernel does. A warp keeps MI x NJ tiles, its loads reused across them; rows and tokens past
    the ends are read clamped and not written. The block's outputs go through shared memory to
    coalesced stores. K is not split: on the H200, splitting it over blocks (to fill the GPU at 64
    tokens) made every product slower (batch-64 decode 8.6k against 14.8k tok/s without).
    """
    q8_1 = rounding(qt) == ROUND_Q8_1
    off = float32(OFFSET.get(qt, 0.0))
    halves = qt == Q6_K

    @cuda.jit(**JIT)
    def kernel(xw, xd, xs, m0, m1, m2, n0, n1, n2, part, count):
        grid_ready()
        w0, g0, s0, o0, b0 = m0
        w1, g1, s1, o1, b1 = m1
        w2, g2, s2, o2, b2 = m2
        scratch = cuda.shared.array((SCRATCH, 6), uint32)
        tile = cuda.shared.array((BM, PAD), float32)
        last = cuda.shared.array(1, int32)
        acc = cuda.local.array(ACC, float32)
        rows = cuda.local.array(ROWS, uint32)
        btok = cuda.local.array(NJ, uint32)
        ctok = cuda.local.array(COLS, uint32)
        blo = cuda.local.array(NJ, int32)
        bhi = cuda.local.array(NJ, int32)
        td = cuda.local.array(COLS, float32)
        ts = cuda.local.array(COLS, float32)
        lane = cuda.threadIdx.x % 32
        gq = lane // 4
        tq = lane % 4
        n_tok = xw.shape[0]
        which, first, n = _block_rows(n0, n1, n2)
        w, gs, sb = (w0, g0, s0) if which == 0 else ((w1, g1, s1) if which == 1 else (w2, g2, s2))
        r0 = first + (cuda.threadIdx.x // 32) * 16 * MI  # the warp's first row in its matrix
        t0 = cuda.blockIdx.x * BN
        for i in range(ROWS):  # the lane's rows (clamped): gq and gq + 8 of each 16-row tile
            rows[i] = min(r0 + 16 * (i // 2) + gq + 8 * (i % 2), n - 1)
        for j in range(NJ):  # its B token of each 8-token tile, and the tokens of its outputs
            btok[j] = min(t0 + 8 * j + gq, n_tok - 1)
            for e in range(2):
                ctok[2 * j + e] = min(t0 + 8 * j + 2 * tq + e, n_tok - 1)
        for i in range(ACC):
            acc[i] = 0.0
        groups = xd.shape[1]
        split = cuda.gridDim.z
        z = cuda.blockIdx.z
        for g in range((groups * z) // split, (groups * (z + 1)) // split):
            it = g * 4 + tq
            for j in range(NJ):
                blo[j] = xw[btok[j], uint32(2 * it)]
                bhi[j] = xw[btok[j], uint32(2 * it + 1)]
            for c in range(COLS):
                td[c] = xd[ctok[c], uint32(g)]
                ts[c] = xs[ctok[c], uint32(g)]
            for i in range(MI):
                ra = rows[2 * i]
                rb = rows[2 * i + 1]
                alo, ahi = item_words(qt, w, ra, it)
                blo_a, bhi_a = item_words(qt, w, rb, it)
                sa, sa_hi, ma = group_scales(qt, gs, sb, ra, g)
                sb_, sb_hi, mb = group_scales(qt, gs, sb, rb, g)
                ea = ma if q8_1 else sa * off
                eb = mb if q8_1 else sb_ * off
                for j in range(NJ):
                    k = (i * NJ + j) * 4
                    if halves:
                        x0, x1 = td[2 * j], td[2 * j + 1]
                        c0, c1, c2, c3 = mma_s8_k16(alo, blo_a, blo[j], scratch)
                        h0, h1, h2, h3 = mma_s8_k16(ahi, bhi_a, bhi[j], scratch)
                        acc[k] += x0 * (sa * float32(c0) + sa_hi * float32(h0))
                        acc[k + 1] += x1 * (sa * float32(c1) + sa_hi * float32(h1))
                        acc[k + 2] += x0 * (sb_ * float32(c2) + sb_hi * float32(h2))
                        acc[k + 3] += x1 * (sb_ * float32(c3) + sb_hi * float32(h3))
                    else:
                        c0, c1, c2, c3 = mma_s8(alo, blo_a, ahi, bhi_a, blo[j], bhi[j], scratch)
                        for c, v, s_w, e_w in ((0, c0, sa, ea), (1, c1, sa, ea), (2, c2, sb_, eb), (3, c3, sb_, eb)):
                            acc[k + c] += (s_w * td[2 * j + c % 2]) * float32(v)  # two fused multiply-adds
                            acc[k + c] += e_w * ts[2 * j + c % 2]
        wr = (cuda.threadIdx.x // 32) * 16 * MI
        for k in range(ACC):  # C's fragment order: tile (i, j), then row gq (tokens 2 tq, + 1), row gq + 8
            i = (k // 4) // NJ
            j = (k // 4) % NJ
            tile[wr + 16 * i + gq + 8 * ((k % 4) // 2), 8 * j + 2 * tq + k % 2] = acc[k]
        cuda.syncthreads()
        at = (n0 if which > 0 else 0) + (n1 if which > 1 else 0)  # the matrix's first row in part
        if split > 1:
            for u in range(ACC):
                r, t = _tile_element(first, t0, u)
                if r < n and t < n_tok:
                    part[z, t, at + r] = tile[r - first, t - t0]
            if not last_of_split(count, split, last):  # another block of the tile finishes it
                return
        for u in range(ACC):
            r, t = _tile_element(first, t0, u)
            if r < n and t < n_tok:
                v = split_sum(part, split, t, at + r) if split > 1 else tile[r - first, t - t0]
                store(which, MODE_ROWS, flags, t, r, v, float32(0.0), o0, b0, o1, b1, o2, b2,
                      residual(flags, which, t, r, o0, o1, o2))  # fmt: skip

    return kernel


@cuda.jit(**DEVICE)
def _tile_element(first, t0, u):
    """The (row, token) of this thread's u-th element of an mma_kernel block's output tile."""
    e = cuda.threadIdx.x + THREADS * u
    return first + e % BM, t0 + e // BM


BLOCKS = 4 if SIM else 264  # a product of fewer tiles than this splits K until it has about this many blocks
SPLIT_GROUPS = 2 if SIM else 32  # 32-blocks of K per split at least


def split_of(tiles: int, k: int) -> int:
    """How many parts mma_kernel splits K into for a product of `tiles` output tiles."""
    return max(1, min(-(-BLOCKS // tiles), (k // 32) // SPLIT_GROUPS))


def row_tiles(n0: int, n1: int, n2: int) -> int:
    """mma_kernel's blocks along y: each matrix's rows in tiles of BM (the token tiles along x, so the
    blocks that read the same weights run together: the later ones find them in L2)."""
    return sum(-(-n // BM) for n in (n0, n1, n2))


@cuda.jit(**DEVICE)
def _block_rows(n0, n1, n2):
    """This block's matrix (0, 1, 2), its first row there and the matrix's rows (row_tiles' order)."""
    bx = cuda.blockIdx.y
    t0 = (n0 + BM - 1) // BM
    t1 = (n1 + BM - 1) // BM
    if bx < t0:
        return 0, bx * BM, n0
    if bx < t0 + t1:
        return 1, (bx - t0) * BM, n1
    return 2, (bx - t0 - t1) * BM, n2
