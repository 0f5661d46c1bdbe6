"""The product of one or two tokens (decode): vec_kernel, compiled for everything but its arrays.

For batch-1 decode the cost is the time to stream the weights and the latency of each warp's
instructions, so the input is prepared once per block, not per warp: rounded to Q8 (the weight
types llama.cpp rounds the activations for), the block's threads write each 32-block's int8 values
four a word in shared memory, in the order of the weights' items, with its scale and sum term
(formats.stage_q8); after one barrier every warp takes rows, its lanes consecutive items
(coalesced spans of the packed words), an item's 8 weights meeting the inputs in two dp4a
instructions (exact integer sums, then the scales: llama.cpp's and the CPU's arithmetic). Float
weight types keep float inputs: lane l prepares those of its items l, l + 32, ... in registers.

A warp's unit of work is a chunk of `ch` items a lane of its row (two rows in MODE_SWIGLU and
MODE_QKV): the raw words of the next unit are loaded into registers right after this unit's sums
(the first unit's before grid_ready, overlapping the kernel before this one in a graph), so a
row of any length streams through a few registers with its loads in flight.

The input width k, the mode, the flags and the matrices' row counts are compiled in: a warp's
instructions are then mostly the product's own (the shapes' divisions, the other modes' branches
and the index arithmetic fold away). MODE_QKV: matrices q, k, v of head size hd, each warp a pair
of rows that RoPE rotates together (q and k; two rows of v), which it rotates, writes, and for k
and v stores in the KV cache: `rope` is (cache_k, cache_v, slots, positions, cos, sin),
cos/sin[position, pair] the rotation table (CudaBackend rope_table). Other modes get dummies there.
"""

from __future__ import annotations

import functools

from numba import cuda, float32, int32, uint32

from rbees_workerd.kernels.cuda.device import DEVICE, EXACT, SIM, dp4a, fp16_round, grid_ready, inv_rms, warp_sum
from rbees_workerd.kernels.cuda.formats import (
    KQUANTS,
    OFFSET,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    ROUND_F16,
    ROUND_Q8_1,
    decode,
    elem,
    fetch_norm,
    integer,
    load_item,
    load_scales,
    rounding,
    scales_of,
    stage_q8,
    unpack_item,
)  # fmt: skip
from rbees_workerd.kernels.cuda.outputs import (
    ACCUMULATE,
    MODE_QKV,
    MODE_ROWS,
    MODE_SWIGLU,
    NORM,
    matrix_row,
    residual,
    store,
)

VEC_MAX_TOKENS = 2  # steps of at most this many tokens take vec_kernel (one token per block row)
VEC_WARPS = 1 if SIM else 2112  # warps of vec_kernel at most (16 an SM): they loop over the rows
# warps per block: each block stages its token's input once, so long inputs take fewer, larger blocks
BLOCK_WARPS = 1 if SIM else 4
LONG_BLOCK_WARPS, LONG_INPUT = (1, 1 << 30) if SIM else (16, 2048)
FETCH_REGS = 2 if SIM else 24  # registers of raw weight words a lane holds for the next unit at most


def item_regs(qt: int) -> int:
    """Registers of one item's raw weights in flight: the words load_item gives for the type, its scales."""
    words = {Q8_0: 2, Q6_K: 3, Q5_0: 2, Q5_1: 2, Q5_K: 2}.get(qt, 1)
    return words + (2 if qt in KQUANTS else 1)


def block_warps(k: int) -> int:
    """Warps a block of vec_kernel for an input of k elements."""
    return LONG_BLOCK_WARPS if k >= LONG_INPUT else BLOCK_WARPS


