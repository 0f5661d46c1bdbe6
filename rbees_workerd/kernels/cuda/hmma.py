"""The product of many tokens of a quantized weight type on the float16 tensor cores: hmma_kernel.

The way Marlin multiplies 4-bit weights: the input is normalized, scaled by a power of two per token
(token_scale: float16 holds up to 65,504) and rounded to float16 once (prep_f16_kernel, in the item order of
formats.stage_q8); each weight is made a float16 in registers as s * q + c (its group's scale and min or
offset term, formats.scales_of) from its bits, and mma m16n8k16 float16 products sum into float32
accumulators. Against mma_kernel's int8 products: no I2F, FMUL and FFMA per element and 32-block, no token
scales, about 100 instructions a 32-block and warp instead of 310; the price is each weight rounded to float16
(2^-11) and the input to float16 (11 bits, where Q8 keeps 8). Its blocks take 4 or 8 token tiles (plan);
below MIN_TOKENS, mma_kernel's smaller tiles still fill the GPU better on the 0.5B shape.
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
    bits_from_f32,
    copies_landed,
    copies_sent,
    dequant_f16x2,
    f32_from_bits,
    grid_ready,
    mma_f16,
    pack_f16,
    shared2,
    shared4,
    silu_mul,
    warp_max,
    warp_sum,
)  # fmt: skip
from rbees_workerd.kernels.cuda.formats import (
    Q6_K,
    Q8_0,
    WORDS,
    group_item,
    item_col,
    signed_six,
)  # fmt: skip
from rbees_workerd.kernels.cuda.mma import (
    BM,
    MI,
    PREP_THREADS,
    SCRATCH,
    TOKEN_TILES,
    WARPS,
    _block_rows,
    _pitch,
    cheapest_plan,
    row_scales,
    stage_range,
    stage_sender,
    tile_stores,
)  # fmt: skip

PREP_WARPS = PREP_THREADS // 32  # (prep_f16_kernel's exchange between its warps)
KG = 2  # 32-blocks a stage: the tokens' float16 words take twice the shared memory of Q8's
NJ = TOKEN_TILES[-1]  # the most 8-token tiles a block (the simulator's largest: 2); plan also takes half
SLOTS = 2  # hmma_kernel blocks an SM holds (ptxas takes 157-204 registers; bounded to 128 the products were
# 4-19% slower on the H100: docs/benchmarks.md, 2026-12-06, tenth session)
# Products of this many tokens or more take hmma_kernel: past the 64 tokens of mma_kernel's largest blocks.
# H100, 8B shape: at 512 tokens this kernel wins every product (a 512-token prefill +19% tokens/s); from 33
# tokens it gave the 8B's 64 streams +5.4% but the 0.5B's -41% (plan's few blocks for its K = 896).
MIN_TOKENS = 65
# Large products (LARGE rows and K or more: the 8B's but v alone) take it from LARGE_MIN_TOKENS. H100, 8B shape,
# 64 streams: +5.4% with every product on it from 33 tokens (tenth session), +4.6% with those of K >= 4,096 (the
# same call as the 0.5B's 64 streams -12.5% with its ffn_down, 896 x 4,864, on it: 2026-12-07). One at a time
# (tenth session), the 8B's products at 64 tokens were all faster on it but v alone (1,024 rows: 40.5 against
# 39.2 us).
LARGE = 4096
LARGE_MIN_TOKENS = 33
# ptxas's register bound for hmma_kernel (None: its own choice; bench/mma_plan.py --hmma-registers sweeps others)
REGISTERS: int | None = None
# plan's cost model, in units of a 32-block of one token tile, fitted to bench/mma_plan.py's sweep of the 8B's
# products at 64 and 512 tokens on the H100 (2026-12-06, tenth session): its choices take 0.9% more time than
# the best plan of each
_BLOCK = 400  # a block's start and stores
_STAGE = 4  # a stage's copies, scales and barriers
_REDUCE = 2  # a part of K, a token tile: the split's last block adds it


def takes(t_count: int, rows: int, k: int) -> bool:
    """Whether a product of t_count tokens, `rows` rows (its launch's matrices together) and inputs of length k
    takes hmma_kernel (else mma_kernel)."""
    large = rows >= LARGE and k >= LARGE
    return t_count >= (min(MIN_TOKENS, LARGE_MIN_TOKENS) if large else MIN_TOKENS)


@functools.cache  # (a step not captured in a graph plans each of its products)
def plan(t_count: int, row_tiles: int, k: int, qt: int, sms: int) -> tuple[int, int]:
    """(nj, split) for hmma_kernel: NJ or NJ / 2 token tiles a block and K in `split` parts, the cheapest
    by mma.plan's model (mma.cheapest_plan) with SLOTS blocks an SM and this kernel's constants. More token
    tiles share each weight's conversion; fewer make more blocks, which a 64-token step's products of few
    rows need (H100: o at 64 tokens 42 us with 4 tiles and K in 4 parts, 53 with 8)."""
    chunks = -(-(k // 32) // KG)

    def walk(nj: int, split: int) -> float:
        return _BLOCK + -(-chunks // split) * (_STAGE + nj)

    return cheapest_plan(t_count, row_tiles, chunks, sms, (NJ // 2, NJ), dict.fromkeys((NJ // 2, NJ), SLOTS), walk,
                         _REDUCE)  # fmt: skip


@cuda.jit(**DEVICE)
def token_scale(amax):
    """(up, down): powers of two that bring a token's largest input magnitude amax into [2^14, 2^15) and back
    (float16 holds up to 65,504; a power of two scales exactly)."""
    e = int32((bits_from_f32(amax) >> uint32(23)) & uint32(255))
    s = min(max(int32(268) - e, int32(1)), int32(253))  # the biased exponent of 2^(14 - (e - 127))
    return f32_from_bits(uint32(s) << uint32(23)), f32_from_bits(uint32(254 - s) << uint32(23))


@functools.cache
def prep_f16_kernel(qt: int, gated: bool = False, per: int = 1):  # noqa: ANN201
    """Many tokens' inputs normalized (or gated: SwiGLU of x and up, written back to x), scaled by a power of
    two (token_scale) and rounded to float16 once for hmma_kernel, in formats.stage_q8's item order (item i's
    8 values, elem(qt, i % 4, 0 .. 7) of its 32-block, in words 4 i .. 4 i + 3); xs[t] the scale back.

    One block per token, `per` items a thread (K / 8 / PREP_THREADS, rounded up), held in registers from
    their one load to the stores: one memory round trip and one exchange between the warps, which sums the
    squares and takes the largest |x * w| together (inv > 0 then scales that to the largest input). Three
    passes over the row, each with its own round trips and a barrier a halving, took 12-15 us a token row
    of the 8B shape (H100, 2026-12-07)."""

    @cuda.jit(**EXACT)
    def kernel(x, up, norm, nw, eps, hout, xh, xs):
        scratch = cuda.shared.array(PREP_THREADS, float32)
        sums = cuda.shared.array(PREP_WARPS, float32)
        peaks = cuda.shared.array(PREP_WARPS, float32)
        xv = cuda.local.array((per, 8), float32)
        wv = cuda.local.array((per, 8), float32)  # the norm's weights, or where gated the up product
        t = uint32(cuda.blockIdx.x)
        tid = cuda.threadIdx.x
        k = x.shape[1]
        items = k // 8
        for u in range(per):
            it = tid + cuda.blockDim.x * u
            if norm and it < items:
                for j in range(8):
                    wv[u, j] = nw[item_col(qt, it, j)]
        grid_ready()
        for u in range(per):  # (no stores among the loads: they go out together)
            it = tid + cuda.blockDim.x * u
            if it < items:
                for j in range(8):
                    c = item_col(qt, it, j)
                    xv[u, j] = x[t, c]
                    if gated:
                        wv[u, j] = up[t, c]
        ss = float32(0.0)
        peak = float32(0.0)
        for u in range(per):
            it = tid + cuda.blockDim.x * u
            if it < items:
                for j in range(8):
                    v = xv[u, j]
                    if gated:
                        v = silu_mul(v, wv[u, j])
                        x[t, item_col(qt, it, j)] = v
                        xv[u, j] = v
                    ss += v * v
                    peak = max(peak, abs(v * wv[u, j]) if norm else abs(v))
        ss = warp_sum(ss, scratch)
        peak = warp_max(peak, scratch)
        if tid % 32 == 0:
            sums[tid // 32] = ss
            peaks[tid // 32] = peak
        cuda.syncthreads()
        ss = sums[0]
        peak = peaks[0]
        for i in range(1, cuda.blockDim.x // 32):  # (every thread in the same order: the same sum)
            ss += sums[i]
            peak = max(peak, peaks[i])
        inv = float32(1.0 / math.sqrt(ss / k + eps)) if norm else float32(1.0)
        scale, back = token_scale(peak * inv)
        if tid == 0:
            xs[t] = back
        for u in range(per):
            it = tid + cuda.blockDim.x * u
            if it < items:
                if norm:
                    for j in range(8):
                        xv[u, j] = xv[u, j] * inv * wv[u, j]
                        hout[t, item_col(qt, it, j)] = xv[u, j]
                for m in range(4):
                    xh[t, uint32(4 * it + m)] = pack_f16(xv[u, 2 * m] * scale, xv[u, 2 * m + 1] * scale)

    return kernel


@cuda.jit(**DEVICE)
def _halves(word, signed, s2, c2):
    """The four byte values of word (signed or not) times s plus c as two words of float16 pairs (s2, c2: s
    and c in both halves): each byte made the float16 1024 + byte by its bits (signed: 1152 + byte), then
    (h - 1024) * s + c in float16 arithmetic."""
    if signed:
        word ^= uint32(0x80808080)
    m = uint32(0x64806480) if signed else uint32(0x64006400)
    lo = (word & uint32(0xFF)) | ((word & uint32(0xFF00)) << uint32(8)) | uint32(0x64006400)
    hi = ((word >> uint32(16)) & uint32(0xFF)) | ((word >> uint32(8)) & uint32(0xFF0000)) | uint32(0x64006400)
    return dequant_f16x2(lo, m, s2, c2), dequant_f16x2(hi, m, s2, c2)


@functools.cache
def hmma_kernel(qt: int, nj: int, wide: bool):  # noqa: ANN201
    """Many tokens of float16 inputs (prep_f16_kernel) times up to three matrices of weight type qt: the
    blocks, stages, copies and stores of mma.mma_kernel, with float16 fragments. Lane l makes the A
    fragments of its rows from item l % 4 of each 32-block (group_item's two words: elements 0-3 and 4-7 of
    the item, as the k columns 2 (l % 4), + 1, + 8, + 9 of two 16-column products) and loads its token's four
    input words of the same item as the B fragments of both."""
    halves = qt == Q6_K
    signed = halves or qt == Q8_0
    words = WORDS[qt]
    kg = KG
    wide = wide and kg * words % 4 == 0  # (16-byte copies of a stage's row words: Q5_x's 10 words take single ones)
    # a token's staged input words in a stage, a pitch of 16 mod 32: the 16-byte fragment loads of a quarter
    # warp (two tokens, four items each) then fall in all 32 banks (8 mod 32 cost 5% at 512 tokens, H100)
    xp = 16 * kg + (16 - 16 * kg) % 32
    pitch = _pitch(kg * words)
    bn = 8 * nj
    acc_n = MI * nj * 4
    w_size, s_size, x_size, a_size = 2 * BM * pitch, BM * kg * 2, 2 * bn * xp, 8 * MI
    s_row, w_buf, x_buf = 2 * kg, BM * pitch, bn * xp
    assert w_size >= WARPS * 32 * 8  # (the results leave through wsh)

    send = stage_sender(qt, kg, wide, bn, 16, xp)
    stores = tile_stores(nj, True)
    load_row_scales, put_row_scales = row_scales(qt, kg)

    @cuda.jit(**DEVICE)
    def group(gi, wsh, ssh, xsh, wb, xb, wr, gq, tq, afr, acc, scratch):
        """32-block gi of the stage in buffers wb, xb: the warp's A fragments made from it, then its mma."""
        for i in range(MI):  # the warp's A fragments: two 16-column tiles (the item's lo and hi words)
            for h in range(2):
                r = wr + 16 * i + gq + 8 * h
                lo, hi = group_item(qt, wsh, wb + r * pitch + gi * words, tq)
                s_a, s_b = shared2(ssh, 2 * (r * kg + gi))
                p_a = pack_f16(s_a, s_a)
                p_b = pack_f16(s_b, s_b)
                if halves:
                    afr[8 * i + h], afr[8 * i + 2 + h] = _halves(signed_six(lo), True, p_a, uint32(0))
                    afr[8 * i + 4 + h], afr[8 * i + 6 + h] = _halves(signed_six(hi), True, p_b, uint32(0))
                else:
                    afr[8 * i + h], afr[8 * i + 2 + h] = _halves(lo, signed, p_a, p_b)
                    afr[8 * i + 4 + h], afr[8 * i + 6 + h] = _halves(hi, signed, p_a, p_b)
        for j in range(nj):
            x0, x1, x2, x3 = shared4(xsh, xb + (8 * j + gq) * xp + 16 * gi + 4 * tq)
            for i in range(MI):
                k = (i * nj + j) * 4
                acc[k], acc[k + 1], acc[k + 2], acc[k + 3] = mma_f16(
                    afr[8 * i], afr[8 * i + 1], afr[8 * i + 2], afr[8 * i + 3], x0, x1,
                    acc[k], acc[k + 1], acc[k + 2], acc[k + 3], scratch)  # fmt: skip
                acc[k], acc[k + 1], acc[k + 2], acc[k + 3] = mma_f16(
                    afr[8 * i + 4], afr[8 * i + 5], afr[8 * i + 6], afr[8 * i + 7], x2, x3,
                    acc[k], acc[k + 1], acc[k + 2], acc[k + 3], scratch)  # fmt: skip

    @cuda.jit(**JIT, **({} if SIM or REGISTERS is None else {"max_registers": REGISTERS}))
    def kernel(xh, xs, m0, m1, m2, n0, n1, n2, flags, part, count):
        w0, g0_, s0, o0, b0 = m0
        w1, g1, s1, o1, b1 = m1
        w2, g2, s2, o2, b2 = m2
        wsh = cuda.shared.array(w_size, uint32)
        ssh = cuda.shared.array(s_size, float32)  # each (row, 32-block): its scale and its term (Q6_K: two scales)
        xsh = cuda.shared.array(x_size, uint32)
        scratch = cuda.shared.array((SCRATCH, 6), uint32)
        last = cuda.shared.array(1, int32)
        acc = cuda.local.array(acc_n, float32)
        afr = cuda.local.array(a_size, uint32)
        sv = cuda.local.array(s_row, float32)
        graw = cuda.local.array(kg, uint32)
        sraw = cuda.local.array(kg, uint32)
        tid = cuda.threadIdx.x
        lane = tid % 32
        gq = lane // 4
        tq = lane % 4
        n_tok = xh.shape[0]
        which, first, n = _block_rows(n0, n1, n2)
        w, gs, sb = (w0, g0_, s0) if which == 0 else ((w1, g1, s1) if which == 1 else (w2, g2, s2))
        wr = (tid // 32) * 16 * MI
        t0 = cuda.blockIdx.x * bn
        groups = xh.shape[1] // 16
        row_words = w.shape[1]
        row = min(first + tid, n - 1)
        for i in range(acc_n):
            acc[i] = 0.0
        grid_ready()
        c_first, c_end = stage_range(groups, kg)
        if c_first < c_end:
            send(c_first, w, row_words, row, xh, t0, n_tok, groups, wsh, xsh)
            load_row_scales(c_first, gs, sb, row, groups, graw, sraw)
        for c in range(c_first, c_end):
            put_row_scales(graw, sraw, sv, ssh)
            if c + 1 < c_end:
                send(c + 1, w, row_words, row, xh, t0, n_tok, groups, wsh, xsh)
                load_row_scales(c + 1, gs, sb, row, groups, graw, sraw)
            else:
                copies_sent()
            copies_landed()
            cuda.syncthreads()
            wb = (c % 2) * w_buf
            xb = (c % 2) * x_buf
            for gi in range(kg):
                group(gi, wsh, ssh, xsh, wb, xb, wr, gq, tq, afr, acc, scratch)
            cuda.syncthreads()
        stores(acc, wsh, which, first, n, n0, n1, t0, n_tok, flags, part, count, last, xs, o0, b0, o1, b1, o2, b2)

    return kernel
