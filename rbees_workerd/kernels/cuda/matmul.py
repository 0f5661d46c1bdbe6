"""Quantized matrix products and embedding lookups on the device layout of `repack`.

A row group of 32 weights is read as four items of 8 weights; the 32 lanes of a
warp take consecutive items of one output row (coalesced 16-byte spans of the
packed words), dequantize them in registers and reduce across the warp. A warp
keeps TB tokens' accumulators, so a weight item read once serves TB tokens
(prefill and batched decode); a row's warp also serves the fused forms:
several matrices sharing an input (q, k, v), gate and up with SwiGLU, and the
residual add after a projection.
"""

from __future__ import annotations

import math

from numba import cuda, float32, int32

from rbees_workerd.kernels.cuda.device import (
    DEVICE,
    EXACT,
    JIT,
    SIM,
    f32_from_bits,
    fp16_round,
    half_bits_to_f32,
    rint,
    warp_sum,
)  # fmt: skip
from rbees_workerd.kernels.cuda.repack import BF16, F16, NIB4, NIB5, Q6, Q8

TB = 4  # tokens per warp
WARPS = 1 if SIM else 4  # rows per block (one warp per block in the slow simulator)
BLOCK = 32 * WARPS
MODE_ROWS, MODE_SWIGLU = 0, 1


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
        w = words[row, base + q]
        hb = words[row, g * 5] if fmt == NIB5 else 0
        scale = d[row, g]
        mn = m[row, g] if with_min else float32(0.0)
        for j in range(8):
            sh = 8 * j if j < 4 else 8 * (j - 4) + 4
            v = (w >> sh) & 15
            if fmt == NIB5:
                e = 4 * q + j if j < 4 else 12 + 4 * q + j
                v |= ((hb >> e) & 1) << 4
            wv[j] = (float32(v) + off) * scale + mn
    elif fmt == Q6:
        w = words[row, g * 6 + q]
        lo = words[row, g * 6 + 4]
        hi = words[row, g * 6 + 5]
        d0 = d[row, 2 * g]
        d1 = d[row, 2 * g + 1]
        for j in range(8):
            if j < 4:
                v = ((w >> (8 * j)) & 15) | (((lo >> (2 * (4 * q + j))) & 3) << 4)
                wv[j] = float32(float32(v) - 32.0) * d0
            else:
                v = ((w >> (8 * (j - 4) + 4)) & 15) | (((hi >> (2 * (4 * q + j - 4))) & 3) << 4)
                wv[j] = float32(float32(v) - 32.0) * d1
    elif fmt == Q8:
        scale = d[row, g]
        for half in range(2):
            w = words[row, g * 8 + 2 * q + half]
            for b in range(4):
                v = int32((w >> (8 * b)) & 255)  # signed arithmetic (the simulator keeps uint32)
                wv[4 * half + b] = float32(v - 256 if v >= 128 else v) * scale
    elif F16 <= fmt <= BF16:
        for i in range(4):
            w = words[row, g * 16 + 4 * q + i]
            if fmt == F16:
                wv[2 * i] = half_bits_to_f32(w & 0xFFFF)
                wv[2 * i + 1] = half_bits_to_f32(w >> 16)
            else:
                wv[2 * i] = f32_from_bits((w & 0xFFFF) << 16)
                wv[2 * i + 1] = f32_from_bits(w & 0xFFFF0000)
    else:  # F32
        for j in range(8):
            wv[j] = f32_from_bits(words[row, g * 32 + 8 * q + j])


@cuda.jit(**DEVICE)
def _dot_tokens(x, t0, n_tok, col, fmt, q, wv, acc, norm, inv, nw):
    """acc[tt] += sum_j wv[j] * in[t0 + tt, col + elem(j)]; in = x, or rmsnorm(x) when norm."""
    for tt in range(TB):
        t = t0 + tt
        if t < n_tok:
            s = float32(0.0)
            for j in range(8):
                c = col + elem(fmt, q, j)
                s += wv[j] * (x[t, c] * inv[tt] * nw[c] if norm else x[t, c])
            acc[tt] += s


