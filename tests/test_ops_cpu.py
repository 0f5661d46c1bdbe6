"""The CPU kernels for norm, RoPE, attention and SwiGLU against float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from rbees_workerd.kernels.cpu import ops

rng = np.random.default_rng(0)


def test_rmsnorm_matches_numpy():
    x = rng.standard_normal((5, 48)).astype(np.float32)
    w = rng.standard_normal(48).astype(np.float32)
    out = np.empty_like(x)
    ops.rmsnorm(x, w, 1e-5, out)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_orderings(neox):
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    pos = np.array([0, 5, 17], np.int32)
    got = x.copy()
    ops.rope(got, pos, 10000.0, neox)
    ref = x.astype(np.float64).copy()
    for t, p in enumerate(pos):
        for i in range(4):
            a, b = (i, i + 4) if neox else (2 * i, 2 * i + 1)
            ang = p * 10000.0 ** (-2 * i / 8)
            x0, x1 = x[t, :, a].astype(np.float64), x[t, :, b].astype(np.float64)
            ref[t, :, a] = x0 * np.cos(ang) - x1 * np.sin(ang)
            ref[t, :, b] = x0 * np.sin(ang) + x1 * np.cos(ang)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity


def test_attention_causal_gqa_per_slot():
    n_heads, g, e, ctx = 4, 2, 8, 16
    cache_k = np.zeros((2, ctx, g, e), np.float32)
    cache_v = np.zeros((2, ctx, g, e), np.float32)
    # slot 0 gets a 5-token prompt; slot 1 a 3-token one, in the same step
    slots = np.array([0] * 5 + [1] * 3, np.int32)
    pos = np.array([0, 1, 2, 3, 4, 0, 1, 2], np.int32)
    q = rng.standard_normal((8, n_heads, e)).astype(np.float32)
    k = rng.standard_normal((8, g, e)).astype(np.float32)
    v = rng.standard_normal((8, g, e)).astype(np.float32)
    out = np.empty_like(q)
    ops.kv_store(k, v, cache_k, cache_v, slots, pos)
    ops.attention(q, cache_k, cache_v, slots, pos, out)
    def fp16(a: np.ndarray) -> np.ndarray:  # what llama.cpp keeps in fp16: the cache, q and the weights
        return a.astype(np.float16).astype(np.float64)

    np.testing.assert_array_equal(cache_k[slots, pos], fp16(k))
    for t in range(8):
        same = [u for u in range(8) if slots[u] == slots[t] and pos[u] <= pos[t]]
        for h in range(n_heads):
            kk, vv = fp16(k[same, h // 2]), fp16(v[same, h // 2])
            s = kk @ fp16(q[t, h]) / np.sqrt(e)
            w = np.exp(s - s.max())
            np.testing.assert_allclose(out[t, h], fp16(w / w.sum()) @ vv, rtol=1e-4, atol=1e-5)


def test_swiglu_and_add():
    g = rng.standard_normal((3, 10)).astype(np.float32)
    u = rng.standard_normal((3, 10)).astype(np.float32)
    out = np.empty_like(g)
    ops.swiglu(g, u, out)
    np.testing.assert_allclose(out, g / (1 + np.exp(-g.astype(np.float64))) * u, rtol=1e-5, atol=1e-6)
    x = g.copy()
    ops.add(x, u)
    np.testing.assert_allclose(x, g + u)
