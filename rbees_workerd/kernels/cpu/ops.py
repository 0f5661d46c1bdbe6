"""Numba kernels for everything but the quantized matrix products: norm, RoPE, attention, SwiGLU.

Each kernel parallelizes over tokens or heads with `prange` and keeps its inner
loops over contiguous float32 data so LLVM vectorizes them. Attention rounds
what llama.cpp keeps in fp16 (the KV cache, the query and the attention
weights) to fp16 values, so greedy decoding agrees with it token for token.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from rbees_workerd.kernels.cpu.quant_act import fp16_round_inplace

_OPTS = {"cache": True, "fastmath": True, "nogil": True}


@njit(parallel=True, **_OPTS)
def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    t_count, d = x.shape
    for t in prange(t_count):
        ss = np.float32(0.0)
        for i in range(d):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0 / math.sqrt(ss / d + eps))
        for i in range(d):
            out[t, i] = x[t, i] * inv * weight[i]


@njit(parallel=True, **_OPTS)
def rope(x: np.ndarray, positions: np.ndarray, theta: float, neox: bool) -> None:
    """Rotate x[T, heads, E] in place; see Backend.rope for the two pair orderings."""
    t_count, heads, e = x.shape
    half = e // 2
    for t in prange(t_count):
        pos = positions[t]
        for i in range(half):
            freq = pos * theta ** (-2.0 * i / e)
            c = np.float32(math.cos(freq))
            s = np.float32(math.sin(freq))
            a = i if neox else 2 * i
            b = i + half if neox else 2 * i + 1
            for h in range(heads):
                x0 = x[t, h, a]
                x1 = x[t, h, b]
                x[t, h, a] = x0 * c - x1 * s
                x[t, h, b] = x0 * s + x1 * c


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


@njit(parallel=True, **_OPTS)
def attention(
    q: np.ndarray,
    cache_k: np.ndarray,
    cache_v: np.ndarray,
    slots: np.ndarray,
    positions: np.ndarray,
    out: np.ndarray,
) -> None:
    """Causal GQA attention of q[T, H, E] over each token's own slot of the cache [S, C, G, E]."""
    t_count, n_heads, e = q.shape
    group = n_heads // cache_k.shape[2]
    scale = np.float32(1.0 / math.sqrt(e))
    for job in prange(t_count * n_heads):
        t = job // n_heads
        h = job % n_heads
        g = h // group
        s = slots[t]
        n = positions[t] + 1
        q16 = np.empty(e, dtype=np.float32)
        for i in range(e):
            q16[i] = q[t, h, i]
        fp16_round_inplace(q16)
        scores = np.empty(n, dtype=np.float32)
        best = np.float32(-np.inf)
        for p in range(n):
            acc = np.float32(0.0)
            for i in range(e):
                acc += q16[i] * cache_k[s, p, g, i]
            acc *= scale
            scores[p] = acc
            best = max(best, acc)
        total = 0.0  # float64, as llama.cpp sums its softmax
        for p in range(n):
            w = np.float32(math.exp(scores[p] - best))
            scores[p] = w
            total += w
        inv = np.float32(1.0 / total)
        for p in range(n):
            scores[p] *= inv
        fp16_round_inplace(scores)
        acc_v = np.zeros(e, dtype=np.float32)
        for p in range(n):
            w = scores[p]
            for i in range(e):
                acc_v[i] += w * cache_v[s, p, g, i]
        for i in range(e):
            out[t, h, i] = acc_v[i]


@njit(parallel=True, **_OPTS)
def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    t_count, n = gate.shape
    for t in prange(t_count):
        for i in range(n):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * up[t, i]


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