@cuda.jit(**DEVICE)
def _add_min(mn, msum, t0, n_tok, g, acc):
    for tt in range(TB):
        if t0 + tt < n_tok:
            acc[tt] += mn * msum[t0 + tt, g]


@cuda.jit(**JIT)
def matmul_kernel(x, w0, d0, m0, o0, b0, w1, d1, m1, o1, b1, w2, d2, m2, o2, b2,
                  n0, n1, n2, fmt, off, mode, flags, res, nw, eps, hout, msum):  # fmt: skip
    """out_i[T, N_i] = x[T, K] @ W_i.T (+ b_i) for up to three matrices of one format.

    MODE_ROWS: the warp's row indexes the matrices' rows one after another.
    MODE_SWIGLU: row r of matrices 0 and 1; o2 = silu(o0) * o1.
    flags: bit i = matrix i has a bias; bit 3 = res += o0 (the residual add);
    bit 4 = the input is rmsnorm(x) * nw, which block 0 also writes to hout;
    bit 5 = the input was rounded to Q8_1: a group's min term is m * msum[t, group].
    """
    scratch = cuda.shared.array(BLOCK, float32)
    wv = cuda.local.array(8, float32)
    acc_a = cuda.local.array(TB, float32)
    acc_b = cuda.local.array(TB, float32)
    lane = cuda.threadIdx.x % 32
    row = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32
    t0 = cuda.blockIdx.y * TB
    n_tok = x.shape[0]
    items = (x.shape[1] // 32) * 4
    inv = cuda.local.array(TB, float32)
    norm = (flags & 16) != 0
    for tt in range(TB):
        acc_a[tt] = 0.0
        acc_b[tt] = 0.0
        inv[tt] = 1.0
        t = t0 + tt
        if norm and t < n_tok:  # every warp computes its tokens' norms (K is small next to N * K)
            ss = float32(0.0)
            for i in range(lane, x.shape[1], 32):
                ss += x[t, i] * x[t, i]
            ss = warp_sum(ss, scratch)
            inv[tt] = float32(1.0 / math.sqrt(ss / x.shape[1] + eps))
            if cuda.blockIdx.x == 0 and cuda.threadIdx.x < 32:
                for i in range(lane, x.shape[1], 32):
                    hout[t, i] = x[t, i] * inv[tt] * nw[i]
    which = 0
    r = row
    total = n0 if mode == MODE_SWIGLU else n0 + n1 + n2
    if mode == MODE_ROWS and r >= n0:
        r -= n0
        which = 1
        if r >= n1:
            r -= n1
            which = 2
    # one decode call site per matrix role: each inlined copy of decode is large
    w, d, m = (w0, d0, m0) if which == 0 else ((w1, d1, m1) if which == 1 else (w2, d2, m2))
    q8_1 = (flags & 32) != 0
    if row < total:
        for it in range(lane, items, 32):
            g = it // 4
            q = it % 4
            decode(w, d, m, fmt, off, r, g, q, wv, not q8_1)
            _dot_tokens(x, t0, n_tok, g * 32, fmt, q, wv, acc_a, norm, inv, nw)
            if q8_1 and q == 0:
                _add_min(m[r, g], msum, t0, n_tok, g, acc_a)
            if mode == MODE_SWIGLU:
                decode(w1, d1, m1, fmt, off, r, g, q, wv, not q8_1)
                _dot_tokens(x, t0, n_tok, g * 32, fmt, q, wv, acc_b, norm, inv, nw)
                if q8_1 and q == 0:
                    _add_min(m1[r, g], msum, t0, n_tok, g, acc_b)
    for tt in range(TB):
        t = t0 + tt
        if t >= n_tok:  # the same for the whole block: the reductions below stay uniform
            break
        a = warp_sum(acc_a[tt], scratch)
        b = warp_sum(acc_b[tt], scratch) if mode == MODE_SWIGLU else float32(0.0)
        if lane == 0 and row < total:
            if which == 0:
                if flags & 1:
                    a += b0[r]
                o0[t, r] = a
                if flags & 8:
                    res[t, r] += a
                if mode == MODE_SWIGLU:
                    if flags & 2:
                        b += b1[r]
                    o1[t, r] = b
                    o2[t, r] = a / (float32(1.0) + math.exp(-a)) * b
            elif which == 1:
                o1[t, r] = a + b1[r] if flags & 2 else a
            else:
                o2[t, r] = a + b2[r] if flags & 4 else a


@cuda.jit(**JIT)
def embed_kernel(words, d, m, fmt, off, tokens, out):
    """out[t, :] = dequantized row tokens[t]; grid (T, ceil(items / blockDim))."""
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
GEMM_MIN_TOKENS = 16  # below this the warp-per-row kernel wins (decode)


@cuda.jit(**JIT)
def gemm_kernel(x, w0, d0, m0, o0, b0, w1, d1, m1, o1, b1, w2, d2, m2, o2, b2,
                n0, n1, n2, fmt, off, flags, res, msum):  # fmt: skip
    """Tiled form of matmul_kernel's MODE_ROWS for many tokens: a BM x BN output tile per block.

    Each step dequantizes a BM-row x 32 weight tile and a 32 x BN-token slice of x
    into shared memory; every weight is decoded once per BN tokens.
    """
    ws = cuda.shared.array((32, PAD_M), float32)
    xs = cuda.shared.array((32, PAD_N), float32)
    ms = cuda.shared.array(BM, float32)  # Q8_1 inputs: the tile rows' mins and the tokens' block sums
    ss = cuda.shared.array(BN, float32)
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
    for g in range(x.shape[1] // 32):
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
    for i in range(4):
        row = r0 + ty * 4 + i
        if row < total:
            for j in range(4):
                t = t0 + tx * 4 + j
                if t < n_tok:
                    v = acc[4 * i + j]
                    if row < n0:
                        if flags & 1:
                            v += b0[row]
                        o0[t, row] = v
                        if flags & 8:
                            res[t, row] += v
                    elif row < n0 + n1:
                        o1[t, row - n0] = v + b1[row - n0] if flags & 2 else v
                    else:
                        o2[t, row - n0 - n1] = v + b2[row - n0 - n1] if flags & 4 else v


@cuda.jit(**EXACT)
def round_q8_kernel(x, with_sum, xq, msum):
    """xq = x rounded through llama.cpp's Q8_0 (or Q8_1) blocks, as the CPU backend's quant_act does.

    Per 32-block: d = amax / 127 stored as fp16, q = rint(x * 127 / amax), xq = q * d;
    with_sum: msum[t, block] = fp16(d * sum(q)), the term Q4_1/Q5_1 mins multiply.
    """
    i = cuda.grid(1)
    nb = x.shape[1] // 32
    if i >= x.shape[0] * nb:
        return
    t = i // nb
    b = i % nb
    amax = float32(0.0)
    for j in range(32):
        amax = max(amax, abs(x[t, b * 32 + j]))
    d = amax / float32(127.0)
    inv = float32(127.0) / amax if amax != 0 else float32(0.0)
    dh = fp16_round(d)
    s = int32(0)
    for j in range(32):
        q = rint(x[t, b * 32 + j] * inv)
        xq[t, b * 32 + j] = q * dh
        s += int32(q)
    msum[t, b] = fp16_round(d * float32(s)) if with_sum else float32(0.0)


@cuda.jit(**EXACT)
def round_f16_kernel(x, xq):
    """xq = x rounded to float16 (llama.cpp's activations for F16 weights)."""
    t, i = cuda.grid(2)
    if t < x.shape[0] and i < x.shape[1]:
        xq[t, i] = fp16_round(x[t, i])