def chunk_items(qt: int, k: int, mode: int) -> int:
    """Items a lane takes of a row per unit of work."""
    ni = -(-k // 256)
    rows = 1 if mode == MODE_ROWS else 2
    return max(1, min(ni, FETCH_REGS // (item_regs(qt) * rows)))


@functools.cache
def vec_kernel(qt: int, k: int, mode: int, flags: int, ns: tuple[int, int, int], hd: int = 0, neox: bool = False,
               warps: int = BLOCK_WARPS):  # noqa: ANN201  # fmt: skip
    """The product of weight type qt for one token per block row, blocks of `warps` warps (see the module
    docstring)."""
    rnd = rounding(qt)
    off = float32(OFFSET.get(qt, 0.0))
    ni = -(-k // 256)  # items a lane per row
    ch = chunk_items(qt, k, mode)
    nc = -(-ni // ch)  # units of work a row
    n_inputs = ni * 8  # (constants for numba's array shapes)
    n_words = ni * 64
    n_groups = ni * 8
    n_fetch = ch * 2
    is_int = integer(qt)
    n0, n1, n2 = ns
    total = n0 if mode == MODE_SWIGLU else (n0 + n1 + n2) // (2 if mode == MODE_QKV else 1)
    items = k // 8
    norm = (flags & NORM) != 0
    threads = 32 * warps
    fit = {} if SIM else {"max_registers": min(255, 65536 // threads)}  # a block must fit an SM's registers

    @cuda.jit(**EXACT, **fit)
    def kernel(x, m0, m1, m2, nw, eps, hout, rope):
        w0, g0, s0, o0, b0 = m0
        w1, g1, s1, o1, b1 = m1
        w2, g2, s2, o2, b2 = m2
        scratch = cuda.shared.array(threads, float32)
        xw = cuda.shared.array(n_words, int32)  # the Q8 input: item i's int8 values in words 2i, 2i + 1
        xd = cuda.shared.array(n_groups, float32)  # each 32-block's scale
        xs = cuda.shared.array(n_groups, float32)  # and its sum term
        xr = cuda.local.array(n_inputs, float32)  # float inputs: this lane's items
        wv = cuda.local.array(8, float32)
        # integer products: the raw words of the lane's items of the warp's next unit (both rows)
        fa = cuda.local.array(n_fetch, uint32)
        fb = cuda.local.array(n_fetch, uint32)
        fc = cuda.local.array(n_fetch, uint32)
        fg = cuda.local.array(n_fetch, uint32)
        fs = cuda.local.array(n_fetch, uint32)
        nwv = cuda.local.array(8, float32)  # the norm's weights of this thread's first staged item
        lane = cuda.threadIdx.x & 31  # (a bitmask: the compiler then knows it below 32)
        warp = cuda.blockIdx.x * warps + cuda.threadIdx.x // 32
        t = cuda.blockIdx.y
        stride = cuda.gridDim.x * warps
        # before grid_ready only what no kernel of the step writes: weights, and the step's positions
        # and slots (uploaded before it) with the rotation table: these loads overlap the kernel before
        pos, slot = 0, 0
        side_a, side_b = float32(0.0), float32(0.0)  # what the warp's row stores with: cos/sin or residual
        if mode == MODE_QKV:
            pos, slot = rope[3][uint32(t)], rope[2][uint32(t)]
            if warp < total:
                side_a, side_b = _rotation(warp, n0, n1, hd, neox, pos, rope)
        if is_int and warp < total:
            _fetch(warp, 0, mode, n0, n1, hd, neox, w0, g0, s0, w1, g1, s1, w2, g2, s2, qt, ch, items, lane,
                   fa, fb, fc, fg, fs)  # fmt: skip
        if is_int and norm and cuda.threadIdx.x < items:  # (stage_q8's first item of this thread)
            fetch_norm(nw, qt, cuda.threadIdx.x, nwv)
        grid_ready()
        if mode != MODE_QKV and warp < total:  # the residual: in flight while the input is staged
            side_a = _residual_of(warp, mode, flags, t, n0, n1, hd, neox, o0, o1, o2)
        inv = inv_rms(x, t, k, eps, scratch) if norm else float32(1.0)
        if is_int:
            stage_q8(x, t, items, inv, norm, nw, nwv, norm and cuda.blockIdx.x == 0, hout, qt, rnd, xw, xd, xs,
                     scratch, wv)  # fmt: skip
            cuda.syncthreads()
        else:
            for i in range(ni):
                it = lane + 32 * i
                for j in range(8):
                    v = float32(0.0)
                    if it < items:
                        c = (it >> 2) * 32 + elem(qt, (it & 3), j)
                        v = x[uint32(t), uint32(c)] * inv * nw[uint32(c)] if norm else x[uint32(t), uint32(c)]
                        if norm and warp == 0:
                            hout[uint32(t), uint32(c)] = v
                    xr[i * 8 + j] = fp16_round(v) if rnd == ROUND_F16 else v
        for row in range(warp, total, stride):  # the same trips for the whole warp
            which, r, rb = _vec_rows(row, mode, n0, n1, hd, neox)
            a = float32(0.0)
            b = float32(0.0)
            if is_int:
                for c in range(nc):
                    for i in range(ch):
                        it = lane + 32 * (c * ch + i)
                        if it < items:
                            a += _idot(qt, fa[i], fb[i], fc[i], fg[i], fs[i], it, rnd, off, xw, xd, xs)
                            if mode != MODE_ROWS:
                                j = ch + i
                                b += _idot(qt, fa[j], fb[j], fc[j], fg[j], fs[j], it, rnd, off, xw, xd, xs)
                    # the next unit's loads in flight during these sums' reduction and stores
                    if c + 1 < nc:
                        _fetch(row, c + 1, mode, n0, n1, hd, neox, w0, g0, s0, w1, g1, s1, w2, g2, s2, qt, ch,
                               items, lane, fa, fb, fc, fg, fs)  # fmt: skip
                    elif row + stride < total:
                        _fetch(row + stride, 0, mode, n0, n1, hd, neox, w0, g0, s0, w1, g1, s1, w2, g2, s2, qt,
                               ch, items, lane, fa, fb, fc, fg, fs)  # fmt: skip
            else:
                w, gs, sb = (w0, g0, s0) if which == 0 else ((w1, g1, s1) if which == 1 else (w2, g2, s2))
                wb, gb, sbb = (w1, g1, s1) if mode == MODE_SWIGLU else (w, gs, sb)
                for i in range(ni):
                    it = lane + 32 * i
                    if it < items:
                        a += _fdot(qt, w, gs, sb, off, r, it, xr, i, wv)
                        if mode != MODE_ROWS:
                            b += _fdot(qt, wb, gb, sbb, off, rb, it, xr, i, wv)
            a = warp_sum(a, scratch)
            if mode != MODE_ROWS:
                b = warp_sum(b, scratch)
            if lane == 0:
                if mode == MODE_QKV:
                    _store_pair(which, flags, t, pos, slot, r, rb, a, b, side_a, side_b, o0, b0, o1, b1, o2, b2,
                                hd, rope)  # fmt: skip
                else:
                    store(which, mode, flags, t, r, a, b, o0, b0, o1, b1, o2, b2, side_a)
            if row + stride < total:
                if mode == MODE_QKV:
                    side_a, side_b = _rotation(row + stride, n0, n1, hd, neox, pos, rope)
                else:
                    side_a = _residual_of(row + stride, mode, flags, t, n0, n1, hd, neox, o0, o1, o2)

    return kernel


@cuda.jit(**DEVICE)
def _vec_rows(row, mode, n0, n1, hd, neox):
    """vec_kernel's row-th unit of rows: (matrix, row, second row); the second row is SwiGLU's up
    row, MODE_QKV's other row of the pair, and the row itself in MODE_ROWS."""
    if mode == MODE_QKV:
        return _pair(row, n0, n1, hd, neox)
    if mode == MODE_SWIGLU:
        return 0, row, row
    which, r = matrix_row(row, n0, n1)
    return which, r, r


@cuda.jit(**DEVICE)
def _residual_of(row, mode, flags, t, n0, n1, hd, neox, o0, o1, o2):
    """The residual vec_kernel's row-th unit adds its sum to, loaded ahead of the sums."""
    if mode != MODE_ROWS or not flags & ACCUMULATE:
        return float32(0.0)
    which, r, _ = _vec_rows(row, mode, n0, n1, hd, neox)
    return residual(flags, which, t, r, o0, o1, o2)


@cuda.jit(**DEVICE)
def _fetch(row, c, mode, n0, n1, hd, neox, w0, g0, s0, w1, g1, s1, w2, g2, s2, qt, ch, items, lane,
           fa, fb, fc, fg, fs):  # fmt: skip
    """The raw words of the lane's items of chunk c of vec_kernel's row-th unit into registers: the first
    row's at 0 .. ch, the second row's (SwiGLU's up row, MODE_QKV's pair) at ch .. 2 ch."""
    which, r, rb = _vec_rows(row, mode, n0, n1, hd, neox)
    w, gs, sb = (w0, g0, s0) if which == 0 else ((w1, g1, s1) if which == 1 else (w2, g2, s2))
    _fetch_items(qt, w, gs, sb, r, c, ch, 0, items, lane, fa, fb, fc, fg, fs)
    if mode == MODE_SWIGLU:
        _fetch_items(qt, w1, g1, s1, rb, c, ch, ch, items, lane, fa, fb, fc, fg, fs)
    elif mode == MODE_QKV:
        _fetch_items(qt, w, gs, sb, rb, c, ch, ch, items, lane, fa, fb, fc, fg, fs)


@cuda.jit(**DEVICE)
def _fetch_items(qt, w, gs, sb, r, c, ch, at, items, lane, fa, fb, fc, fg, fs):
    """Items lane + 32 (c ch + i), i < ch, of row r: their raw words and scale fields, from index at."""
    for i in range(ch):
        it = lane + 32 * (c * ch + i)
        if it < items:
            fa[at + i], fb[at + i], fc[at + i] = load_item(qt, w, r, it)
            fg[at + i], fs[at + i] = load_scales(qt, gs, sb, r, it >> 2)


@cuda.jit(**DEVICE)
def _idot(qt, a, b, c, gv, sv, it, rnd, off, xw, xd, xs):
    """Item it of a row (its raw words a, b, c and scale fields gv, sv) times the staged Q8 input: the
    integer dot products of the weights' values and the inputs' by dp4a, then the scales; the block's
    first item adds the Q8_1 min term or the weight type's offset term."""
    g = uint32(it >> 2)
    lo, hi = unpack_item(qt, a, b, c, it & 3)
    d_lo, d_hi, mn = scales_of(qt, gv, sv)
    xl = xw[uint32(2 * it)]
    xh = xw[uint32(2 * it + 1)]
    if qt == Q6_K:  # a scale for each half of the group
        v = xd[g] * (d_lo * float32(dp4a(lo, xl, 0)) + d_hi * float32(dp4a(hi, xh, 0)))
    else:
        v = d_lo * xd[g] * float32(dp4a(hi, xh, dp4a(lo, xl, 0)))
    if (it & 3) == 0:
        if rnd == ROUND_Q8_1:
            v += mn * xs[g]
        elif off != 0:
            v += d_lo * off * xs[g]
    return v


@cuda.jit(**DEVICE)
def _fdot(qt, w, gs, sb, off, r, it, xr, i, wv):
    """Item it of row r times this lane's float inputs of its i-th item."""
    decode(qt, w, gs, sb, off, r, it >> 2, (it & 3), wv, True)
    s = float32(0.0)
    for j in range(8):
        s += wv[j] * xr[i * 8 + j]
    return s


@cuda.jit(**DEVICE)
def _pair(p, n0, n1, hd, neox):
    """Pair p of MODE_QKV's rows: (matrix, first row, second row); RoPE's pairs for q and k."""
    which, p = matrix_row(p, n0 // 2, n1 // 2)
    if which == 2:
        return which, 2 * p, 2 * p + 1
    half = hd // 2
    i = p % half
    ra = (p // half) * hd + (i if neox else 2 * i)
    return which, ra, ra + (half if neox else 1)


@cuda.jit(**DEVICE)
def _rotation(row, n0, n1, hd, neox, pos, rope):
    """cos and sin of the RoPE angle of MODE_QKV's row-th pair (q and k; (1, 0) for v) at position pos."""
    which, ra, _ = _pair(row, n0, n1, hd, neox)
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
    if which == 0:  # RopeStore.q_scale
        a, b = a * rope[6], b * rope[6]
    o[uint32(t), uint32(ra)] = a
    o[uint32(t), uint32(rb)] = b
    if which > 0:
        cache = cache_k if which == 1 else cache_v
        slot = uint32(slot)
        cache[slot, uint32(pos), uint32(ra // hd), uint32(ra % hd)] = fp16_round(a)  # llama.cpp's cache is fp16
        cache[slot, uint32(pos), uint32(rb // hd), uint32(rb % hd)] = fp16_round(b)
