"""Numba kernels for quantized matrix products in the layout of `quant_pack`.

Why they are shaped this way (measured on AVX-512 Xeon/EPYC, numba 0.68):

* The vectorized loop is always the innermost loop over the 32 rows of a chunk
  (`for r in range(C)`), a plain contiguous map (`part[r] += q[r] * x_j`), so LLVM's
  loop vectorizer turns it into zmm code. Row-wise dot products with per-block
  scales were measured to stay scalar or to pay a horizontal reduction per block.
* Every array is indexed by loop variables only (multi-dimensional indices), so
  Numba's negative-index wraparound selects fold away.
* Functions are compiled with `noalias` argument pointers (`_NoAliasCompiler`):
  without it LLVM must assume the scratch stores may alias the weight loads and
  keeps everything scalar. Callers never pass overlapping arrays.
* Integer values are truncated back to uint8/int8 before the int->float convert,
  otherwise Numba's int64 promotion turns every convert into a 64-bit one.
* Weight chunks are reused across tiles of 4 tokens (prefill) while they sit in
  L1/L2; decode (T=1) takes a 1-token path.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.core.compiler import Compiler


class _NoAliasCompiler(Compiler):
    """The default pipeline with `noalias` on array data pointers (see the module docstring)."""

    def define_pipelines(self):  # noqa: ANN201
        self.state.flags.noalias = True
        return super().define_pipelines()


_JIT = {"cache": True, "nogil": True, "fastmath": True, "pipeline_class": _NoAliasCompiler}
_TILE = 4  # tokens per weight pass in prefill


@njit(inline="always", **_JIT)
def _task_range(task: int, ntask: int, n: int) -> tuple[int, int]:
    return task * n // ntask, (task + 1) * n // ntask


@njit(parallel=True, **_JIT)
def half_sums(x: np.ndarray, out: np.ndarray) -> None:
    """out[t, h] = sum of x[t, 16h:16h+16] (the activation side of min/offset terms)."""
    for t in prange(x.shape[0]):
        for h in range(out.shape[1]):
            s = np.float32(0.0)
            for i in range(16):
                s += x[t, h * 16 + i]
            out[t, h] = s


# ---- the per-(chunk, block) accumulation of sum_j q[j, r] * x[t, j] -------------------------------


@njit(inline="always", **_JIT)
def _acc_nibble(qs, c, b, x, t, tn, xb, plo):  # noqa: ANN001, ANN202
    C = qs.shape[3]
    if tn == 1:
        for j in range(16):
            xl = x[t, xb + j]
            xh = x[t, xb + 16 + j]
            for r in range(C):
                q = qs[c, b, j, r]
                plo[0, r] += np.float32(np.uint8(q & 15)) * xl + np.float32(np.uint8(q >> 4)) * xh
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
        for j in range(32):
            xj = x[t, xb + j]
            for r in range(C):
                plo[0, r] += np.float32(np.int8(qs[c, b, j, r])) * xj
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
def _acc_ext(qs, qh, ebits, c, b, x, t, tn, xb, plo, phi):  # noqa: ANN001, ANN202
    """5/6-bit values: the nibble plus `ebits` bits from qh; low and high halves kept apart."""
    C = qs.shape[3]
    mask = (1 << ebits) - 1
    for j in range(16):
        bl = (j * ebits) >> 3
        sl = (j * ebits) & 7
        bh = ((j + 16) * ebits) >> 3
        sh = ((j + 16) * ebits) & 7
        for k in range(tn):
            xl = x[t + k, xb + j]
            xh = x[t + k, xb + 16 + j]
            for r in range(C):
                q = qs[c, b, j, r]
                lo = np.uint8((q & 15) | (((qh[c, b, bl, r] >> sl) & mask) << 4))
                hi = np.uint8((q >> 4) | (((qh[c, b, bh, r] >> sh) & mask) << 4))
                plo[k, r] += np.float32(lo) * xl
                phi[k, r] += np.float32(hi) * xh


@njit(parallel=True, **_JIT)
def matmul_blocks(x, qs, qh, d, m, kind, ebits, half, offset, sxh, nthreads, out):  # noqa: ANN001, ANN201
    """out[T, N] = x[T, K] @ dequant(w).T for the 32-block layouts of `quant_pack`."""
    T = x.shape[0]
    NC, nb, _, C = qs.shape
    N = out.shape[1]
    has_m = m.shape[1] > 0
    ntask = max(1, min(nthreads, NC))
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
                        _acc_ext(qs, qh, ebits, c, b, x, t, tn, b * 32, plo, phi)
                    elif kind == 0:
                        _acc_nibble(qs, c, b, x, t, tn, b * 32, plo)
                    else:
                        _acc_byte(qs, c, b, x, t, tn, b * 32, plo)
                    slo = b * half
                    shi = slo + half - 1
                    for k in range(tn):
                        s0 = sxh[t + k, 2 * b]
                        s1 = sxh[t + k, 2 * b + 1]
                        if kind == 1:
                            if has_m:
                                for r in range(C):
                                    acc[k, r] += (d[c, slo, r] * plo[k, r] + d[c, shi, r] * phi[k, r]
                                                  + m[c, slo, r] * s0 + m[c, shi, r] * s1)
                            else:
                                for r in range(C):
                                    acc[k, r] += (d[c, slo, r] * (plo[k, r] + offset * s0)
                                                  + d[c, shi, r] * (phi[k, r] + offset * s1))
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
def matmul_f32(x, w, nthreads, out):  # noqa: ANN001, ANN201
    """out = x @ w.T for float32 weights in chunk layout w[N/C, K, C]."""
    NC, _, C = w.shape
    ntask = max(1, min(nthreads, NC))
    for task in prange(ntask):
        c0, c1 = _task_range(task, ntask, NC)
        acc = np.empty((_TILE, C), np.float32)
        for c in range(c0, c1):
            _dense_chunk(w[c], x, c, acc, out)


@njit(inline="always", **_JIT)
def _half_bits_to_f32_bits(h: np.uint16, bf16: bool) -> np.uint32:
    """IEEE half (or bfloat16) bits -> float32 bits; exact, including subnormals, inf and NaN."""
    if bf16:
        return np.uint32(h) << np.uint32(16)
    sign = np.uint32(h & 0x8000) << np.uint32(16)
    e = np.uint32((h >> 10) & 0x1F)
    mant = np.uint32(h & 0x3FF)
    if e == 0x1F:
        return sign | np.uint32(0x7F800000) | (mant << np.uint32(13))
    if e != 0:
        return sign | ((e + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))
    if mant == 0:
        return sign
    # subnormal: normalize the mantissa
    shift = np.uint32(0)
    while (mant & np.uint32(0x400)) == 0:
        mant <<= np.uint32(1)
        shift += np.uint32(1)
    return sign | ((np.uint32(113) - shift) << np.uint32(23)) | ((mant & np.uint32(0x3FF)) << np.uint32(13))


@njit(parallel=True, **_JIT)
def matmul_f16(x, w, bf16, nthreads, out):  # noqa: ANN001, ANN201
    """out = x @ w.T for F16/BF16 bits w[N/C, K, C] (uint16): each chunk is widened once per call."""
    NC, K, C = w.shape
    ntask = max(1, min(nthreads, NC))
    for task in prange(ntask):
        c0, c1 = _task_range(task, ntask, NC)
        acc = np.empty((_TILE, C), np.float32)
        wf = np.empty((K, C), np.float32)
        wu = wf.view(np.uint32)
        for c in range(c0, c1):
            for i in range(K):
                for r in range(C):
                    wu[i, r] = _half_bits_to_f32_bits(w[c, i, r], bf16)
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
                        bit = j * ebits
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
    C = w.shape[2]
    bits = out.view(np.uint32)
    for t in range(tokens.shape[0]):
        n = tokens[t]
        for i in range(w.shape[1]):
            bits[t, i] = _half_bits_to_f32_bits(w[n // C, i, n % C], bf16)
