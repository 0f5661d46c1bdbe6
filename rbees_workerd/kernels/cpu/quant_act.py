"""Activation rounding as llama.cpp does it, so greedy decoding agrees with it token for token.

llama.cpp never multiplies float32 activations by quantized weights: it first rounds
each activation row to the weight's "vec_dot type" (int8 blocks of 32 with an fp16
scale for the 32-block types, Q8_K's int8 blocks of 256 with a float32 scale for the
K-quants, fp16 for F16 weights) and takes integer dot products.
Our kernels stay in float but feed them the same rounded activations, which gives
llama.cpp's products up to float32 summation order. Every product and quotient here
is rounded exactly as IEEE arithmetic rounds it (no fastmath contraction or reciprocals).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_F16_MAX = 65504.0
# lets LLVM vectorize the block max; leaves out "arcp", "contract" and "afn", which
# would change how the products and quotients are rounded
_NO_REORDERED_ROUNDING = {"nnan", "ninf", "nsz", "reassoc"}


@njit(cache=True, nogil=True)
def fp16_round(v: float) -> np.float32:
    """The float16 nearest to v (ties to even, subnormals and overflow included), as float32."""
    vd = np.float64(v)
    if vd == 0.0 or not math.isfinite(vd):
        return np.float32(vd)
    _, e = math.frexp(vd)  # |v| in [2^(e-1), 2^e)
    quantum = max(e - 11, -24)  # fp16 keeps 11 significant bits, down to 2^-24
    r = math.ldexp(np.rint(math.ldexp(vd, -quantum)), quantum)
    return np.float32(r if abs(r) <= _F16_MAX else math.copysign(math.inf, vd))


@njit(cache=True, nogil=True)
def fp16_round_inplace(a: np.ndarray) -> None:
    """a[:] = fp16_round(a[:]) for a contiguous 1-D float32 array, by bit arithmetic (the hot path
    of attention): normals keep 10 mantissa bits (ties to even), fp16 subnormals keep multiples
    of 2^-24, values past the fp16 range become inf."""
    u = a.view(np.uint32)
    for i in range(a.shape[0]):
        v = a[i]
        if abs(v) < np.float32(2.0**-14):
            a[i] = np.float32(np.rint(v * np.float32(2.0**24)) * np.float32(2.0**-24))
        else:
            b = u[i]
            u[i] = (b + np.uint32(0xFFF) + ((b >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
            if abs(a[i]) > np.float32(_F16_MAX):
                a[i] = np.float32(math.copysign(math.inf, v))


@njit(cache=True, nogil=True, fastmath=_NO_REORDERED_ROUNDING)
def quantize_q8_row(x: np.ndarray, q: np.ndarray, dh: np.ndarray, sums: np.ndarray) -> None:
    """x[K] as llama.cpp's Q8_0/Q8_1 blocks (x86 path): per 32-block d = amax/127, kept as fp16 in
    dh[b]; q = round_half_even(x * 127/amax) as int8; sums[b] = fp16(d * sum(q)), Q8_1's block sum."""
    for b in range(x.shape[0] // 32):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[b * 32 + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        total = 0
        for j in range(32):
            v = np.rint(x[b * 32 + j] * inv)
            q[b * 32 + j] = np.int8(v)
            total += int(v)
        dh[b] = fp16_round(d)
        sums[b] = fp16_round(d * np.float32(total))


@njit(cache=True, nogil=True)
def quantize_q8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The int8 input of an integer product against a 32-element block type: `quantize_q8_row` of
    each row of x[T, K] -> q8[T, K], dh[T, K/32], Q8_1's fp16 sums[T, K/32], and the exact int16
    sums of q8 per block (for the weight types' offsets)."""
    T, K = x.shape
    nb = K // 32
    q8 = np.empty((T, K), np.int8)
    dh = np.empty((T, nb), np.float32)
    sums = np.empty((T, nb), np.float32)
    isums = np.empty((T, nb), np.int16)
    for t in range(T):
        quantize_q8_row(x[t], q8[t], dh[t], sums[t])
        for b in range(nb):
            total = 0
            for j in range(32):
                total += int(q8[t, b * 32 + j])
            isums[t, b] = total
    return q8, dh, sums, isums


@njit(cache=True, nogil=True, fastmath=_NO_REORDERED_ROUNDING)
def quantize_q8k_row(x: np.ndarray, q: np.ndarray, d: np.ndarray, sums: np.ndarray) -> None:
    """x[K] as llama.cpp's Q8_K blocks of 256 (quantize_row_q8_K_ref, which x86 uses too): `big` is
    the first element of largest magnitude, iscale = -127/big, q = min(127, round_half_even(iscale * x))
    as int8, d[b] = 1/iscale in float32; sums[j] = the sum of q over each len(q) / len(sums)
    elements (16 or 32). An all-zero block gets d = 0, q = 0."""
    per = x.shape[0] // sums.shape[0]
    for b in range(x.shape[0] // 256):
        amax = np.float32(0.0)
        for j in range(256):
            amax = max(amax, abs(x[b * 256 + j]))
        if amax == 0:
            d[b] = 0.0
            q[b * 256 : b * 256 + 256] = 0
        else:
            big = np.float32(0.0)
            for j in range(256):  # the first of equal magnitudes, as llama.cpp's strict `>` picks it
                if abs(x[b * 256 + j]) == amax:
                    big = x[b * 256 + j]
                    break
            iscale = np.float32(-127.0) / big
            for j in range(256):
                q[b * 256 + j] = np.int8(min(np.float32(127.0), np.rint(iscale * x[b * 256 + j])))
            d[b] = np.float32(1.0) / iscale
    for j in range(sums.shape[0]):
        total = 0
        for i in range(per):
            total += int(q[j * per + i])
        sums[j] = total


@njit(cache=True, nogil=True)
def quantize_q8k_rows(x: np.ndarray, per: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`quantize_q8k_row` of each row of x[T, K] -> q8[T, K], d[T, K/256], an empty [T, 0] (the place
    of Q8_1's sums in `quantize_q8_rows`' result) and the int16 sums of q8 per `per` elements."""
    T, K = x.shape
    q8 = np.empty((T, K), np.int8)
    d = np.empty((T, K // 256), np.float32)
    sums = np.empty((T, K // per), np.int16)
    for t in range(T):
        quantize_q8k_row(x[t], q8[t], d[t], sums[t])
    return q8, d, np.empty((T, 0), np.float32), sums


@njit(cache=True, nogil=True)
def round_q8(x: np.ndarray, with_sum: bool, xq: np.ndarray, sxh: np.ndarray) -> None:
    """xq = x rounded through llama.cpp's Q8_0 (with_sum=False) or Q8_1 blocks (`quantize_q8_row`).

    sxh[t, 2b], sxh[t, 2b+1] get the block halves' sums of xq, except for Q8_1 where
    sxh[t, 2b] is the block's fp16 sum term d * sum(q) (the one Q4_1/Q5_1 mins use)
    and sxh[t, 2b+1] is 0.
    """
    T, K = x.shape
    q = np.empty(K, np.int8)
    dh = np.empty(K // 32, np.float32)
    sums = np.empty(K // 32, np.float32)
    for t in range(T):
        quantize_q8_row(x[t], q, dh, sums)
        for b in range(K // 32):
            s0 = 0
            s1 = 0
            for j in range(32):
                xq[t, b * 32 + j] = np.float32(q[b * 32 + j]) * dh[b]
                if j < 16:
                    s0 += int(q[b * 32 + j])
                else:
                    s1 += int(q[b * 32 + j])
            if with_sum:
                sxh[t, 2 * b] = sums[b]
                sxh[t, 2 * b + 1] = 0.0
            else:
                sxh[t, 2 * b] = dh[b] * np.float32(s0)
                sxh[t, 2 * b + 1] = dh[b] * np.float32(s1)


@njit(cache=True, nogil=True)
def round_q8k(x: np.ndarray, xq: np.ndarray, scales: np.ndarray) -> None:
    """x through llama.cpp's Q8_K blocks (`quantize_q8k_row`), apart: xq = the int8 values as float32
    and scales[t, b] = the Q8_K scale of 32-block b, so that x rounds to xq * scales and a float
    kernel's sums of weight integers times xq stay exact integers, as llama.cpp's are."""
    T, K = x.shape
    q = np.empty(K, np.int8)
    d = np.empty(K // 256, np.float32)
    sums = np.empty(K // 32, np.int16)
    for t in range(T):
        quantize_q8k_row(x[t], q, d, sums)
        for j in range(K):
            xq[t, j] = np.float32(q[j])
        for b in range(K // 32):
            scales[t, b] = d[b // 8]


@njit(cache=True, nogil=True)
def round_f16(x: np.ndarray, xq: np.ndarray) -> None:
    """xq = x rounded to float16 (llama.cpp's activations for F16 weights)."""
    for t in range(x.shape[0]):
        xq[t] = x[t]
        fp16_round_inplace(xq[t])
