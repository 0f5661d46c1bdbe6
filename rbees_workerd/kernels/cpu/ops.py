"""Numba kernels for everything but the quantized matrix products: norm, RoPE, attention, SwiGLU.

Each kernel keeps its inner loops over contiguous float32 data so LLVM vectorizes
them, and parallelizes over tokens or heads with `prange` only where a step has
enough work (`_PARALLEL_MIN` elements): waking the other threads costs more than
a decode step's norm or SwiGLU (~1 µs of work). Attention rounds what llama.cpp
keeps in fp16 (the KV cache, the query and the attention weights) to fp16 values,
so greedy decoding agrees with it token for token.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from rbees_workerd.kernels.backend import rope_table
from rbees_workerd.kernels.cpu.quant_act import fp16_round_inplace

_OPTS = {"cache": True, "fastmath": True, "nogil": True, "error_model": "numpy"}  # numpy: no zero-division branches
_PARALLEL_MIN = 1 << 15  # elements of a step from which a kernel spreads its rows over the threads


@njit(inline="always", **_OPTS)
def _rmsnorm_row(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    d = x.shape[0]
    ss = np.float32(0.0)
    for i in range(d):
        ss += x[i] * x[i]
    inv = np.float32(1.0 / math.sqrt(ss / d + eps))
    for i in range(d):
        out[i] = x[i] * inv * weight[i]


@njit(parallel=True, **_OPTS)
def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    t_count = x.shape[0]
    if x.size < _PARALLEL_MIN:
        for t in range(t_count):
            _rmsnorm_row(x[t], weight, eps, out[t])
    else:
        for t in prange(t_count):
            _rmsnorm_row(x[t], weight, eps, out[t])


@njit(inline="always", **_OPTS)
def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    """Rotate one token's x[heads, E] in place by its angles' cos and sin [E/2]."""
    half = x.shape[1] // 2
    for h in range(x.shape[0]):
        for i in range(half):
            a = i if neox else 2 * i
            b = i + half if neox else 2 * i + 1
            x0 = x[h, a]
            x1 = x[h, b]
            x[h, a] = x0 * cos[i] - x1 * sin[i]
            x[h, b] = x0 * sin[i] + x1 * cos[i]


@njit(parallel=True, **_OPTS)
def _rope_apply(x: np.ndarray, table: np.ndarray, neox: bool) -> None:
    if x.size < _PARALLEL_MIN:
        for t in range(x.shape[0]):
            _rotate(x[t], table[0, t], table[1, t], neox)
    else:
        for t in prange(x.shape[0]):
            _rotate(x[t], table[0, t], table[1, t], neox)


_rope_last: list = [None, None]  # the last table's key and the table: a step's q and k of every layer


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    theta: float,
    neox: bool,
    freq_factors: tuple[float, ...] | None = None,
    freq_scale: float = 1.0,
    attn_factor: float = 1.0,
) -> None:
    """Rotate x[T, heads, E] in place; see backend.RopeStore for the pairings and the angles.

    The angles' cos and sin (backend.rope_table) are computed once for a step's positions (every
    layer rotates q and k at the same ones) and kept until the positions or the angles change."""
    angles = (float(theta), freq_factors, float(freq_scale), float(attn_factor))
    key = (positions.tobytes(), x.shape[2], angles)
    if _rope_last[0] != key:
        _rope_last[:] = [key, rope_table(positions, x.shape[2], *angles)]
    _rope_apply(x, _rope_last[1], neox)


def head_rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> None:
    """RMSNorm of each head x[t, h, :] in place, with weight [E] (qwen3's q and k norms)."""
    flat = x.reshape(-1, x.shape[2])
    rmsnorm(flat, weight, eps, flat)


# ggml's vectorized expf (ggml_v_expf, vec.h), which llama.cpp's SwiGLU and softmax use:
# exp(x) = 2^n * (1 + p(b)), n = round(x / ln 2), b = x - n ln 2
_EXP_SHIFT = np.float32(12582912.0)  # 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits
_LOG2E, _LN2_HI, _LN2_LO = (np.float32(float.fromhex(h)) for h in ("0x1.715476p+0", "0x1.62e4p-1", "0x1.7f7d1cp-20"))
_EXP_P = tuple(np.float32(float.fromhex(h)) for h in ("0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3",
                                                       "0x1.573e2ep-5", "0x1.0e4020p-7"))  # fmt: skip
_EXP_MAX = np.float32(88.0)  # arguments are clamped to +-88: exp(88) is finite, exp(-88) ~ 0 to float32 precision


@njit(inline="always", **_OPTS)
def _exp(x: np.ndarray, a: float, c: float, n: int, out: np.ndarray, k: np.ndarray) -> None:
    """out[:n] = exp(a * x[:n] + c) (`out` is not `x`), in three loops LLVM vectorizes: the exponent
    n goes through integer views of `out` and the scratch row `k`, where it becomes 2^n."""
    a, c = np.float32(a), np.float32(c)
    zu, ku = out.view(np.uint32), k.view(np.uint32)
    for i in range(n):
        out[i] = min(max(a * x[i] + c, -_EXP_MAX), _EXP_MAX) * _LOG2E + _EXP_SHIFT
    for i in range(n):
        ku[i] = (zu[i] << np.uint32(23)) + np.uint32(0x3F800000)
    p0, p1, p2, p3, p4 = _EXP_P
    for i in range(n):
        m = out[i] - _EXP_SHIFT
        y = min(max(a * x[i] + c, -_EXP_MAX), _EXP_MAX)
        b = y - m * _LN2_HI - m * _LN2_LO
        u = b * b
        j = ((p4 * b + p3) * u + (p2 * b + p1)) * u + p0 * b
        out[i] = j * k[i] + k[i]


@njit(**_OPTS)
def kv_store(
    k: np.ndarray, v: np.ndarray, cache_k: np.ndarray, cache_v: np.ndarray, slots: np.ndarray, positions: np.ndarray
) -> None:
    """Store k/v[T, G, E] at (slot, position), rounded to fp16 values as llama.cpp's fp16 cache holds them."""
    t_count, g_count, e = k.shape
    row = np.empty(g_count * e, np.float32)
    for src, cache in ((k, cache_k), (v, cache_v)):
        for t in range(t_count):
            for g in range(g_count):
                for i in range(e):
                    row[g * e + i] = src[t, g, i]
            fp16_round_inplace(row)
            for g in range(g_count):
                for i in range(e):
                    cache[slots[t], positions[t], g, i] = row[g * e + i]


@njit(inline="always", **_OPTS)
def _attend(q, cache_k, cache_v, s, g, n, scale, scratch, out) -> None:  # noqa: ANN001
    """out[E] = softmax(fp16(q) . k[:n] / sqrt(E)) @ v[:n] for one head over rows k, v = cache[s, :, g]
    of its slot and kv head, with the weights rounded to fp16 (scratch: float32[4, >= max(n, E)]).
    The caches are indexed whole: a slice of them would be a strided array, whose loops stay scalar."""
    e = q.shape[0]
    q16, scores, weights, row = scratch[0], scratch[1], scratch[2], scratch[3]
    for i in range(e):
        q16[i] = q[i]
    fp16_round_inplace(q16[:e])
    best = np.float32(-np.inf)
    for p in range(n):
        acc = np.float32(0.0)
        for i in range(e):
            acc += q16[i] * cache_k[s, p, g, i]
        scores[p] = acc * scale
        best = max(best, scores[p])
    _exp(scores, 1.0, -best, n, weights, row)
    total = 0.0  # float64, as llama.cpp sums its softmax
    for p in range(n):
        total += weights[p]
    inv = np.float32(1.0 / total)
    for p in range(n):
        scores[p] = weights[p] * inv
    fp16_round_inplace(scores[:n])
    for i in range(e):
        row[i] = 0.0
    for p in range(n):
        w = scores[p]
        for i in range(e):
            row[i] += w * cache_v[s, p, g, i]
    for i in range(e):
        out[i] = row[i]


@njit(parallel=True, **_OPTS)
def attention(
    q: np.ndarray,
    cache_k: np.ndarray,
    cache_v: np.ndarray,
    slots: np.ndarray,
    positions: np.ndarray,
    out: np.ndarray,
    scale: float = 0.0,
) -> None:
    """Causal GQA attention of q[T, H, E] over each token's own slot of the cache [S, C, G, E], scores
    times `scale` (0: 1/sqrt(E)).

    The (token, head) pairs go in ranges, one per task, each with its scratch rows allocated once."""
    t_count, n_heads, e = q.shape
    group = n_heads // cache_k.shape[2]
    jobs = t_count * n_heads
    ntask = min(jobs, 16)
    width = max(e, np.int64(positions.max()) + 1)
    scale32 = np.float32(1.0 / math.sqrt(e)) if scale == 0.0 else np.float32(scale)
    for task in prange(ntask):
        scratch = np.empty((4, width), np.float32)
        for job in range(task * jobs // ntask, (task + 1) * jobs // ntask):
            t = job // n_heads
            h = job % n_heads
            _attend(q[t, h], cache_k, cache_v, slots[t], h // group, positions[t] + 1, scale32, scratch, out[t, h])


@njit(inline="always", **_OPTS)
def _swiglu_row(gate: np.ndarray, up: np.ndarray, out: np.ndarray, e: np.ndarray, k: np.ndarray) -> None:
    """out = silu(gate) * up = gate / (1 + exp(-gate)) * up (`out` may be `gate`)."""
    n = gate.shape[0]
    _exp(gate, -1.0, 0.0, n, e, k)
    for i in range(n):
        out[i] = gate[i] / (np.float32(1.0) + e[i]) * up[i]


@njit(parallel=True, **_OPTS)
def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    t_count, n = gate.shape
    if gate.size < _PARALLEL_MIN:
        e, k = np.empty(n, np.float32), np.empty(n, np.float32)
        for t in range(t_count):
            _swiglu_row(gate[t], up[t], out[t], e, k)
    else:
        for t in prange(t_count):
            e, k = np.empty(n, np.float32), np.empty(n, np.float32)
            _swiglu_row(gate[t], up[t], out[t], e, k)


@njit(**_OPTS)
def add(x: np.ndarray, y: np.ndarray) -> None:
    t_count, n = x.shape
    for t in range(t_count):
        for i in range(n):
            x[t, i] += y[t, i]


@njit(**_OPTS)
def add_bias(out: np.ndarray, bias: np.ndarray) -> None:
    t_count, n = out.shape
    for t in range(t_count):
        for i in range(n):
            out[t, i] += bias[i]
