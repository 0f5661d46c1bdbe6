"""Numba kernels for quantized matrix products in the layout of `quant_pack`.

Why they are shaped this way (measured on AVX-512 Xeon/EPYC, numba 0.68):

* The vectorized loop is always the innermost loop over the 64 rows of a chunk
  (`for r in range(C)`), a plain contiguous map (`part[r] += q[r] * x_j`), so LLVM's
  loop vectorizer turns it into zmm code (16 lanes x 4 interleaved = 64 rows per
  iteration). Row-wise dot products with per-block scales were measured to stay
  scalar or to pay a horizontal reduction per block.
* Every array is indexed by loop variables only (multi-dimensional indices), so
  Numba's negative-index wraparound selects fold away.
* Functions are compiled with `noalias` argument pointers (`_NoAliasCompiler`):
  without it LLVM must assume the scratch stores may alias the weight loads and
  keeps everything scalar. Callers never pass overlapping arrays that are written
  (the same read-only array twice is fine).
* Integer values are truncated back to uint8/int8 before the int->float convert,
  otherwise Numba's int64 promotion turns every convert into a 64-bit one.
* Weight chunks are reused across tiles of 4 tokens (prefill) while they sit in
  L1/L2; decode (T=1) takes a 1-token path that spreads successive planes over two
  partial-sum rows, so the loop is not bound by the store-to-load latency of one.
* Measured: Q4_1 decode ~0.17 cycles/weight on one Zen 4 core, about the issue limit
  of this float formulation (zmm ops are double-pumped there); going further needs
  int8 dot products (vpdpbusd), which LLVM does not derive from these loops: `simd`
  spells them out for every block type on AVX2 hosts; these kernels serve F16, BF16, F32 and
  every type on CPUs without AVX2 (or with RBEES_CPU_SIMD=0).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.core.compiler import Compiler

from rbees_workerd.kernels.cpu.quant_act import quantize_q8_rows, round_f16, round_q8, round_q8k


class _NoAliasCompiler(Compiler):
    """The default pipeline with `noalias` on array data pointers (see the module docstring)."""

    def define_pipelines(self):  # noqa: ANN201
        self.state.flags.noalias = True
        return super().define_pipelines()


_JIT = {"cache": True, "nogil": True, "fastmath": True, "pipeline_class": _NoAliasCompiler}
_TILE = 4  # tokens per weight pass in prefill
_LANES = 2  # independent partial sums per row in decode (<= _TILE)

# How a kernel rounds its input first, as llama.cpp rounds activations for the weight type (quant_act)
ACT_FLOAT = 0  # as it is
ACT_Q8_0 = 1  # int8 blocks (Q4_0, Q5_0, Q8_0 weights)
ACT_Q8_1 = 2  # int8 blocks with fp16 block sums (Q4_1, Q5_1 weights)
ACT_F16 = 3  # fp16 (F16 weights)
ACT_Q8_K = 4  # int8 blocks of 256 (K-quant weights)


@njit(inline="always", **_JIT)
def _task_range(task: int, ntask: int, n: int) -> tuple[int, int]:
    return task * n // ntask, (task + 1) * n // ntask


@njit(inline="always", **_JIT)
def _block_input(x, act):  # noqa: ANN001, ANN202
    """The rounded input of a 32-block kernel, its 16-element half sums (or Q8_1's block sums), and
    for Q8_K (whose input is its integers) the scale per 32-block that the block's sums take."""
    sxh = np.empty((x.shape[0], x.shape[1] // 16), np.float32)
    if act == ACT_FLOAT:
        half_sums(x, sxh)
        return x, sxh, np.empty((x.shape[0], 0), np.float32)
    xq = np.empty_like(x)
    if act == ACT_Q8_K:
        xs = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
        round_q8k(x, xq, xs)
        half_sums(xq, sxh)
        return xq, sxh, xs
    round_q8(x, act == ACT_Q8_1, xq, sxh)
    return xq, sxh, np.empty((x.shape[0], 0), np.float32)


@njit(**_JIT)
def half_sums(x: np.ndarray, out: np.ndarray) -> None:
    """out[t, h] = sum of x[t, 16h:16h+16] (the activation side of min/offset terms)."""
    for t in range(x.shape[0]):
        for h in range(out.shape[1]):
            s = np.float32(0.0)
            for i in range(16):
                s += x[t, h * 16 + i]
            out[t, h] = s


# ---- the per-(chunk, block) accumulation of sum_j q[j, r] * x[t, j] -------------------------------


@njit(inline="always", **_JIT)
def _fold_lanes(plo):  # noqa: ANN001, ANN202
    for k in range(1, _LANES):
        for r in range(plo.shape[1]):
            plo[0, r] += plo[k, r]


@njit(inline="always", **_JIT)
def _acc_nibble(qs, c, b, x, t, tn, xb, plo):  # noqa: ANN001, ANN202
    C = qs.shape[3]
    if tn == 1:
        # successive planes go to alternating rows of plo: the sums' store-to-load latency,
        # not the arithmetic, bounds this loop otherwise
        plo[1:_LANES] = 0.0
        for j in range(16):
            p = j % _LANES
            xl = x[t, xb + j]
            xh = x[t, xb + 16 + j]
            for r in range(C):
                q = qs[c, b, j, r]
                plo[p, r] += np.float32(np.uint8(q & 15)) * xl + np.float32(np.uint8(q >> 4)) * xh
        _fold_lanes(plo)
    else:
        for j in range(16):
            xl0, xh0 = x[t, xb + j], x[t, xb + 16 + j]
            xl1, xh1 = x[t + 1, xb + j], x[t + 1, xb + 16 + j]
            xl2, xh2 = x[t + 2, xb + j], x[t + 2, xb + 16 + j]
            xl3, xh3 = x[t + 3, xb + j], x[t + 3, xb + 16 + j]
            for r in range(C):
                q = qs[c, b, j, r]
                lo = np.float32(np.uint8(q & 15))
                hi = np.float32(np.uint8(q >> 4))
                plo[0, r] += lo * xl0 + hi * xh0
                plo[1, r] += lo * xl1 + hi * xh1
                plo[2, r] += lo * xl2 + hi * xh2
                plo[3, r] += lo * xl3 + hi * xh3


@njit(inline="always", **_JIT)
def _acc_byte(qs, c, b, x, t, tn, xb, plo):  # noqa: ANN001, ANN202
    C = qs.shape[3]
    if tn == 1:
        plo[1:_LANES] = 0.0
        for j in range(32):
            p = j % _LANES
            xj = x[t, xb + j]
            for r in range(C):
                plo[p, r] += np.float32(np.int8(qs[c, b, j, r])) * xj
        _fold_lanes(plo)
    else:
        for j in range(32):
            x0, x1, x2, x3 = x[t, xb + j], x[t + 1, xb + j], x[t + 2, xb + j], x[t + 3, xb + j]
            for r in range(C):
                w = np.float32(np.int8(qs[c, b, j, r]))
                plo[0, r] += w * x0
                plo[1, r] += w * x1
                plo[2, r] += w * x2
                plo[3, r] += w * x3


@njit(inline="always", **_JIT)
def _acc_ext(qs, qh, ebits, offset, c, b, x, t, tn, xb, plo, phi):  # noqa: ANN001, ANN202
    """5/6-bit values: the nibble plus `ebits` bits from qh, plus the type's offset (Q5_0: -16,
    Q6_K: -32: summing q * x and offset * x apart loses to cancellation what Q8 rounding of
    the next product's input then amplifies); low and high halves kept apart."""
    C = qs.shape[3]
    mask = (1 << ebits) - 1
    for j in range(16):
        pos = 2 * j * ebits  # the bits of elements j and j + 16 sit side by side
        byte = pos >> 3
        sl = pos & 7
        sh = sl + ebits
        if tn == 1:
            # the variable bit shifts in float arithmetic: LLVM keeps int64 shifts scalar
            f0 = np.float32(1.0 / (1 << sl))
            f1 = np.float32(1.0 / (1 << sh))
            f2 = np.float32(1.0 / (1 << (sh + ebits)))
            top = np.float32(1 << ebits)
            xl = x[t, xb + j]
            xh = x[t, xb + 16 + j]
            for r in range(C):
                q = qs[c, b, j, r]
                e = np.float32(qh[c, b, byte, r])
                e0 = np.floor(e * f0)
                e1 = np.floor(e * f1)
                e2 = np.floor(e * f2)
                lo = np.float32(np.uint8(q & 15)) + np.float32(16.0) * (e0 - top * e1) + offset
                hi = np.float32(np.uint8(q >> 4)) + np.float32(16.0) * (e1 - top * e2) + offset
                plo[0, r] += lo * xl
                phi[0, r] += hi * xh
        else:
            xl0, xh0 = x[t, xb + j], x[t, xb + 16 + j]
            xl1, xh1 = x[t + 1, xb + j], x[t + 1, xb + 16 + j]
            xl2, xh2 = x[t + 2, xb + j], x[t + 2, xb + 16 + j]
            xl3, xh3 = x[t + 3, xb + j], x[t + 3, xb + 16 + j]
            for r in range(C):
                q = qs[c, b, j, r]
                e = qh[c, b, byte, r]
                lo = np.float32(np.uint8((q & 15) | (((e >> sl) & mask) << 4))) + offset
                hi = np.float32(np.uint8((q >> 4) | (((e >> sh) & mask) << 4))) + offset
                plo[0, r] += lo * xl0
                phi[0, r] += hi * xh0
                plo[1, r] += lo * xl1
                phi[1, r] += hi * xh1
                plo[2, r] += lo * xl2
                phi[2, r] += hi * xh2
                plo[3, r] += lo * xl3
                phi[3, r] += hi * xh3


@njit(inline="always", **_JIT)
def _matmul_blocks(x, qs, qh, d, m, kind, ebits, half, offset, sxh, xs, tasks, out):  # noqa: ANN001, ANN202
    """out[T, N] = x[T, K] @ dequant(w).T for the 32-block layouts of `quant_pack` (x times xs[T, K/32]
    per 32-block where xs is not empty)."""
    T = x.shape[0]
    NC, nb, _, C = qs.shape
    N = out.shape[1]
    has_m = m.shape[1] > 0
    scaled = xs.shape[1] > 0
    ntask = max(1, min(tasks, NC))
    for task in prange(ntask):
        c0, c1 = _task_range(task, ntask, NC)
        plo = np.empty((_TILE, C), np.float32)
        phi = np.empty((_TILE, C), np.float32)
        acc = np.empty((_TILE, C), np.float32)
        for c in range(c0, c1):
            rows = min(C, N - c * C)
            t = 0
            while t < T:
                tn = _TILE if T - t >= _TILE else 1
                acc[:tn] = 0.0
                for b in range(nb):
                    plo[:tn] = 0.0
                    if kind == 1:
                        phi[:tn] = 0.0
                        _acc_ext(qs, qh, ebits, offset, c, b, x, t, tn, b * 32, plo, phi)
                    elif kind == 0:
                        _acc_nibble(qs, c, b, x, t, tn, b * 32, plo)
                    else:
                        _acc_byte(qs, c, b, x, t, tn, b * 32, plo)
                    slo = b * half
                    shi = slo + half - 1
                    for k in range(tn):
                        s0 = sxh[t + k, 2 * b]
                        s1 = sxh[t + k, 2 * b + 1]
                        if scaled:  # sums of Q8_K's integers: times their scale
                            sx = xs[t + k, b]
                            s0 *= sx
                            s1 *= sx
                            for r in range(C):
                                plo[k, r] *= sx
                            if kind == 1:
                                for r in range(C):
                                    phi[k, r] *= sx
                        if kind == 1:
                            if has_m:
                                for r in range(C):
                                    acc[k, r] += (
                                        d[c, slo, r] * plo[k, r]
                                        + d[c, shi, r] * phi[k, r]
                                        + m[c, slo, r] * s0
                                        + m[c, shi, r] * s1
                                    )
                            else:
                                for r in range(C):
                                    acc[k, r] += d[c, slo, r] * plo[k, r] + d[c, shi, r] * phi[k, r]
                        elif has_m:
                            for r in range(C):
                                acc[k, r] += d[c, b, r] * plo[k, r] + m[c, b, r] * (s0 + s1)
                        else:
                            for r in range(C):
                                acc[k, r] += d[c, b, r] * (plo[k, r] + offset * (s0 + s1))
                for k in range(tn):
                    for r in range(rows):
                        out[t + k, c * C + r] = acc[k, r]
                t += tn


# One compiled kernel per value kind (`kind` is a constant in each), so a model compiles
# only the kinds it uses and each kernel's machine code holds one inner loop family.


@njit(parallel=True, **_JIT)
def matmul_nibble(x, qs, d, m, offset, act, tasks, out):  # noqa: ANN001, ANN201
    xin, sxh, xs = _block_input(x, act)
    _matmul_blocks(xin, qs, qs, d, m, 0, 0, 1, offset, sxh, xs, tasks, out)


@njit(parallel=True, **_JIT)
def matmul_nibble_q8(x, qs, d, m, offset, tasks, out):  # noqa: ANN001, ANN201
    """out[T, N] = x[T, K] @ dequant(w).T for 4-bit weights and int8-rounded input (ACT_Q8_0/Q8_1), as
    llama.cpp computes it: exact integer sums of q4 * q8 per block, then the block scales. For the
    few tokens of a decode step (the tiled float kernel serves prefill).

    16 products of a 4-bit and an int8 value stay within int16 (|sum| <= 16 * 15 * 127), so each
    half block accumulates in int16 lanes: twice the lanes of float32 per vector instruction.
    """
    T = x.shape[0]
    NC, nb, _, C = qs.shape
    N = out.shape[1]
    has_m = m.shape[1] > 0
    q8, dh, sums, isums = quantize_q8_rows(x)
    ntask = max(1, min(tasks, NC))
    for task in prange(ntask):
        c0, c1 = _task_range(task, ntask, NC)
        acc = np.empty((T, C), np.float32)
        plo = np.empty((T, C), np.int16)
        phi = np.empty((T, C), np.int16)
        lo = np.empty(C, np.int16)
        hi = np.empty(C, np.int16)
        for c in range(c0, c1):
            acc[:] = 0.0
            for b in range(nb):
                plo[:] = 0
                phi[:] = 0
                for j in range(16):
                    if T == 1:
                        xl = np.int16(q8[0, b * 32 + j])
                        xh = np.int16(q8[0, b * 32 + 16 + j])
                        for r in range(C):
                            v = qs[c, b, j, r]
                            plo[0, r] += np.int16(v & 15) * xl
                            phi[0, r] += np.int16(v >> 4) * xh
                        continue
                    for r in range(C):  # unpacked once, used by every token
                        v = qs[c, b, j, r]
                        lo[r] = np.int16(v & 15)
                        hi[r] = np.int16(v >> 4)
                    for t in range(T):
                        xl = np.int16(q8[t, b * 32 + j])
                        xh = np.int16(q8[t, b * 32 + 16 + j])
                        for r in range(C):
                            plo[t, r] += lo[r] * xl
                            phi[t, r] += hi[r] * xh
                for t in range(T):
                    # Q4_1's mins take Q8_1's fp16 block sums; Q4_0's offset the sum of rounded inputs
                    db = dh[t, b]
                    sb = sums[t, b] if has_m else offset * db * np.float32(isums[t, b])
                    if has_m:
                        for r in range(C):
                            dot = np.float32(np.int32(plo[t, r]) + np.int32(phi[t, r]))
                            acc[t, r] += d[c, b, r] * db * dot + m[c, b, r] * sb
                    else:
                        for r in range(C):
                            dot = np.float32(np.int32(plo[t, r]) + np.int32(phi[t, r]))
                            acc[t, r] += d[c, b, r] * (db * dot + sb)
            for t in range(T):
                for r in range(min(C, N - c * C)):
                    out[t, c * C + r] = acc[t, r]


@njit(parallel=True, **_JIT)
def matmul_byte(x, qs, d, act, tasks, out):  # noqa: ANN001, ANN201
    xin, sxh, xs = _block_input(x, act)
    _matmul_blocks(xin, qs, qs, d, d[:, :0], 2, 0, 1, np.float32(0.0), sxh, xs, tasks, out)


@njit(parallel=True, **_JIT)
def matmul_ext(x, qs, qh, d, m, ebits, half, offset, act, tasks, out):  # noqa: ANN001, ANN201
    xin, sxh, xs = _block_input(x, act)
    _matmul_blocks(xin, qs, qh, d, m, 1, ebits, half, offset, sxh, xs, tasks, out)


@njit(inline="always", **_JIT)
def _acc_dense(w, x, t, tn, acc):  # noqa: ANN001, ANN202
    """acc[k, r] += sum_i w[i, r] * x[t + k, i] for one chunk w[K, C]."""
    K, C = w.shape
    if tn == 1:
        for i in range(K):
            xi = x[t, i]
            for r in range(C):
                acc[0, r] += w[i, r] * xi
    else:
        for i in range(K):
            x0, x1, x2, x3 = x[t, i], x[t + 1, i], x[t + 2, i], x[t + 3, i]
            for r in range(C):
                wv = w[i, r]
                acc[0, r] += wv * x0
                acc[1, r] += wv * x1
                acc[2, r] += wv * x2
                acc[3, r] += wv * x3


@njit(inline="always", **_JIT)
def _dense_chunk(w, x, c, acc, out):  # noqa: ANN001, ANN202
    T = x.shape[0]
    C = w.shape[1]
    rows = min(C, out.shape[1] - c * C)
    t = 0
    while t < T:
        tn = _TILE if T - t >= _TILE else 1
        acc[:tn] = 0.0
        _acc_dense(w, x, t, tn, acc)
        for k in range(tn):
            for r in range(rows):
                out[t + k, c * C + r] = acc[k, r]
        t += tn


@njit(parallel=True, **_JIT)
def matmul_f32(x, w, tasks, out):  # noqa: ANN001, ANN201
    """out = x @ w.T for float32 weights in chunk layout w[N/C, K, C]."""
    NC, _, C = w.shape
    ntask = max(1, min(tasks, NC))
    for task in prange(ntask):
        c0, c1 = _task_range(task, ntask, NC)
        acc = np.empty((_TILE, C), np.float32)
        for c in range(c0, c1):
            _dense_chunk(w[c], x, c, acc, out)


@njit(inline="always", **_JIT)
def _widen_chunk(w, c, bf16, wf, wu):  # noqa: ANN001, ANN202
    """wf[:] = float32 of the F16/BF16 bits w[c] (wu is wf's uint32 view); branch-free, so it vectorizes.

    F16: the half's exponent and mantissa moved into float32 position, times 2^112 to
    rebias the exponent; this is exact for normals and subnormals alike (Inf/NaN get
    an all-ones exponent first, and stay Inf/NaN after the multiply).
    """
    K, C = wf.shape
    for i in range(K):
        if bf16:
            for r in range(C):
                wu[i, r] = np.uint32(w[c, i, r]) << 16
        else:
            for r in range(C):
                h = np.uint32(w[c, i, r])
                em = h & np.uint32(0x7FFF)
                inf_nan = np.uint32(0x7F800000) if em >= 0x7C00 else np.uint32(0)
                wu[i, r] = np.uint32(((h & np.uint32(0x8000)) << 16) | (em << 13) | inf_nan)
            for r in range(C):
                wf[i, r] *= np.float32(2.0**112)


@njit(parallel=True, **_JIT)
def matmul_f16(x, w, bf16, act, tasks, out):  # noqa: ANN001, ANN201
    """out = x @ w.T for F16/BF16 bits w[N/C, K, C] (uint16): each chunk is widened once per call."""
    NC, K, C = w.shape
    if act == ACT_F16:
        xq = np.empty_like(x)
        round_f16(x, xq)
        x = xq
    ntask = max(1, min(tasks, NC))
    for task in prange(ntask):
        c0, c1 = _task_range(task, ntask, NC)
        acc = np.empty((_TILE, C), np.float32)
        wf = np.empty((K, C), np.float32)
        wu = wf.view(np.uint32)
        for c in range(c0, c1):
            _widen_chunk(w, c, bf16, wf, wu)
            _dense_chunk(wf, x, c, acc, out)


# ---- embedding rows (exact dequantization, scalar: a few rows per step) -------------------------


@njit(**_JIT)
def embed_blocks(qs, qh, d, m, kind, ebits, half, offset, tokens, out):  # noqa: ANN001, ANN201
    """out[t] = dequant(w)[tokens[t]]."""
    C = qs.shape[3]
    nb = qs.shape[1]
    has_m = m.shape[1] > 0
    mask = (1 << ebits) - 1
    for t in range(tokens.shape[0]):
        n = tokens[t]
        c = n // C
        r = n % C
        for b in range(nb):
            for j in range(32):
                if kind == 2:
                    q = np.float32(np.int8(qs[c, b, j, r]))
                else:
                    byte = np.int64(qs[c, b, j & 15, r])
                    v = (byte >> 4) if j >= 16 else (byte & 15)
                    if kind == 1:
                        bit = 2 * (j & 15) * ebits + (ebits if j >= 16 else 0)
                        v |= ((np.int64(qh[c, b, bit >> 3, r]) >> (bit & 7)) & mask) << 4
                    q = np.float32(v)
                s = b * half + (j // 16 if half == 2 else 0)
                if has_m:
                    out[t, b * 32 + j] = d[c, s, r] * q + m[c, s, r]
                else:
                    out[t, b * 32 + j] = d[c, s, r] * (q + offset)


@njit(**_JIT)
def embed_dense(w, tokens, out):  # noqa: ANN001, ANN201
    C = w.shape[2]
    for t in range(tokens.shape[0]):
        n = tokens[t]
        for i in range(w.shape[1]):
            out[t, i] = w[n // C, i, n % C]


@njit(**_JIT)
def embed_half(w, bf16, tokens, out):  # noqa: ANN001, ANN201
    """out[t] = row tokens[t] of the F16/BF16 bits w, widened exactly (through its whole chunk)."""
    _, K, C = w.shape
    wf = np.empty((K, C), np.float32)
    wu = wf.view(np.uint32)
    for t in range(tokens.shape[0]):
        n = tokens[t]
        _widen_chunk(w, n // C, bf16, wf, wu)
        for i in range(K):
            out[t, i] = wf[i, n % C]
