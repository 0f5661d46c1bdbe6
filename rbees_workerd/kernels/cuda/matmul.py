"""Quantized matrix products and embedding lookups on the device layout of `repack`.

A row group of 32 weights is read as four items of 8 weights; the 32 lanes of a
warp take consecutive items of one output row (coalesced spans of the packed
words), dequantize them in registers and reduce across the warp. Four kernels,
by the step's token count:

- vec_kernel (one or two tokens, decode): the block stages its token's input once
  (rounded to Q8 where the weight type takes that), and its warps loop over rows.
- rows_kernel (a few tokens): a block stages TB tokens' inputs in shared memory
  (normalizing and rounding them there), so a weight item read once serves TB tokens.
- mma_kernel (many tokens, weights of the types whose inputs are rounded to Q8):
  int8 tensor-core products over an input rounded once (prep_q8_kernel).
- gemm_kernel (many tokens, the other types): BM x BN output tiles through shared
  memory, split over K when a matrix has too few tiles to fill the GPU.

A row's warp also serves the fused forms: several matrices sharing an input
(q, k, v), gate and up with SwiGLU, and the residual add after a projection.
The product kernels are compiled per weight format (and input rounding): one
format's decoding per kernel keeps the code small.
"""

from __future__ import annotations

import functools
import math

from numba import cuda, float32, int32, uint32

from rbees_workerd.kernels.cuda.device import (
    DEVICE,
    EXACT,
    JIT,
    SIM,
    UNROLL,
    dp4a,
    f32_from_bits,
    fp16_round,
    grid_ready,
    half_bits_to_f32,
    inv_rms,
    mma_s8,
    quad_max,
    quad_sum,
    rint,
    warp_max,
    warp_sum,
)  # fmt: skip
from rbees_workerd.kernels.cuda.repack import BF16, F16, NIB4, NIB5, Q6, Q8

TB = 4  # tokens per block of the few-token kernel (vec_kernel serves steps of one or two tokens)
WARPS = 1 if SIM else 4  # warps per block (one in the slow simulator)
BLOCK = 32 * WARPS
KC = 256 if SIM else 2048  # input columns per token staged in shared memory at a time
KC_ITEMS, KC_GROUPS = KC // 8, KC // 32  # (constants for numba's shared array shapes)
# blocks of the few-token kernel at most (3 resident per SM of 132): their warps loop over the rows, and
# each block stages its input once; the simulator runs few blocks, its cost grows with the stagings
ROW_BLOCKS = 2 if SIM else 396
MODE_ROWS, MODE_SWIGLU, MODE_QKV = 0, 1, 2
# how the few-token kernel rounds its input (llama.cpp's activations per weight type)
ROUND_NONE, ROUND_Q8_0, ROUND_Q8_1, ROUND_F16 = range(4)


@cuda.jit(**DEVICE)
def elem(fmt, q, j):
    """Offset within its group of the j-th weight of item q."""
    if fmt <= Q6:  # the nibble layouts
        return 4 * q + j if j < 4 else 12 + 4 * q + j
    return 8 * q + j


@cuda.jit(**DEVICE)
def decode(words, d, m, fmt, off, row, g, q, wv, with_min):
    """Dequantize item q of group g of a row into wv[0:8] (the weights at elem(fmt, q, j)).

    Without with_min the NIB formats leave out their min (added once per group instead).
    """
    if fmt <= NIB5:
        base = g * 4 if fmt == NIB4 else g * 5 + 1
        w = words[uint32(row), uint32(base + q)]
        hb = words[uint32(row), uint32(g * 5)] if fmt == NIB5 else 0
        scale = d[uint32(row), uint32(g)]
        mn = m[uint32(row), uint32(g)] if with_min else float32(0.0)
        for j in range(8):
            sh = 8 * j if j < 4 else 8 * (j - 4) + 4
            v = (w >> sh) & 15
            if fmt == NIB5:
                e = 4 * q + j if j < 4 else 12 + 4 * q + j
                v |= ((hb >> e) & 1) << 4
            wv[j] = (float32(v) + off) * scale + mn
    elif fmt == Q6:
        w = words[uint32(row), uint32(g * 6 + q)]
        lo = words[uint32(row), uint32(g * 6 + 4)]
        hi = words[uint32(row), uint32(g * 6 + 5)]
        d0 = d[uint32(row), uint32(2 * g)]
        d1 = d[uint32(row), uint32(2 * g + 1)]
        for j in range(8):
            if j < 4:
                v = ((w >> (8 * j)) & 15) | (((lo >> (2 * (4 * q + j))) & 3) << 4)
                wv[j] = float32(float32(v) - 32.0) * d0
            else:
                v = ((w >> (8 * (j - 4) + 4)) & 15) | (((hi >> (2 * (4 * q + j - 4))) & 3) << 4)
                wv[j] = float32(float32(v) - 32.0) * d1
    elif fmt == Q8:
        scale = d[uint32(row), uint32(g)]
        for half in range(2):
            w = words[uint32(row), uint32(g * 8 + 2 * q + half)]
            for b in range(4):
                v = int32((w >> (8 * b)) & 255)  # signed arithmetic (the simulator keeps uint32)
                wv[4 * half + b] = float32(v - 256 if v >= 128 else v) * scale
    elif F16 <= fmt <= BF16:
        for i in range(4):
            w = words[uint32(row), uint32(g * 16 + 4 * q + i)]
            if fmt == F16:
                wv[2 * i] = half_bits_to_f32(w & 0xFFFF)
                wv[2 * i + 1] = half_bits_to_f32(w >> 16)
            else:
                wv[2 * i] = f32_from_bits((w & 0xFFFF) << 16)
                wv[2 * i + 1] = f32_from_bits(w & 0xFFFF0000)
    else:  # F32
        for j in range(8):
            wv[j] = f32_from_bits(words[uint32(row), uint32(g * 32 + 8 * q + j)])


