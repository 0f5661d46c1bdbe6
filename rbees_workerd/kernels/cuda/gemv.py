"""The product of one or two tokens (decode): vec_kernel, compiled for everything but its arrays.

For batch-1 decode the cost is the time to stream the weights and the instructions a warp spends on
each byte, so the input is prepared once per block, not per warp: rounded to Q8 (the weight types
llama.cpp rounds the activations for), the block's threads write each 32-block's int8 values four a
word in shared memory, in the order of the weights' items, with its scale and sum term
(formats.stage_q8); after one barrier every warp takes rows, each lane whole groups of 32 weights
(lane l groups l, l + 32, ...): a group's words come in the widest loads their alignment allows
(formats.load_group: one 16-byte load for Q4_x) and meet the group's 8 staged input words (two
16-byte shared loads) in 8 dp4a instructions (exact integer sums), then the group's scales, applied
once (llama.cpp's and the CPU's arithmetic). Float weight types keep float inputs: lane l prepares
those of its items l, l + 32, ... (8 weights each) in registers.

A warp's unit of work is a chunk of `ch` groups a lane of its row (two rows in MODE_SWIGLU and
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
import math

from numba import cuda, float32, int32, uint32

from rbees_workerd.kernels.cuda.device import (
    DEVICE,
    EXACT,
    SIM,
    dp4a,
    f16_bits,
    fp16_round,
    grid_ready,
    inv_rms,
    shared4,
    warp_sum,
)
from rbees_workerd.kernels.cuda.formats import (
    KQUANTS,
    OFFSET,
    Q6_K,
    Q6_OFFSET_WORD,
    ROUND_F16,
    ROUND_Q8_1,
    WORDS,
    decode,
    elem,
    fetch_norm,
    group_item,
    integer,
    load_group,
    load_scales,
    rounding,
    scales_of,
    stage_q8,
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
# ... in products of fewer rows than VEC_WARPS (a v matrix of its own type): a warp then fetches whole rows
# at once (the H100, 8B shape's Q6_K v, 512 pairs of rows: 53.5 us in 4 rounds of loads a row)
FEW_FETCH_REGS = 2 if SIM else 64
XW_ALIGN = None if SIM else 16  # (the staged input is read 16 bytes at a time; the simulator takes no alignment)


def group_regs(qt: int) -> int:
    """Registers of one group's raw weights in flight: its words (load_group) and scale fields."""
    return WORDS[qt] + (2 if qt in KQUANTS else 1)


