"""The product of many tokens of a quantized weight type on the tensor cores: mma_kernel.

The input is normalized and rounded to Q8 once (prep_q8_kernel, in vec_kernel's staged layout:
formats.stage_q8), then int8 mma products over each 32-block are scaled in float, and the blocks' min or
offset terms summed by tf32 mma products.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from numba import cuda, float32, int32, uint32

from rbees_workerd.kernels.cuda.device import (
    DEVICE,
    EXACT,
    JIT,
    SIM,
    bits_from_f32,
    copies_landed,
    copies_sent,
    copy1,
    copy4,
    f32_from_bits,
    grid_ready,
    inv_rms,
    mma_s8,
    mma_s8_k16,
    mma_tf32,
    put4,
    shared2,
    tf32_pair,
)  # fmt: skip
from rbees_workerd.kernels.cuda.formats import (
    KQUANTS,
    OFFSET,
    Q6_K,
    ROUND_Q8_1,
    WORDS,
    fetch_norm,
    group_item,
    load_scales,
    rounding,
    scales_of,
    signed_six,
    stage_q8,
)  # fmt: skip
from rbees_workerd.kernels.cuda.outputs import MODE_ROWS, last_of_split, residual, store

WARPS = 1 if SIM else 4  # warps per block of mma_kernel, one above the other
MI = 2  # a warp's rows: MI 16-row tensor-core tiles (its tokens: the block's, nj 8-token tiles)
BM = 16 * MI * WARPS  # a block's rows
KG = 4  # 32-blocks of K a block stages in shared memory at a time (half as many for the wider types: stage_groups)
THREADS = 32 * WARPS
assert BM == THREADS  # (a thread stages a row)
SCRATCH = THREADS if SIM else 1  # (the simulator's mma twins exchange the fragments through it)
PREP_THREADS = 32 if SIM else 512  # (a K of 4,096 is 512 items: one each)
TOKEN_TILES = (1, 2) if SIM else (1, 2, 4, 8)  # the 8-token tiles of an mma_kernel block: one kernel each
SLOTS = {1: 5, 2: 4, 4: 4, 8: 3}  # mma_kernel blocks of nj token tiles an SM holds at once: ptxas keeps to the
# registers that allows (96 at 5, 128 at 4, 168 at 3), spilling a few of the next stage's addresses (offline ptxas,
# sm_90: none at nj 1 and 2, up to 36 bytes at 4 and 48 at 8, by type) rather than the accumulators


def _slot_registers(nj: int) -> dict[str, int]:
    """mma_kernel's register bound for SLOTS[nj] blocks of THREADS an SM (none under the simulator)."""
    return {} if SIM else {"max_registers": 65536 // (SLOTS[nj] * THREADS) // 8 * 8}


def stage_groups(qt: int) -> int:
    """The 32-blocks of K mma_kernel stages at a time for weight type qt: two stages of the rows' and the
    tokens' words fit in the 48 KB of static shared memory (KG, or half for the types of more than 5 words)."""
    return KG if WORDS[qt] <= 5 else KG // 2


def wide_rows(qt: int, k: int) -> bool:
    """Whether every matrix row of this type and length starts 16-byte aligned (mma_kernel's wide loads)."""
    return (k // 32) * WORDS[qt] % 4 == 0


def _pitch(words: int) -> int:
    """A staged weight row's words: a multiple of 4 (16-byte stores) and an odd one (= 4 mod 8), so the 8
    rows x 4 consecutive words of a warp's fragment loads fall in 32 distinct banks."""
    p = -(-words // 4) * 4
    return p if p % 8 == 4 else p + 4


def stage_sender(qt: int, kg: int, wide: bool, bn: int, x_group: int, xp: int):  # noqa: ANN201
    """send(c, w, row_words, row, x, t0, n_tok, groups, wsh, xsh): start the copies of stage c (kg 32-blocks)
    into buffer c % 2 (copies_sent): row `row`'s words of weight type qt (this thread's; 16 bytes a copy
    where `wide`) at pitch _pitch(kg * WORDS[qt]), and the bn tokens' x_group input words a 32-block at
    pitch xp. mma_kernel's Q8 inputs take 8 words a 32-block, hmma_kernel's float16 ones 16."""
    words = WORDS[qt]
    pitch = _pitch(kg * words)
    pieces = kg * words // 4 if wide else kg * words  # copies of a row's words in a stage (16 or 4 bytes)
    per = x_group * kg // 4  # 16-byte copies of a token's words in a stage
    x_pieces = bn * per
    x_iters = -(-x_pieces // THREADS)
    w_buf, x_buf = BM * pitch, bn * xp

    @cuda.jit(**DEVICE)
    def send(c, w, row_words, row, x, t0, n_tok, groups, wsh, xsh):
        tid = cuda.threadIdx.x
        g0 = c * kg
        whole = g0 + kg <= groups  # (the whole stage lies inside K: no bounds to check)
        wb = (c % 2) * w_buf
        for u in range(pieces):  # (a thread a row: its pieces are consecutive, the next stage's too)
            if wide:
                col = g0 * words + 4 * u
                ok = whole or col < row_words
                copy4(wsh, wb + tid * pitch + 4 * u, w, row, col if ok else 0, ok)
            else:
                col = g0 * words + u
                ok = whole or col < row_words
                copy1(wsh, wb + tid * pitch + u, w, row, col if ok else 0, ok)
        xb = (c % 2) * x_buf
        for u in range(x_iters):
            p = min(tid + THREADS * u, x_pieces - 1)  # (the last piece, again, by the threads past them)
            tok = min(t0 + p // per, n_tok - 1)
            col = g0 * x_group + 4 * (p % per)
            ok = whole or col < x.shape[1]
            copy4(xsh, xb + (p // per) * xp + 4 * (p % per), x, tok, col if ok else 0, ok)
        copies_sent()

    return send


def tile_stores(nj: int, scaled: bool):  # noqa: ANN201
    """stores(acc, wsh, which, first, n, n0, n1, t0, n_tok, flags, part, count, last, xs, o0, b0, o1, b1, o2,
    b2): a block's accumulators (its warps' MI 16-row tiles by nj 8-token tiles, as mma leaves them) out
    through wsh, a warp's 32 rows x 8 tokens at a time, each lane a row: stored (outputs.store), or where
    K is split, written to part and summed by the split's last block. scaled: each token's results times
    xs[t] (hmma_kernel's token scales).

    A lane's global loads of 8 tokens (their scales, residuals, parts) come before any of its stores to
    memory, in loops that unroll: a load after a store to the same array cannot be moved above it, so a
    load and a store a token made each token wait for its load (the split's last block: 64 tokens of L2
    round trips, one after another, on every split product's tail)."""
    @cuda.jit(**DEVICE)
    def stores(acc, wsh, which, first, n, n0, n1, t0, n_tok, flags, part, count, last, xs, o0, b0, o1, b1, o2, b2):
        tid = cuda.threadIdx.x
        lane = tid % 32
        gq = lane // 4
        tq = lane % 4
        split = cuda.gridDim.z
        z = cuda.blockIdx.z
        at = (n0 if which > 0 else 0) + (n1 if which > 1 else 0)  # the matrix's first row in part
        r = first + (tid // 32) * 16 * MI + lane  # the row this lane writes, of each 8-token tile of the warp's
        ot = (tid // 32) * 32 * 8
        v = cuda.local.array(8, float32)
        for j in range(nj):  # (a loop with stores does not unroll: the accumulators are indexed in one of
            for jj in range(nj):  # its own, which does, as an index that is not constant would put them all
                if jj == j:  # in local memory)
                    for i in range(MI):
                        for q in range(4):
                            bits = bits_from_f32(acc[(i * nj + jj) * 4 + q])
                            wsh[ot + (16 * i + gq + 8 * (q // 2)) * 8 + 2 * tq + q % 2] = bits
            cuda.syncthreads()
            t8 = t0 + 8 * j
            for e in range(8):
                v[e] = f32_from_bits(wsh[ot + lane * 8 + e])
                if scaled:
                    v[e] *= xs[min(t8 + e, n_tok - 1)]
            if split > 1:
                for e in range(8):
                    if r < n and t8 + e < n_tok:
                        part[z, t8 + e, at + r] = v[e]
            else:
                _row_sums(v, which, r, n, t8, n_tok, flags, o0, b0, o1, b1, o2, b2)
            cuda.syncthreads()
        if split > 1 and last_of_split(count, split, last):  # the last block of the tile adds the parts
            for j in range(nj):
                t8 = t0 + 8 * j
                for e in range(8):
                    v[e] = float32(0.0)
                for zz in range(split):  # (in the order of z: the sum does not depend on which block came last)
                    for e in range(8):  # (8 tokens at once: a round trip a part; 64 at once took 178-254 registers)
                        v[e] += part[zz, min(t8 + e, n_tok - 1), at + min(r, n - 1)]
                _row_sums(v, which, r, n, t8, n_tok, flags, o0, b0, o1, b1, o2, b2)

    return stores


@cuda.jit(**DEVICE)
def _row_sums(v, which, r, n, t8, n_tok, flags, o0, b0, o1, b1, o2, b2):
    """A lane's results v[0 .. 7] of row r, tokens t8 .. t8 + 7, stored (outputs.store) with their residuals,
    which are all loaded first."""
    res = cuda.local.array(8, float32)
    rr = min(r, n - 1)
    for e in range(8):
        res[e] = residual(flags, which, min(t8 + e, n_tok - 1), rr, o0, o1, o2)
    for e in range(8):
        if r < n and t8 + e < n_tok:
            store(which, MODE_ROWS, flags, t8 + e, r, v[e], float32(0.0), o0, b0, o1, b1, o2, b2, res[e])


def row_scales(qt: int, kg: int):  # noqa: ANN201
    """(load, put) for stages of kg 32-blocks of weight type qt, a thread a row:
    load(c, gs, sb, row, groups, graw, sraw): stage c's raw scale fields of row `row` (load_scales; past K:
    zeros) into registers, in flight while the stage before is multiplied;
    put(graw, sraw, sv, ssh): when the stage comes, each 32-block's scale and its min or offset term (Q6_K:
    its two halves' scales) as floats into ssh at the thread's row (sv: kg * 2 floats of scratch)."""
    q8_1 = rounding(qt) == ROUND_Q8_1
    off = float32(OFFSET.get(qt, 0.0))
    halves = qt == Q6_K

    @cuda.jit(**DEVICE)
    def load(c, gs, sb, row, groups, graw, sraw):
        g0 = c * kg
        for gi in range(kg):
            g = min(g0 + gi, groups - 1)
            graw[gi], sraw[gi] = load_scales(qt, gs, sb, row, g)
            if g0 + gi >= groups:  # (the raw fields of a zero scale)
                graw[gi], sraw[gi] = uint32(0), uint32(0)

    @cuda.jit(**DEVICE)
    def put(graw, sraw, sv, ssh):
        for gi in range(kg):
            s_lo, s_hi, mn = scales_of(qt, graw[gi], sraw[gi])
            sv[2 * gi] = s_lo
            sv[2 * gi + 1] = s_hi if halves else (mn if q8_1 else s_lo * off)
        for h in range(kg // 2):
            put4(ssh, cuda.threadIdx.x * 2 * kg + 4 * h, sv[4 * h], sv[4 * h + 1], sv[4 * h + 2], sv[4 * h + 3])

    return load, put


@cuda.jit(**DEVICE)
def stage_range(groups, kg):
    """This block's stages of kg 32-blocks [first, end): its part of K's when K is split along z."""
    chunks = (groups + kg - 1) // kg
    split = cuda.gridDim.z
    z = cuda.blockIdx.z
    return (chunks * z) // split, (chunks * (z + 1)) // split


@functools.cache
def prep_q8_kernel(qt: int, gated: bool = False):  # noqa: ANN201
    """Many tokens' inputs normalized (or gated: SwiGLU of x and up, written back to x) and rounded to Q8
    once, for mma_kernel, in vec_kernel's staged layout (stage_q8, the item order of weight type qt): xw[t]
    the int8 values four a word, xd[t] and xs[t] each 32-block's scale and sum term. One block per token."""
    rnd = rounding(qt)

    @cuda.jit(**EXACT)
    def kernel(x, up, norm, nw, eps, hout, xw, xd, xs):
        scratch = cuda.shared.array(PREP_THREADS, float32)
        wv = cuda.local.array(8, float32)
        nwv = cuda.local.array(8, float32)
        t = cuda.blockIdx.x
        if norm and cuda.threadIdx.x < x.shape[1] // 8:
            fetch_norm(nw, qt, cuda.threadIdx.x, nwv)
        grid_ready()
        inv = inv_rms(x, t, x.shape[1], eps, scratch) if norm else float32(1.0)
        stage_q8(x, t, x.shape[1] // 8, inv, norm, nw, nwv, norm or gated, hout, qt, rnd, xw[t], xd[t], xs[t],
                 scratch, wv, up, gated)  # fmt: skip

    return kernel


@functools.cache
def mma_kernel(qt: int, nj: int, wide: bool):  # noqa: ANN201
    """Many tokens of Q8-rounded inputs (prep_q8_kernel) times up to three matrices of weight type qt.

    A block takes BM rows of one of the matrices and 8 nj tokens, its blocks along y those of matrix 0,
    then 1, then 2, so the weights a block reads are chosen once. It walks K by stages of kg 32-blocks
    (stage_groups): the rows' and the tokens' words of the next stage are copied into the other of two
    shared buffers (cp.async, 16 bytes a copy where `wide`) and their scales loaded into registers while
    each warp multiplies its MI 16-row tiles of this stage by every 8-token tile.
    Lane l takes item l % 4 of each 32-block: the two words group_item gives are exactly its A fragment
    (rows l // 4 and + 8 of a 16-row tile), the token's two staged input words its B fragment (token
    l // 4 of an 8-token tile); the mma sums over the items' k-order, which the weights and the inputs share
    (Q6_K, whose group halves have scales of their own: two mma over 16 columns). Each element (row, token)
    then adds d_w * d_x * dot. The min terms (Q8_1: m_w * xs) or offset terms (Q8_0: d_w * off * xs) that
    vec_kernel adds a group at a time are a stage's product of 16 rows x 4 groups by 4 groups x 8 tokens on
    the tensor cores (tf32, each side a high and a low half where it is not exact in one: within about 2^-19 of
    the float32 products), added to the same accumulators: 3 instructions where there were 16 fused multiply-adds.
    Blocks of a product with few tiles split K (plan); rows and tokens past the ends are read clamped (groups
    past K as zeros) and not written. The stores' `flags` (outputs.py) come as an argument, not compiled in:
    they steer a few branches per output, and every combination compiled apart multiplied the kernels a model
    compiles at its first start (162 s to Ready on the H100, 0.5B shape).
    """
    q8_1 = rounding(qt) == ROUND_Q8_1
    off = float32(OFFSET.get(qt, 0.0))
    halves = qt == Q6_K
    terms = q8_1 or off != 0.0  # a min or offset term (none for Q8_0, nor Q6_K: signed_six makes its values signed)
    split_w = qt in KQUANTS  # its row terms (dmin * m) need two tf32s; the others' (m, d * off) are exact in one
    words = WORDS[qt]
    kg = stage_groups(qt)
    assert kg == 4 or not terms  # (the terms of a stage: one m16n8k4 product over its 4 groups)
    xp = 8 * kg + 8  # a token's staged input words (= 8 or 24 mod 32: a warp's 8-byte fragment loads hit 32 banks)
    pitch = _pitch(kg * words)
    bn = 8 * nj
    acc_n = MI * nj * 4
    dn = -(-kg * bn // THREADS)  # (32-block, token) scale pairs a thread stages
    ep = bn if nj % 2 else bn + 8  # a group's token terms in dsh (after the scales; 4 groups x 8 tokens: 32 banks)
    # the arrays' sizes (constants of the closure: Numba folds no arithmetic on globals)
    w_size, s_size, x_size, d_size, a_size = 2 * BM * pitch, BM * kg * 2, 2 * bn * xp, kg * (bn + ep), 4 * MI
    s_row, w_buf, x_buf = 2 * kg, BM * pitch, bn * xp
    assert w_size >= WARPS * 32 * 8  # (the results leave through wsh)

    send = stage_sender(qt, kg, wide, bn, 8, xp)
    stores = tile_stores(nj, False)
    put_row_scales = row_scales(qt, kg)[1]

    @cuda.jit(**DEVICE)
    def load_stage_scales(c, gs, sb, row, xd, xs, t0, n_tok, groups, graw, sraw, draw, eraw):
        """Stage c's raw scale fields of row `row` (graw, sraw: load_scales) and this thread's (32-block, token)
        pairs of scales and sums (draw, eraw), loaded into registers: in flight while the stage before is
        multiplied, turned into floats and stored when the stage comes (mma_kernel). Past K: zeros."""
        tid = cuda.threadIdx.x
        g0 = c * kg
        for gi in range(kg):  # (row_scales' load, written out: called, it moved ptxas's uniform work on Q5_0
            g = min(g0 + gi, groups - 1)  # onto the vector pipes, +150 SEL/IMAD, offline sm_90)
            graw[gi], sraw[gi] = load_scales(qt, gs, sb, row, g)
            if g0 + gi >= groups:  # (the raw fields of a zero scale)
                graw[gi], sraw[gi] = uint32(0), uint32(0)
        for u in range(dn):
            p = tid + THREADS * u
            tok = min(t0 + p % bn, n_tok - 1)
            g = g0 + p // bn
            inside = p < kg * bn and g < groups
            draw[u] = xd[tok, min(g, groups - 1)] if inside else float32(0.0)
            if terms:
                eraw[u] = xs[tok, min(g, groups - 1)] if inside else float32(0.0)

    @cuda.jit(**JIT, **_slot_registers(nj))
    def kernel(xw, xd, xs, m0, m1, m2, n0, n1, n2, flags, part, count):
        w0, g0_, s0, o0, b0 = m0
        w1, g1, s1, o1, b1 = m1
        w2, g2, s2, o2, b2 = m2
        wsh = cuda.shared.array(w_size, uint32)  # the rows' words, two stages (one landing while one is used)
        ssh = cuda.shared.array(s_size, float32)  # each (row, 32-block): its scale, min / offset term
        xsh = cuda.shared.array(x_size, uint32)  # the tokens' input words, two stages
        dsh = cuda.shared.array(d_size, float32)  # each (32-block, token): its scale; then its sum term
        scratch = cuda.shared.array((SCRATCH, 6), uint32)
        last = cuda.shared.array(1, int32)
        acc = cuda.local.array(acc_n, float32)
        afr = cuda.local.array(a_size, uint32)
        asc = cuda.local.array(a_size, float32)
        wt = cuda.local.array(a_size, uint32)  # the warp's rows' terms of the stage as tf32s: A fragments, high and low
        sv = cuda.local.array(s_row, float32)
        graw = cuda.local.array(kg, uint32)  # the next stage's scale fields of this thread's row, in flight
        sraw = cuda.local.array(kg, uint32)
        draw = cuda.local.array(dn, float32)  # and its tokens' scales and sums
        eraw = cuda.local.array(dn, float32)
        tid = cuda.threadIdx.x
        lane = tid % 32
        gq = lane // 4
        tq = lane % 4
        n_tok = xw.shape[0]
        which, first, n = _block_rows(n0, n1, n2)
        w, gs, sb = (w0, g0_, s0) if which == 0 else ((w1, g1, s1) if which == 1 else (w2, g2, s2))
        wr = (tid // 32) * 16 * MI  # the warp's first row in the block
        t0 = cuda.blockIdx.x * bn
        groups = xd.shape[1]
        row_words = w.shape[1]
        row = min(first + tid, n - 1)  # the row whose words and scales this thread stages (BM == THREADS)
        for i in range(acc_n):
            acc[i] = 0.0
        grid_ready()
        c_first, c_end = stage_range(groups, kg)
        if c_first < c_end:  # stage c_first: its copies sent, its scales loaded
            send(c_first, w, row_words, row, xw, t0, n_tok, groups, wsh, xsh)
            load_stage_scales(c_first, gs, sb, row, xd, xs, t0, n_tok, groups, graw, sraw, draw, eraw)
        for c in range(c_first, c_end):
            put_row_scales(graw, sraw, sv, ssh)  # the stage's scales, into shared memory (its words are on their way)
            for u in range(dn):
                p = tid + THREADS * u
                if p < kg * bn:
                    dsh[p] = draw[u]
                    if terms:
                        dsh[kg * bn + (p // bn) * ep + p % bn] = eraw[u]
            if c + 1 < c_end:  # the next stage: copies sent, scales loaded, all while this one is multiplied
                send(c + 1, w, row_words, row, xw, t0, n_tok, groups, wsh, xsh)
                load_stage_scales(c + 1, gs, sb, row, xd, xs, t0, n_tok, groups, graw, sraw, draw, eraw)
            else:
                copies_sent()  # (an empty group: copies_landed waits for all but the newest)
            copies_landed()
            cuda.syncthreads()
            wb = (c % 2) * w_buf
            xb = (c % 2) * x_buf
            if terms:  # the stage's min or offset terms, sum over its 4 groups of m_w * s_x: 16 x 8 x 4 tf32 products
                for i in range(MI):  # (high and low halves: the float32 products to about 2^-19)
                    for h in range(2):
                        r = wr + 16 * i + gq + 8 * h
                        wt[4 * i + h], wt[4 * i + 2 + h] = tf32_pair(ssh[2 * (r * kg + tq) + 1])
                for j in range(nj):
                    th, tl = tf32_pair(dsh[kg * bn + tq * ep + 8 * j + gq])
                    for i in range(MI):
                        k = (i * nj + j) * 4
                        acc[k], acc[k + 1], acc[k + 2], acc[k + 3] = mma_tf32(
                            wt[4 * i], wt[4 * i + 1], th, acc[k], acc[k + 1], acc[k + 2], acc[k + 3], scratch)
                        acc[k], acc[k + 1], acc[k + 2], acc[k + 3] = mma_tf32(
                            wt[4 * i], wt[4 * i + 1], tl, acc[k], acc[k + 1], acc[k + 2], acc[k + 3], scratch)
                        if split_w:
                            acc[k], acc[k + 1], acc[k + 2], acc[k + 3] = mma_tf32(
                                wt[4 * i + 2], wt[4 * i + 3], th, acc[k], acc[k + 1], acc[k + 2], acc[k + 3], scratch)
            for gi in range(kg):
                for i in range(MI):  # the warp's A fragments and their rows' scales
                    for h in range(2):
                        r = wr + 16 * i + gq + 8 * h
                        lo, hi = group_item(qt, wsh, wb + r * pitch + gi * words, tq)
                        afr[4 * i + h] = signed_six(lo) if halves else lo
                        afr[4 * i + 2 + h] = signed_six(hi) if halves else hi
                        asc[4 * i + 2 * h], asc[4 * i + 2 * h + 1] = shared2(ssh, 2 * (r * kg + gi))
                for j in range(nj):
                    bw0, bw1 = shared2(xsh, xb + (8 * j + gq) * xp + 8 * gi + 2 * tq)
                    d0, d1 = shared2(dsh, gi * bn + 8 * j + 2 * tq)
                    for i in range(MI):
                        k = (i * nj + j) * 4
                        sa, ea, sb_, eb = asc[4 * i], asc[4 * i + 1], asc[4 * i + 2], asc[4 * i + 3]
                        if halves:  # (ea, eb: the scales of the rows' second halves)
                            c0, c1, c2, c3 = mma_s8_k16(afr[4 * i], afr[4 * i + 1], bw0, scratch)
                            h0, h1, h2, h3 = mma_s8_k16(afr[4 * i + 2], afr[4 * i + 3], bw1, scratch)
                            acc[k] += d0 * (sa * float32(c0) + ea * float32(h0))
                            acc[k + 1] += d1 * (sa * float32(c1) + ea * float32(h1))
                            acc[k + 2] += d0 * (sb_ * float32(c2) + eb * float32(h2))
                            acc[k + 3] += d1 * (sb_ * float32(c3) + eb * float32(h3))
                        else:
                            c0, c1, c2, c3 = mma_s8(afr[4 * i], afr[4 * i + 1], afr[4 * i + 2], afr[4 * i + 3],
                                                    bw0, bw1, scratch)  # fmt: skip
                            for q, v, s_w in ((0, c0, sa), (1, c1, sa), (2, c2, sb_), (3, c3, sb_)):
                                acc[k + q] += (s_w * (d0 if q % 2 == 0 else d1)) * float32(v)
            cuda.syncthreads()
        stores(acc, wsh, which, first, n, n0, n1, t0, n_tok, flags, part, count, last, xd, o0, b0, o1, b1, o2, b2)

    return kernel


PART_BYTES = 64 << 20  # a split product's partial sums take at most this much memory
# plan's cost model, in a warp's issue slots, fitted to bench/mma_plan.py's sweep of 42 products of the 8B and
# 0.5B shapes on the H100 (docs/benchmarks.md): its choices take 2.3% more time than the best plan of each
_STAGING = 300  # a stage's copies, scales and A fragments, per 32-block
_TILE = 20  # the mma of a 32-block and an 8-token tile, and their float scaling
_BLOCK = 12000  # a block's start (the first stage in flight) and end (its stores)
_REDUCE = 500  # the split's last block adding the parts: per part and 8-token tile


def cheapest_plan(
    t_count: int, row_tiles: int, chunks: int, sms: int, token_tiles: tuple[int, ...], slots: Mapping[int, int],
    walk: Callable[[int, int], float], reduce: float,
) -> tuple[int, int]:
    """The cheapest (nj, split) of a tensor-core product (mma.plan's and hmma.plan's model): nj of token_tiles
    8-token tiles a block, K's `chunks` stages in `split` parts; a product costs its waves of slots[nj]
    blocks an SM times a block's walk(nj, split), plus reduce a part and token tile that the split's last
    block pays for adding the parts. A product of two waves of whole-K blocks or more is not split: its last
    wave is at most a third of it, and the parts' sums would cross memory; nor where the parts' sums would
    exceed PART_BYTES. Ties go to the fewer parts."""
    rows = BM * row_tiles

    def tiles(nj: int) -> int:
        return -(-t_count // (8 * nj)) * row_tiles

    def cost(nj: int, split: int) -> float:
        waves = -(-tiles(nj) * split // (slots[nj] * sms))
        return waves * walk(nj, split) + (reduce * split * nj if split > 1 else 0)

    def fits(nj: int, split: int) -> bool:
        return split == 1 or (tiles(nj) < 2 * slots[nj] * sms and split * t_count * rows * 4 <= PART_BYTES)

    plans = [(nj, split) for nj in token_tiles for split in range(1, chunks + 1) if fits(nj, split)]
    return min(plans, key=lambda p: (cost(*p), p[1]))


@functools.cache  # (a step not captured in a graph plans each of its products)
def plan(t_count: int, row_tiles: int, k: int, qt: int, sms: int) -> tuple[int, int]:
    """(nj, split): mma_kernel's 8-token tiles a block and parts of K for a product of t_count tokens,
    row_tiles tiles of BM rows of k elements of type qt, on a GPU of `sms` multiprocessors (cheapest_plan).

    The kernel is bound by its warps' latencies, not by issue slots: a block takes about as long with
    two others on its SM as alone, so a product costs its waves of SLOTS[nj] blocks an SM times a block's
    instructions. More token tiles a block share the staging; more parts of K make more blocks of
    shorter walks, which the split's last block pays for adding the parts."""
    kg = stage_groups(qt)
    chunks = -(-(k // 32) // kg)

    def walk(nj: int, split: int) -> float:
        return _BLOCK + -(-chunks // split) * kg * (_STAGING + _TILE * nj)

    return cheapest_plan(t_count, row_tiles, chunks, sms, TOKEN_TILES, SLOTS, walk, _REDUCE)


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