@cuda.jit(**DEVICE)
def slot(fmt, e):
    """Where element e of a group sits among the items: 8 * q + j with elem(fmt, q, j) == e."""
    if fmt <= Q6:
        return 8 * ((e % 16) // 4) + e % 4 + (4 if e >= 16 else 0)
    return e


@cuda.jit(**DEVICE)
def round_lane(v, rnd, scratch):
    """This lane's element of a warp's 32-block rounded like llama.cpp's activations, and the block's
    Q8_1 sum term; the arithmetic of the CPU's quantize_q8_row: d = amax / 127 kept as fp16,
    q = rint(v * (127 / amax)), the element q * d, the sum term fp16(d * sum(q))."""
    if rnd == ROUND_NONE:
        return v, float32(0.0)
    if rnd == ROUND_F16:
        return fp16_round(v), float32(0.0)
    d, inv = _q8_scale(warp_max(abs(v), scratch))
    q = rint(v * inv)
    s = warp_sum(q, scratch) if rnd == ROUND_Q8_1 else float32(0.0)  # whole numbers below 2^24: exact
    return q * fp16_round(d), fp16_round(d * s)


@cuda.jit(**DEVICE)
def _q8_scale(amax):
    """A 32-block's Q8 scale d = amax / 127 and the factor 127 / amax (0 for an all-zero block)."""
    return amax / float32(127.0), (float32(127.0) / amax if amax != 0 else float32(0.0))


@cuda.jit(**DEVICE)
def _stage(x, t0, n_tok, c0, nbk, fmt, rnd, tb, norm, inv, nw, write_h, hout, q8_1, msum, xs, ms, scratch):
    """Input columns c0 .. c0 + 32 * nbk of the block's tokens into shared memory, normalized and
    rounded as the flags say, each item's 8 elements a column apart (xs[tt, j, item]): the lanes'
    reads of consecutive items then hit distinct banks."""
    lane = cuda.threadIdx.x % 32
    sl = slot(fmt, lane)
    for tt in range(tb):
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
                        v, s = round_lane(v, rnd, scratch)
                        xs[tt, sl % 8, b * 4 + sl // 8] = v
                        if q8_1 and lane == 0:
                            ms[tt, b] = s if rnd == ROUND_Q8_1 else msum[t, c0 // 32 + b]


@cuda.jit(**DEVICE)
def _dot(xs, it, tb, n, wv, acc):
    """acc[tt] += the item's 8 weights times token tt's staged inputs, for the block's n tokens."""
    for tt in range(tb):
        if tt < n:
            s = float32(0.0)
            for j in range(8):
                s += wv[j] * xs[tt, j, it]
            acc[tt] += s


@cuda.jit(**DEVICE)
def _add_min(mn, ms, b, tb, n, acc):
    for tt in range(tb):
        if tt < n:
            acc[tt] += mn * ms[tt, b]


@cuda.jit(**DEVICE)
def _two_items(w, d, m, fmt, off, r, c0, it, items, q8_1, xs, ms, tb, n, wv, wv2, acc):
    """Items it and it + 32 of row r (the second only where it exists) into acc: both decoded
    before either is used, so their loads overlap."""
    it2 = min(it + 32, items - 1)
    decode(w, d, m, fmt, off, r, c0 // 32 + it // 4, it % 4, wv, not q8_1)
    decode(w, d, m, fmt, off, r, c0 // 32 + it2 // 4, it2 % 4, wv2, not q8_1)
    _dot(xs, it, tb, n, wv, acc)
    if q8_1 and it % 4 == 0:
        _add_min(m[r, c0 // 32 + it // 4], ms, it // 4, tb, n, acc)
    if it + 32 < items:
        _dot(xs, it2, tb, n, wv2, acc)
        if q8_1 and it2 % 4 == 0:
            _add_min(m[r, c0 // 32 + it2 // 4], ms, it2 // 4, tb, n, acc)


@functools.cache
def rows_kernel(fmt: int, rnd: int):  # noqa: ANN201
    """The few-token product for one weight format and input rounding, fixed when compiled.

    Each (fmt, rnd) is its own kernel (closure constants, part of Numba's cache key): only that
    format's decoding is compiled in, so the code stays small and its arrays stay in registers.
    """
    tb = TB

    @cuda.jit(**EXACT)
    def kernel(x, w0, d0, m0, o0, b0, w1, d1, m1, o1, b1, w2, d2, m2, o2, b2,
               n0, n1, n2, off, mode, flags, res, nw, eps, hout, msum):  # fmt: skip
        """out_i[T, N_i] = x[T, K] @ W_i.T (+ b_i) for up to three matrices of one format.

        A block stages tb tokens' inputs in shared memory (normalized and rounded there, so
        no separate launch does it), then each warp takes a row at a time (grid-stride):
        its lanes take consecutive items, dequantize them and the warp sums the row.
        MODE_ROWS: the rows of the matrices one after another.
        MODE_SWIGLU: row r of matrices 0 and 1; o2 = silu(o0) * o1.
        flags: bit i = matrix i has a bias; bit 3 = res += o0 (the residual add);
        bit 4 = the input is rmsnorm(x) * nw, which the blocks of column 0 also write to hout;
        bit 5 = the input was rounded to Q8_1 already, its block sums in msum.
        """
        grid_ready()
        xs = cuda.shared.array((tb, 8, KC_ITEMS), float32)
        ms = cuda.shared.array((tb, KC_GROUPS), float32)
        scratch = cuda.shared.array(BLOCK, float32)
        wv = cuda.local.array(8, float32)
        wv2 = cuda.local.array(8, float32)
        acc_a = cuda.local.array(tb, float32)
        acc_b = cuda.local.array(tb, float32)
        inv = cuda.local.array(tb, float32)
        lane = cuda.threadIdx.x % 32
        t0 = cuda.blockIdx.y * tb
        n_tok = x.shape[0]
        n = n_tok - t0
        k = x.shape[1]
        norm = (flags & 16) != 0
        q8_1 = rnd == ROUND_Q8_1 or (flags & 32) != 0
        for tt in range(tb):
            inv[tt] = 1.0
            if norm and tt < n:  # every warp computes its block's norms (K is small next to N * K)
                inv[tt] = inv_rms(x, t0 + tt, k, eps, scratch)
        total = n0 if mode == MODE_SWIGLU else n0 + n1 + n2
        n_chunks = (k + KC - 1) // KC
        first = cuda.blockIdx.x * WARPS
        for rb in range(first, total, cuda.gridDim.x * WARPS):  # the same trips for the whole block
            row = rb + cuda.threadIdx.x // 32
            which, r = _matrix_row(row, n0, n1) if mode == MODE_ROWS else (0, row)
            # one decode call site per matrix role: each inlined copy of decode is large
            w, d, m = (w0, d0, m0) if which == 0 else ((w1, d1, m1) if which == 1 else (w2, d2, m2))
            for tt in range(tb):
                acc_a[tt] = 0.0
                acc_b[tt] = 0.0
            for ci in range(n_chunks):
                c0 = ci * KC
                nbk = min(KC, k - c0) // 32
                if n_chunks > 1 or rb == first:
                    cuda.syncthreads()
                    _stage(x, t0, n_tok, c0, nbk, fmt, rnd, tb, norm, inv, nw, norm and cuda.blockIdx.x == 0, hout,
                           q8_1, msum, xs, ms, scratch)  # fmt: skip
                    cuda.syncthreads()
                if row < total:
                    items = nbk * 4
                    for it in range(lane, items, 64):  # two items a lane at a time: both loads in flight
                        _two_items(w, d, m, fmt, off, r, c0, it, items, q8_1, xs, ms, tb, n, wv, wv2, acc_a)
                        if mode == MODE_SWIGLU:
                            _two_items(w1, d1, m1, fmt, off, r, c0, it, items, q8_1, xs, ms, tb, n, wv, wv2, acc_b)
            for tt in range(tb):
                t = t0 + tt
                if t >= n_tok:  # the same for the whole block: the reductions below stay uniform
                    break
                a = warp_sum(acc_a[tt], scratch)
                b = warp_sum(acc_b[tt], scratch) if mode == MODE_SWIGLU else float32(0.0)
                if lane == 0 and row < total:
                    res_v = _residual(flags, which, t, r, res)
                    _store(which, mode, flags, t, r, a, b, o0, b0, o1, b1, o2, b2, res, res_v)

    return kernel


VEC_MAX_TOKENS = 2  # steps of at most this many tokens take vec_kernel (one token per block row)
VEC_WARPS = 1 if SIM else 2112  # warps of vec_kernel at most (16 an SM): they loop over the rows


@functools.cache
def vec_kernel(fmt: int, rnd: int, k: int, mode: int, flags: int, ns: tuple[int, int, int], hd: int = 0,
               neox: bool = False):  # noqa: ANN201  # fmt: skip
    """The product for one token per block row, with everything but the arrays fixed when compiled.

    For batch-1 decode the cost is the latency of one warp's instructions (a row per warp, about one
    warp per scheduler), so the input is prepared once per block, not per warp: rounded to Q8 (the
    weight types llama.cpp rounds the activations for), the block's threads write each 32-block's int8
    values four a word in shared memory, in the order of the weights' items, with its scale and sum
    term (_stage_q8); after one barrier every warp takes rows, its lanes consecutive items (coalesced spans of the
    packed words), an item's 8 weights meeting the inputs in two dp4a instructions (exact integer
    sums, then the scales: llama.cpp's and the CPU's arithmetic). Other weight types keep float
    inputs: lane l prepares those of its items l, l + 32, ... in registers, once for all its rows.
    The input width k, the mode, the flags and the matrices' row counts ns are rows_kernel's
    arguments compiled in: a warp's few thousand instructions are then mostly the product's own (the
    shapes' divisions, the other modes' branches and the index arithmetic fold away). MODE_QKV:
    matrices q, k, v of head size hd, each warp a pair of rows that RoPE rotates together (q and k; two
    rows of v), which it rotates, writes, and for k and v also stores in the KV cache: `rope` is
    (cache_k, cache_v, slots, positions, cos, sin), cos/sin[position, pair] the rotation table
    (CudaBackend._rope_table). Other modes get a tuple of dummies there.
    Integer products load a warp's first row (or pair) of weights into registers before grid_ready,
    overlapping the kernel before this one in a graph, and each next row's while it sums and stores.
    """
    ni = -(-k // 256)
    n_inputs = ni * 8  # (constants for numba's array shapes)
    n_words = ni * 64
    n_groups = ni * 8
    n_fetch = ni * 2  # registers of one unit of work (two rows: SwiGLU, MODE_QKV)
    integer = rnd in (ROUND_Q8_0, ROUND_Q8_1)
    n0, n1, n2 = ns
    total = n0 if mode == MODE_SWIGLU else (n0 + n1 + n2) // (2 if mode == MODE_QKV else 1)
    items = k // 8
    norm = (flags & 16) != 0

    @cuda.jit(**EXACT)
    def kernel(x, w0, d0, m0, o0, b0, w1, d1, m1, o1, b1, w2, d2, m2, o2, b2, off, res, nw, eps, hout, rope):
        scratch = cuda.shared.array(BLOCK, float32)
        xw = cuda.shared.array(n_words, int32)  # the Q8 input: item i's int8 values in words 2i, 2i + 1
        xd = cuda.shared.array(n_groups, float32)  # each 32-block's scale
        xs = cuda.shared.array(n_groups, float32)  # and its sum term
        xr = cuda.local.array(n_inputs, float32)  # float inputs: this lane's items
        wv = cuda.local.array(8, float32)
        # integer products: the lane's items of the warp's next row (and second row) in registers
        lo = cuda.local.array(n_fetch, uint32)
        hi = cuda.local.array(n_fetch, uint32)
        sc = cuda.local.array(n_fetch, float32)
        mn = cuda.local.array(n_fetch, float32)
        nwv = cuda.local.array(8, float32)  # the norm's weights of this thread's first staged item
        lane = cuda.threadIdx.x & 31  # (a bitmask: the compiler then knows it below 32)
        warp = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32
        t = cuda.blockIdx.y
        stride = cuda.gridDim.x * WARPS
        # before grid_ready only what no kernel of the step writes: weights, and the step's positions
        # and slots (uploaded before it) with the rotation table: these loads overlap the kernel before
        pos, slot = 0, 0
        side_a, side_b = float32(0.0), float32(0.0)  # what the warp's row stores with: cos/sin or residual
        if mode == MODE_QKV:
            pos, slot = rope[3][uint32(t)], rope[2][uint32(t)]
            if warp < total:
                side_a, side_b = _side(warp, mode, flags, t, pos, n0, n1, hd, neox, res, rope)
        if integer and warp < total:
            _fetch_rows(warp, mode, n0, n1, hd, neox, w0, d0, m0, w1, d1, m1, w2, d2, m2, fmt, rnd, ni, lane,
                        items, lo, hi, sc, mn)  # fmt: skip
        if integer and norm and cuda.threadIdx.x < items:  # (_stage_q8's first item of this thread)
            _fetch_norm(nw, fmt, cuda.threadIdx.x, nwv)
        grid_ready()
        if mode != MODE_QKV and warp < total:  # the residual: in flight while the input is staged
            side_a, side_b = _side(warp, mode, flags, t, pos, n0, n1, hd, neox, res, rope)
        inv = inv_rms(x, t, k, eps, scratch) if norm else float32(1.0)
        if integer:
            _stage_q8(x, t, items, inv, norm, nw, nwv, norm and cuda.blockIdx.x == 0, hout, fmt, rnd, xw, xd, xs,
                      scratch, wv)  # fmt: skip
            cuda.syncthreads()
        else:
            for i in range(ni):
                it = lane + 32 * i
                for j in range(8):
                    v = float32(0.0)
                    if it < items:
                        c = (it >> 2) * 32 + elem(fmt, (it & 3), j)
                        v = x[uint32(t), uint32(c)] * inv * nw[uint32(c)] if norm else x[uint32(t), uint32(c)]
                        if norm and warp == 0:
                            hout[uint32(t), uint32(c)] = v
                    xr[i * 8 + j] = fp16_round(v) if rnd == ROUND_F16 else v
        for row in range(warp, total, stride):  # the same trips for the whole warp
            which, r, rb = _vec_rows(row, mode, n0, n1, hd, neox)
            a = float32(0.0)
            b = float32(0.0)
            if integer:
                for i in range(ni):
                    it = lane + 32 * i
                    if it < items:
                        a += _staged_idot(lo[i], hi[i], sc[i], mn[i], it, rnd, off, xw, xd, xs)
                        if mode != MODE_ROWS:
                            j = ni + i
                            b += _staged_idot(lo[j], hi[j], sc[j], mn[j], it, rnd, off, xw, xd, xs)
                if row + stride < total:  # the next row's loads in flight during the sums and stores
                    _fetch_rows(row + stride, mode, n0, n1, hd, neox, w0, d0, m0, w1, d1, m1, w2, d2, m2, fmt,
                                rnd, ni, lane, items, lo, hi, sc, mn)  # fmt: skip
            else:
                w, d, m = (w0, d0, m0) if which == 0 else ((w1, d1, m1) if which == 1 else (w2, d2, m2))
                wb, db, mb = (w1, d1, m1) if mode == MODE_SWIGLU else (w, d, m)
                for i in range(ni):
                    it = lane + 32 * i
                    if it < items:
                        a += _item_dot(w, d, m, fmt, off, r, it, xr, i, wv)
                        if mode != MODE_ROWS:
                            b += _item_dot(wb, db, mb, fmt, off, rb, it, xr, i, wv)
            a = warp_sum(a, scratch)
            if mode != MODE_ROWS:
                b = warp_sum(b, scratch)
            if lane == 0:
                if mode == MODE_QKV:
                    _store_pair(which, flags, t, pos, slot, r, rb, a, b, side_a, side_b, o0, b0, o1, b1, o2, b2,
                                hd, rope)  # fmt: skip
                else:
                    _store(which, mode, flags, t, r, a, b, o0, b0, o1, b1, o2, b2, res, side_a)
            if row + stride < total:
                side_a, side_b = _side(row + stride, mode, flags, t, pos, n0, n1, hd, neox, res, rope)

    return kernel


@cuda.jit(**DEVICE)
def _vec_rows(row, mode, n0, n1, hd, neox):
    """vec_kernel's row-th unit of work: (matrix, row, second row); the second row is SwiGLU's up
    row, MODE_QKV's other row of the pair, and the row itself in MODE_ROWS."""
    if mode == MODE_QKV:
        return _pair(row, n0, n1, hd, neox)
    if mode == MODE_SWIGLU:
        return 0, row, row
    which, r = _matrix_row(row, n0, n1)
    return which, r, r


@cuda.jit(**DEVICE)
def _side(row, mode, flags, t, pos, n0, n1, hd, neox, res, rope):
    """What vec_kernel's row-th unit of work stores with its sums, loaded ahead of them: MODE_QKV's
    RoPE cos and sin (_rotation), else the residual its row adds to (_residual)."""
    which, r, _ = _vec_rows(row, mode, n0, n1, hd, neox)
    if mode == MODE_QKV:
        return _rotation(which, r, pos, hd, neox, rope)
    return _residual(flags, which, t, r, res), float32(0.0)


@cuda.jit(**DEVICE)
def _fetch_norm(nw, fmt, it, nwv):
    """The norm's weights of item it of _stage_q8 into nwv."""
    for j in range(8):
        nwv[j] = nw[uint32((it >> 2) * 32 + elem(fmt, it & 3, j))]


@cuda.jit(**DEVICE)
def _fetch_rows(row, mode, n0, n1, hd, neox, w0, d0, m0, w1, d1, m1, w2, d2, m2, fmt, rnd, ni, lane, items,
                lo, hi, sc, mn):  # fmt: skip
    """The lane's items of vec_kernel's row-th unit of work into registers: the first row's at 0 .. ni,
    the second row's (SwiGLU's up row, MODE_QKV's pair) at ni .. 2 ni."""
    which, r, rb = _vec_rows(row, mode, n0, n1, hd, neox)
    w, d, m = (w0, d0, m0) if which == 0 else ((w1, d1, m1) if which == 1 else (w2, d2, m2))
    _fetch_items(w, d, m, fmt, rnd, r, ni, 0, lane, items, lo, hi, sc, mn)
    if mode == MODE_SWIGLU:
        _fetch_items(w1, d1, m1, fmt, rnd, rb, ni, ni, lane, items, lo, hi, sc, mn)
    elif mode == MODE_QKV:
        _fetch_items(w, d, m, fmt, rnd, rb, ni, ni, lane, items, lo, hi, sc, mn)


@cuda.jit(**DEVICE)
def _fetch_items(w, d, m, fmt, rnd, r, ni, at, lane, items, lo, hi, sc, mn):
    """Items lane, lane + 32, ... of row r: their words (_item_words), scales and Q8_1 mins from index at."""
    for i in range(ni):
        it = lane + 32 * i
        if it < items:
            g = uint32(it >> 2)
            lo[at + i], hi[at + i] = _item_words(w, fmt, r, it)
            sc[at + i] = d[uint32(r), g]
            if rnd == ROUND_Q8_1 and (it & 3) == 0:
                mn[at + i] = m[uint32(r), g]


@cuda.jit(**DEVICE)
def _stage_q8(x, t, items, inv, norm, nw, nwv, write_h, hout, fmt, rnd, xw, xd, xs, scratch, wv):
    """Token t's input (normalized where norm) rounded to Q8 blocks into shared memory, a thread per item.

    nwv holds the norm's weights of the thread's first item (_fetch_norm), loaded before grid_ready where
    the kernel can.

    A thread loads its item's 8 inputs and rounds them with the 3 threads of the same 32-block (a
    quad: two shuffles for the maximum, two for the sum), with round_lane's arithmetic; then it
    writes them four a word (item i's words 2i, 2i + 1), and the block's first item its scale and
    sum term: xs[g] is the Q8_1 term, or for Q8_0 the scale times the integer sum (which a weight
    type's offset multiplies). Every thread takes the same trips (the simulator's quads need it).
    items is x.shape[1] // 8 (a constant in vec_kernel)."""
    for it in range(cuda.threadIdx.x, (items + 31) // 32 * 32, BLOCK):
        g = it >> 2  # (shifts and masks: the compiler does not know that it is not negative)
        q = it & 3
        amax = float32(0.0)
        if it < items:  # (one branch for the item: the 8 loads go out together)
            if norm and it != cuda.threadIdx.x:
                _fetch_norm(nw, fmt, it, nwv)
            for j in range(8):
                c = uint32(g * 32 + elem(fmt, q, j))
                v = x[uint32(t), c] * inv * nwv[j] if norm else x[uint32(t), c]
                if write_h:
                    hout[uint32(t), c] = v
                wv[j] = v
                amax = max(amax, abs(v))
        else:
            for j in range(8):
                wv[j] = float32(0.0)
        d, inv_d = _q8_scale(quad_max(amax, scratch))
        qs = float32(0.0)
        lo = uint32(0)
        hi = uint32(0)
        for j in range(8):
            qv = rint(wv[j] * inv_d)
            qs += qv
            byte = uint32(int32(qv) & 255)
            if j < 4:
                lo |= byte << uint32(8 * j)
            else:
                hi |= byte << uint32(8 * (j - 4))
        s = quad_sum(qs, scratch)  # whole numbers below 2^24: exact
        if it < items:
            xw[uint32(2 * it)] = int32(lo)
            xw[uint32(2 * it + 1)] = int32(hi)
            if q == 0:
                xd[uint32(g)] = fp16_round(d)
                xs[uint32(g)] = fp16_round(d * s) if rnd == ROUND_Q8_1 else fp16_round(d) * s


@cuda.jit(**DEVICE)
def _matrix_row(row, n0, n1):
    """MODE_ROWS: the matrix (0, 1, 2) and its row for the row-th of their rows one after another."""
    if row < n0:
        return 0, row
    if row < n0 + n1:
        return 1, row - n0
    return 2, row - n0 - n1


@cuda.jit(**DEVICE)
def _item_dot(w, d, m, fmt, off, r, it, xr, i, wv):
    """Item it of row r times this lane's float inputs of its i-th item."""
    decode(w, d, m, fmt, off, r, it >> 2, (it & 3), wv, True)
    s = float32(0.0)
    for j in range(8):
        s += wv[j] * xr[i * 8 + j]
    return s


@cuda.jit(**DEVICE)
def _staged_idot(lo, hi, scale, mn, it, rnd, off, xw, xd, xs):
    """Item it of a row (its words lo, hi from _item_words, its 32-block's scale and Q8_1 min mn)
    times the staged Q8 input (_stage_q8): the integer dot product of the weights' values and the
    inputs' by dp4a, then the scales; the block's first item adds the Q8_1 min term or the weight
    type's offset."""
    g = uint32(it >> 2)
    s = dp4a(hi, xw[uint32(2 * it + 1)], dp4a(lo, xw[uint32(2 * it)], 0))
    v = scale * xd[g] * float32(s)
    if (it & 3) == 0:
        if rnd == ROUND_Q8_1:
            v += mn * xs[g]
        elif off != 0:
            v += scale * off * xs[g]
    return v


@cuda.jit(**DEVICE)
def _item_words(w, fmt, r, it):
    """Item it of row r of a Q8, NIB4 or NIB5 matrix as two words of four int8 values, in the order
    of _stage_q8's input words (the item's elem(fmt, q, 0 .. 3), then elem(fmt, q, 4 .. 7))."""
    g = it >> 2
    q = it & 3
    if fmt == Q8:
        return w[uint32(r), uint32(g * 8 + 2 * q)], w[uint32(r), uint32(g * 8 + 2 * q + 1)]
    # NIB4, NIB5: the item's word holds its 4 low elements in the low nibbles, its 4 high ones above
    word = w[uint32(r), uint32(g * 4 + q if fmt == NIB4 else g * 5 + 1 + q)]
    lo = word & 0x0F0F0F0F
    hi = (word >> 4) & 0x0F0F0F0F
    if fmt == NIB5:
        bits = w[uint32(r), uint32(g * 5)]
        lo |= _fifth_bits(bits >> (4 * q))
        hi |= _fifth_bits(bits >> (16 + 4 * q))
    return uint32(lo), uint32(hi)


@cuda.jit(**DEVICE)
def _fifth_bits(h):
    """Bits 0-3 of h moved to bit 4 of bytes 0-3 (NIB5's fifth bits of 4 elements)."""
    return ((h & 1) << 4) | ((h & 2) << 11) | ((h & 4) << 18) | ((h & 8) << 25)


@cuda.jit(**DEVICE)
def _pair(p, n0, n1, hd, neox):
    """Pair p of MODE_QKV's rows: (matrix, first row, second row); RoPE's pairs for q and k."""
    which, p = _matrix_row(p, n0 // 2, n1 // 2)
    if which == 2:
        return which, 2 * p, 2 * p + 1
    half = hd // 2
    i = p % half
    ra = (p // half) * hd + (i if neox else 2 * i)
    return which, ra, ra + (half if neox else 1)


@cuda.jit(**DEVICE)
def _rotation(which, ra, pos, hd, neox, rope):
    """cos and sin of the RoPE angle of MODE_QKV's pair with first row ra (q and k) at position pos."""
    if which == 2:
        return float32(1.0), float32(0.0)
    i = (ra % hd) % (hd // 2) if neox else (ra % hd) // 2
    return rope[4][uint32(pos), uint32(i)], rope[5][uint32(pos), uint32(i)]


@cuda.jit(**DEVICE)
def _store_pair(which, flags, t, pos, slot, ra, rb, a, b, c, s, o0, b0, o1, b1, o2, b2, hd, rope):
    """MODE_QKV's outputs of one pair of token t at position pos of its slot: bias, RoPE (q and k:
    cos c, sin s from _rotation), the fp16 KV-cache store (k and v)."""
    cache_k, cache_v = rope[0], rope[1]
    o, bias = (o0, b0) if which == 0 else ((o1, b1) if which == 1 else (o2, b2))
    if flags & (1 << which):
        a += bias[uint32(ra)]
        b += bias[uint32(rb)]
    if which < 2:
        a, b = a * c - b * s, a * s + b * c
    o[uint32(t), uint32(ra)] = a
    o[uint32(t), uint32(rb)] = b
    if which > 0:
        cache = cache_k if which == 1 else cache_v
        slot = uint32(slot)
        cache[slot, uint32(pos), uint32(ra // hd), uint32(ra % hd)] = fp16_round(a)  # llama.cpp's cache is fp16
        cache[slot, uint32(pos), uint32(rb // hd), uint32(rb % hd)] = fp16_round(b)


@cuda.jit(**DEVICE)
def _residual(flags, which, t, r, res):
    """The residual that _store adds output element (t, r) of matrix `which` to (0 where none)."""
    return res[uint32(t), uint32(r)] if flags & 8 and which == 0 else float32(0.0)


@cuda.jit(**DEVICE)
def _store(which, mode, flags, t, r, a, b, o0, b0, o1, b1, o2, b2, res, res_v):
    """Write output element (t, r) of matrix `which` (a, and b for SwiGLU's up row): bias, residual
    (res[t, r] = res_v + a, res_v that element as _residual read it), SwiGLU."""
    if which == 0:
        if flags & 1:
            a += b0[uint32(r)]
        o0[uint32(t), uint32(r)] = a
        if flags & 8:
            res[uint32(t), uint32(r)] = res_v + a
        if mode == MODE_SWIGLU:
            if flags & 2:
                b += b1[uint32(r)]
            o1[uint32(t), uint32(r)] = b
            o2[uint32(t), uint32(r)] = a / (float32(1.0) + math.exp(-a)) * b
    elif which == 1:
        o1[uint32(t), uint32(r)] = a + b1[uint32(r)] if flags & 2 else a
    else:
        o2[uint32(t), uint32(r)] = a + b2[uint32(r)] if flags & 4 else a


@functools.cache
def prep_kernel(rnd: int):  # noqa: ANN201
    """Normalizing and rounding many tokens' inputs once, before a product that reads them many times."""

    @cuda.jit(**EXACT)
    def kernel(x, norm, nw, eps, hout, xq, msum):
        """xq = round(x), or round(rmsnorm(x) * nw) also written to hout; one block per token,
        a warp per 32-block; msum[t, block] the Q8_1 sum terms."""
        grid_ready()
        scratch = cuda.shared.array(BLOCK, float32)
        t = cuda.blockIdx.x
        lane = cuda.threadIdx.x % 32
        inv = inv_rms(x, t, x.shape[1], eps, scratch) if norm else float32(1.0)
        for b in range(cuda.threadIdx.x // 32, x.shape[1] // 32, WARPS):
            c = b * 32 + lane
            v = x[t, c] * inv * nw[c] if norm else x[t, c]
            if norm:
                hout[t, c] = v
            v, s = round_lane(v, rnd, scratch)
            xq[t, c] = v
            if lane == 0:
                msum[t, b] = s

    return kernel


@functools.cache
def prep_q8_kernel(fmt: int, rnd: int):  # noqa: ANN201
    """Many tokens' inputs normalized and rounded to Q8 once, for mma_kernel, in vec_kernel's staged
    layout (_stage_q8, the item order of weight format fmt): xw[t] the int8 values four a word, xd[t]
    and xs[t] each 32-block's scale and sum term. One block per token."""

    @cuda.jit(**EXACT)
    def kernel(x, norm, nw, eps, hout, xw, xd, xs):
        scratch = cuda.shared.array(BLOCK, float32)
        wv = cuda.local.array(8, float32)
        nwv = cuda.local.array(8, float32)
        t = cuda.blockIdx.x
        if norm and cuda.threadIdx.x < x.shape[1] // 8:
            _fetch_norm(nw, fmt, cuda.threadIdx.x, nwv)
        grid_ready()
        inv = inv_rms(x, t, x.shape[1], eps, scratch) if norm else float32(1.0)
        _stage_q8(x, t, x.shape[1] // 8, inv, norm, nw, nwv, norm, hout, fmt, rnd, xw[t], xd[t], xs[t], scratch, wv)

    return kernel


MMA_WARPS = 1 if SIM else 4  # warps per block of mma_kernel, one above the other
MMA_MI, MMA_NJ = 2, 4  # a warp's output tile: MMA_MI 16-row by MMA_NJ 8-token tensor-core tiles
MMA_BM, MMA_BN = 16 * MMA_MI * MMA_WARPS, 8 * MMA_NJ  # a block's rows and tokens
MMA_ACC, MMA_COLS, MMA_ROWS = MMA_MI * MMA_NJ * 4, 2 * MMA_NJ, 2 * MMA_MI  # a lane's accumulators, tokens, rows
MMA_PAD = MMA_BN + 1  # the block's output tile in shared memory, rows padded against bank conflicts
MMA_THREADS = 32 * MMA_WARPS
MMA_SCRATCH = MMA_THREADS if SIM else 1  # (the simulator's mma_s8 exchanges the fragments through it)


@functools.cache
def mma_kernel(fmt: int, rnd: int):  # noqa: ANN201
    """The many-token product of Q8-rounded inputs (prep_q8_kernel) and Q8, NIB4 or NIB5 weights on the
    tensor cores: int8 mma over each 32-block, then its scales, in float.

    A block takes MMA_BM rows of one of the (up to three) matrices, its blocks along x those of matrix
    0, then 1, then 2, so the weights a block reads are chosen once. Lane l of a warp takes item l % 4
    of each 32-block: the two words _item_words gives are exactly its A fragment (rows l // 4 and + 8
    of a 16-row tile) and the token's two staged input words its B fragment (token l // 4 of an
    8-token tile); the mma sums over the items' k-order, which the weights and the inputs share. Each
    element (row, token) then adds d_w * d_x * dot plus the min term (Q8_1: m_w * xs) or the offset
    term (Q8_0: d_w * off * xs), as _staged_idot does. A warp keeps MMA_MI x MMA_NJ tiles, its loads
    reused across them; rows and tokens past the ends are read clamped and not written. The block's
    outputs go through shared memory to coalesced stores. K is not split: on the H200, splitting it
    over blocks like gemm_kernel (to fill the GPU at 64 tokens) made every product slower (batch-64
    decode 8.6k against 14.8k tok/s without).
    """
    q8_1 = rnd == ROUND_Q8_1

    @cuda.jit(**JIT)
    def kernel(xw, xd, xs, w0, d0, m0, o0, b0, w1, d1, m1, o1, b1, w2, d2, m2, o2, b2, n0, n1, n2, off, flags, res):
        grid_ready()
        scratch = cuda.shared.array((MMA_SCRATCH, 6), uint32)
        tile = cuda.shared.array((MMA_BM, MMA_PAD), float32)
        acc = cuda.local.array(MMA_ACC, float32)
        rows = cuda.local.array(MMA_ROWS, uint32)
        btok = cuda.local.array(MMA_NJ, uint32)
        ctok = cuda.local.array(MMA_COLS, uint32)
        blo = cuda.local.array(MMA_NJ, int32)
        bhi = cuda.local.array(MMA_NJ, int32)
        td = cuda.local.array(MMA_COLS, float32)
        ts = cuda.local.array(MMA_COLS, float32)
        lane = cuda.threadIdx.x % 32
        gq = lane // 4
        tq = lane % 4
        n_tok = xw.shape[0]
        which, first, n = _mma_block_rows(n0, n1, n2)
        w, d, m = (w0, d0, m0) if which == 0 else ((w1, d1, m1) if which == 1 else (w2, d2, m2))
        r0 = first + (cuda.threadIdx.x // 32) * 16 * MMA_MI  # the warp's first row in its matrix
        t0 = cuda.blockIdx.y * MMA_BN
        for i in range(MMA_ROWS):  # the lane's rows (clamped): gq and gq + 8 of each 16-row tile
            rows[i] = min(r0 + 16 * (i // 2) + gq + 8 * (i % 2), n - 1)
        for j in range(MMA_NJ):  # its B token of each 8-token tile, and the tokens of its outputs
            btok[j] = min(t0 + 8 * j + gq, n_tok - 1)
            for e in range(2):
                ctok[2 * j + e] = min(t0 + 8 * j + 2 * tq + e, n_tok - 1)
        for i in range(MMA_ACC):
            acc[i] = 0.0
        for g in range(xd.shape[1]):
            it = g * 4 + tq
            for j in range(MMA_NJ):
                blo[j] = xw[btok[j], uint32(2 * it)]
                bhi[j] = xw[btok[j], uint32(2 * it + 1)]
            for c in range(MMA_COLS):
                td[c] = xd[ctok[c], uint32(g)]
                ts[c] = xs[ctok[c], uint32(g)]
            for i in range(MMA_MI):
                ra = rows[2 * i]
                rb = rows[2 * i + 1]
                alo, ahi = _item_words(w, fmt, ra, it)
                blo_a, bhi_a = _item_words(w, fmt, rb, it)
                sa = d[ra, uint32(g)]
                sb = d[rb, uint32(g)]
                ea = m[ra, uint32(g)] if q8_1 else sa * off
                eb = m[rb, uint32(g)] if q8_1 else sb * off
                for j in range(MMA_NJ):
                    c0, c1, c2, c3 = mma_s8(alo, blo_a, ahi, bhi_a, blo[j], bhi[j], scratch)
                    k = (i * MMA_NJ + j) * 4
                    for c, v, s_w, e_w in ((0, c0, sa, ea), (1, c1, sa, ea), (2, c2, sb, eb), (3, c3, sb, eb)):
                        acc[k + c] += (s_w * td[2 * j + c % 2]) * float32(v)  # two fused multiply-adds
                        acc[k + c] += e_w * ts[2 * j + c % 2]
        wr = (cuda.threadIdx.x // 32) * 16 * MMA_MI
        for k in range(MMA_ACC):  # C's fragment order: tile (i, j), then row gq (tokens 2 tq, + 1), row gq + 8
            i = (k // 4) // MMA_NJ
            j = (k // 4) % MMA_NJ
            tile[wr + 16 * i + gq + 8 * ((k % 4) // 2), 8 * j + 2 * tq + k % 2] = acc[k]
        cuda.syncthreads()
        for u in range(MMA_ACC):
            r, t = _tile_element(first, t0, u)
            if r < n and t < n_tok:
                _store(which, MODE_ROWS, flags, t, r, tile[r - first, t - t0], float32(0.0),
                       o0, b0, o1, b1, o2, b2, res, _residual(flags, which, t, r, res))  # fmt: skip

    return kernel


@cuda.jit(**DEVICE)
def _tile_element(first, t0, u):
    """The (row, token) of this thread's u-th element of an mma_kernel block's output tile."""
    e = cuda.threadIdx.x + MMA_THREADS * u
    return first + e % MMA_BM, t0 + e // MMA_BM


def mma_row_tiles(n0: int, n1: int, n2: int) -> int:
    """mma_kernel's blocks along x: each matrix's rows in tiles of MMA_BM."""
    return sum(-(-n // MMA_BM) for n in (n0, n1, n2))


@cuda.jit(**DEVICE)
def _mma_block_rows(n0, n1, n2):
    """This block's matrix (0, 1, 2), its first row there and the matrix's rows (mma_row_tiles' order)."""
    bx = cuda.blockIdx.x
    t0 = (n0 + MMA_BM - 1) // MMA_BM
    t1 = (n1 + MMA_BM - 1) // MMA_BM
    if bx < t0:
        return 0, bx * MMA_BM, n0
    if bx < t0 + t1:
        return 1, (bx - t0) * MMA_BM, n1
    return 2, (bx - t0 - t1) * MMA_BM, n2


@cuda.jit(**JIT)
def embed_kernel(words, d, m, fmt, off, tokens, out):
    """out[t, :] = dequantized row tokens[t]; grid (T, ceil(items / blockDim))."""
    grid_ready()
    wv = cuda.local.array(8, float32)
    t = cuda.blockIdx.x
    it = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if it < (out.shape[1] // 32) * 4:
        g = it // 4
        q = it % 4
        decode(words, d, m, fmt, off, tokens[t], g, q, wv, True)
        for j in range(8):
            out[t, g * 32 + elem(fmt, q, j)] = wv[j]


BM = 64  # weight rows per GEMM tile (32 x 32 tiles measured slower on the H100, even at 64 tokens)
BN = 64  # tokens per GEMM tile
PAD_M, PAD_N = BM + 1, BN + 1  # shared rows padded against bank conflicts (constants for numba)
TX = BN // 4  # threads along the tokens
GEMM_THREADS = (BM // 4) * TX  # each thread 4 rows x 4 tokens
# below this the few-token kernel wins; since the GEMM splits over K it wins at 64 tokens too (H200, batched
# decode: 6.7k against 5.9k tok/s); the simulator switches early, so its tests reach the GEMM cheaply
GEMM_MIN_TOKENS = 16 if SIM else 32
GEMM_BLOCKS = 4 if SIM else 528  # a GEMM with fewer tiles than this splits K until it has about this many blocks
GEMM_SPLIT_GROUPS = 2  # 32-blocks of K per split at least


@functools.cache
def gemm_kernel(fmt: int):  # noqa: ANN201
    """The many-token product for one weight format (fixed when compiled, like rows_kernel)."""

    @cuda.jit(**JIT)
    def kernel(x, w0, d0, m0, o0, b0, w1, d1, m1, o1, b1, w2, d2, m2, o2, b2,
               n0, n1, n2, off, flags, res, msum, part, count):  # fmt: skip
        """Tiled form of rows_kernel's MODE_ROWS for many tokens: a BM x BN output tile per block.

        Each step dequantizes a BM-row x 32 weight tile and a 32 x BN-token slice of x
        into shared memory; every weight is decoded once per BN tokens.
        Split over K (gridDim.z > 1, for matrices with too few tiles to fill the GPU): block z
        sums its share of the 32-blocks into part[z]; the tile's last block to finish (counted
        in count[tile], which it resets for the next launch) adds the parts in order of z, so
        the result does not depend on which block finished first.
        """
        grid_ready()
        ws = cuda.shared.array((32, PAD_M), float32)
        xs = cuda.shared.array((32, PAD_N), float32)
        ms = cuda.shared.array(BM, float32)  # Q8_1 inputs: the tile rows' mins and the tokens' block sums
        ss = cuda.shared.array(BN, float32)
        last = cuda.shared.array(1, int32)
        q8_1 = (flags & 32) != 0
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
            for li in range(tid, BM * 4, GEMM_THREADS):  # the tile's weight items
                lr = li // 4
                lq = li % 4
                row = r0 + lr
                if row < total:
                    lrow = row if row < n0 else (row - n0 if row < n0 + n1 else row - n0 - n1)
                    w, d, m = (w0, d0, m0) if row < n0 else ((w1, d1, m1) if row < n0 + n1 else (w2, d2, m2))
                    decode(w, d, m, fmt, off, lrow, g, lq, wv, not q8_1)
                    for j in range(8):
                        ws[elem(fmt, lq, j), lr] = wv[j]
                    if q8_1 and lq == 0:
                        ms[lr] = m[lrow, g]
                else:
                    for j in range(8):
                        ws[elem(fmt, lq, j), lr] = 0.0
                    if lq == 0:
                        ms[lr] = 0.0
            if q8_1:
                for tt in range(tid, BN, GEMM_THREADS):
                    ss[tt] = msum[t0 + tt, g] if t0 + tt < n_tok else float32(0.0)
            for idx in range(tid, 32 * BN, GEMM_THREADS):
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
            if q8_1:
                for i in range(4):
                    for j in range(4):
                        acc[4 * i + j] += ms[ty * 4 + i] * ss[tx * 4 + j]
            cuda.syncthreads()
        if split > 1:
            for i in range(4):
                for j in range(4):
                    row = r0 + ty * 4 + i
                    t = t0 + tx * 4 + j
                    if row < total and t < n_tok:
                        part[z, t, row] = acc[4 * i + j]
            if not _last_of_split(count, split, last):  # another block of the tile finishes it
                return
        for i in range(4):
            row = r0 + ty * 4 + i
            for j in range(4):
                t = t0 + tx * 4 + j
                if row < total and t < n_tok:
                    v = _split_sum(part, split, t, row) if split > 1 else acc[4 * i + j]
                    which, r = _matrix_row(row, n0, n1)
                    _store(which, MODE_ROWS, flags, t, r, v, float32(0.0), o0, b0, o1, b1, o2, b2, res,
                           _residual(flags, which, t, r, res))  # fmt: skip

    return kernel


@cuda.jit(**DEVICE)
def _last_of_split(count, split, flag):
    """Called by the whole block of a GEMM split over K once it has written its part: whether it is
    the last of its tile's blocks to finish (counted in count[tile], which it then resets for the next
    launch), the one that adds the parts."""
    tile = cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        flag[0] = cuda.atomic.add(count, tile, 1)
    cuda.syncthreads()
    last = flag[0] == split - 1
    if last and cuda.threadIdx.x == 0:
        count[tile] = 0
    cuda.threadfence()
    return last


@cuda.jit(**DEVICE)
def _split_sum(part, split, t, row):
    """The parts of output (t, row) added in the order of z, so the sum does not depend on which block finished last."""
    v = float32(0.0)
    for z in range(split):
        v += part[z, t, row]
    return v