def block_warps(k: int, units: int) -> int:
    """Warps a block of vec_kernel for an input of k elements and `units` units of rows: fewer (down to
    BLOCK_WARPS, which still stage the input quickly) for products of few rows, so that their blocks
    spread over more SMs."""
    warps = LONG_BLOCK_WARPS if k >= LONG_INPUT else BLOCK_WARPS
    return min(warps, max(BLOCK_WARPS, units // max(1, VEC_WARPS // 16)))


def chunk_groups(qt: int, k: int, mode: int, units: int) -> int:
    """Groups of 32 weights a lane takes of a row per unit of work (integer products), in a product of
    `units` units of rows."""
    if not integer(qt):
        return 1
    per_lane = -(-k // 1024)
    rows = 1 if mode == MODE_ROWS else 2
    regs = FETCH_REGS if units >= VEC_WARPS else FEW_FETCH_REGS
    return max(1, min(per_lane, regs // (group_regs(qt) * rows)))


@functools.cache
def vec_kernel(qt: int, k: int, mode: int, flags: int, ns: tuple[int, int, int], hd: int = 0, neox: bool = False,
               warps: int = BLOCK_WARPS):  # noqa: ANN201  # fmt: skip
    """The product of weight type qt for one token per block row, blocks of `warps` warps (see the module
    docstring)."""
    rnd = rounding(qt)
    off = float32(OFFSET.get(qt, 0.0))
    ni = -(-k // 256)  # items a lane per row (float weights)
    groups = k // 32
    n0, n1, n2 = ns
    total = n0 if mode == MODE_SWIGLU else (n0 + n1 + n2) // (2 if mode == MODE_QKV else 1)
    ch = chunk_groups(qt, k, mode, total)
    nc = math.ceil(math.ceil(groups / 32) / ch)  # units of work a row (integer weights): ch of a lane's groups
    n_inputs = ni * 8  # (constants for numba's array shapes)
    n_words = ni * 64
    n_groups = ni * 8
    n_fetch = ch * 2
    is_int = integer(qt)
    nwd = WORDS[qt] if is_int else 1  # words a group
    n_fw = n_fetch * nwd
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
        xw = cuda.shared.array(n_words, int32, alignment=XW_ALIGN)  # the Q8 input: item i's in words 2i, 2i + 1
        xd = cuda.shared.array(n_groups, float32)  # each 32-block's scale
        xs = cuda.shared.array(n_groups, float32)  # and its sum term
        xr = cuda.local.array(n_inputs, float32)  # float inputs: this lane's items
        wv = cuda.local.array(8, float32)
        # integer products: the raw words and scale fields of the lane's groups of the warp's next unit
        # (both rows), and the staged input words of a group
        fw = cuda.local.array(n_fw, uint32)
        fg = cuda.local.array(n_fetch, uint32)
        fs = cuda.local.array(n_fetch, uint32)
        xv = cuda.local.array(8, int32)
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
            _fetch(warp, 0, mode, n0, n1, hd, neox, w0, g0, s0, w1, g1, s1, w2, g2, s2, qt, nwd, ch, groups, lane,
                   fw, fg, fs)  # fmt: skip
        if is_int and norm and cuda.threadIdx.x < items:  # (stage_q8's first item of this thread)
            fetch_norm(nw, qt, cuda.threadIdx.x, nwv)
        grid_ready()
        if mode != MODE_QKV and warp < total:  # the residual: in flight while the input is staged
            side_a = _residual_of(warp, mode, flags, t, n0, n1, hd, neox, o0, o1, o2)
        inv = inv_rms(x, t, k, eps, scratch) if norm else float32(1.0)
        if is_int:
            stage_q8(x, t, items, inv, norm, nw, nwv, norm and cuda.blockIdx.x == 0, hout, qt, rnd, xw, xd, xs,
                     scratch, wv, x, False)  # fmt: skip
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
                        g = lane + 32 * (c * ch + i)
                        if g < groups:
                            xv[0], xv[1], xv[2], xv[3] = shared4(xw, uint32(8 * g))
                            xv[4], xv[5], xv[6], xv[7] = shared4(xw, uint32(8 * g + 4))
                            dx, sx = xd[uint32(g)], xs[uint32(g)]
                            a += _gdot(qt, fw, i * nwd, fg[i], fs[i], xv, dx, sx, rnd, off)
                            if mode != MODE_ROWS:
                                j = ch + i
                                b += _gdot(qt, fw, j * nwd, fg[j], fs[j], xv, dx, sx, rnd, off)
                    # the next unit's loads in flight during these sums' reduction and stores
                    if c + 1 < nc:
                        _fetch(row, c + 1, mode, n0, n1, hd, neox, w0, g0, s0, w1, g1, s1, w2, g2, s2, qt, nwd,
                               ch, groups, lane, fw, fg, fs)  # fmt: skip
                    elif row + stride < total:
                        _fetch(row + stride, 0, mode, n0, n1, hd, neox, w0, g0, s0, w1, g1, s1, w2, g2, s2, qt,
                               nwd, ch, groups, lane, fw, fg, fs)  # fmt: skip
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
def _fetch(row, c, mode, n0, n1, hd, neox, w0, g0, s0, w1, g1, s1, w2, g2, s2, qt, nwd, ch, groups, lane, fw, fg,
           fs):  # fmt: skip
    """The raw words and scale fields of the lane's groups of chunk c of vec_kernel's row-th unit into
    registers: the first row's at 0 .. ch, the second row's (SwiGLU's up row, MODE_QKV's pair) at ch .. 2 ch."""
    which, r, rb = _vec_rows(row, mode, n0, n1, hd, neox)
    w, gs, sb = (w0, g0, s0) if which == 0 else ((w1, g1, s1) if which == 1 else (w2, g2, s2))
    _fetch_groups(qt, nwd, w, gs, sb, r, c, ch, 0, groups, lane, fw, fg, fs)
    if mode == MODE_SWIGLU:
        _fetch_groups(qt, nwd, w1, g1, s1, rb, c, ch, ch, groups, lane, fw, fg, fs)
    elif mode == MODE_QKV:
        _fetch_groups(qt, nwd, w, gs, sb, rb, c, ch, ch, groups, lane, fw, fg, fs)


@cuda.jit(**DEVICE)
def _fetch_groups(qt, nwd, w, gs, sb, r, c, ch, at, groups, lane, fw, fg, fs):
    """Groups lane + 32 (c ch + i), i < ch, of row r: their words and scale fields, from place at."""
    for i in range(ch):
        g = lane + 32 * (c * ch + i)
        if g < groups:
            load_group(qt, w, r, g, fw, (at + i) * nwd, nwd)
            fg[at + i], fs[at + i] = load_scales(qt, gs, sb, r, g)


@cuda.jit(**DEVICE)
def _gdot(qt, fw, at, gv, sv, xv, dx, sx, rnd, off):
    """A group of a row (its words at fw[at:], scale fields gv, sv) times the staged Q8 input's group
    (its words xv, scale dx and sum term sx): the integer dot products of the weights' values and
    the inputs' by dp4a, two an item, then the scales, and the Q8_1 min term or the type's offset term."""
    d_lo, d_hi, mn = scales_of(qt, gv, sv)
    s_lo = int32(0)
    s_hi = int32(0)
    for q in range(4):
        lo, hi = group_item(qt, fw, at, q)
        if qt == Q6_K:  # a scale for each half of the group
            s_lo = dp4a(lo, xv[2 * q], s_lo)
            s_hi = dp4a(hi, xv[2 * q + 1], s_hi)
        else:
            s_lo = dp4a(hi, xv[2 * q + 1], dp4a(lo, xv[2 * q], s_lo))
    if qt == Q6_K:  # the values' offset -32 times each half's input sum (chained: the sums stay int32)
        m = int32(Q6_OFFSET_WORD)
        s_lo = dp4a(m, xv[6], dp4a(m, xv[4], dp4a(m, xv[2], dp4a(m, xv[0], s_lo))))
        s_hi = dp4a(m, xv[7], dp4a(m, xv[5], dp4a(m, xv[3], dp4a(m, xv[1], s_hi))))
        return dx * (d_lo * float32(s_lo) + d_hi * float32(s_hi))
    v = d_lo * dx * float32(s_lo)
    if rnd == ROUND_Q8_1:
        v += mn * sx
    elif off != 0:
        v += d_lo * off * sx
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
        cache[slot, uint32(pos), uint32(ra // hd), uint32(ra % hd)] = f16_bits(a)  # float16, as llama.cpp's cache
        cache[slot, uint32(pos), uint32(rb // hd), uint32(rb % hd)] = f16_bits(b)
