"""Device kernels for everything but the matrix products: norm, RoPE, KV store, attention, SwiGLU."""

from __future__ import annotations

import math

from numba import cuda, float32, float64

from rbees_workerd.kernels.cuda.device import DEVICE, EXACT, JIT, SIM, block_max, block_sum, fp16_round, inv_rms

NORM_THREADS = 32 if SIM else 256  # the simulator runs a Python thread per GPU thread: keep blocks small
ATT_THREADS = 32 if SIM else 256  # a power of two, at least the head size (few in the slow simulator)
ATT_CHUNK = 1024  # positions whose scores one pass keeps in shared memory


@cuda.jit(**EXACT)
def rmsnorm_kernel(x, weight, eps, out):
    """One block per token; every warp computes the norm (inv_rms), exactly as the fused products do."""
    sh = cuda.shared.array(NORM_THREADS, float32)
    t = cuda.blockIdx.x
    d = x.shape[1]
    inv = inv_rms(x, t, eps, sh)
    cuda.syncthreads()  # out may be x: every warp has read it
    for i in range(cuda.threadIdx.x, d, NORM_THREADS):
        out[t, i] = x[t, i] * inv * weight[i]


@cuda.jit(**DEVICE)
def _rotate(x, t, h, p, pos, theta, neox):
    """Rotate pair p of x[t, h] by position pos; angles in float64 like the CPU."""
    e = x.shape[2]
    half = e // 2
    freq = float64(pos) * theta ** (-2.0 * p / e)
    c = float32(math.cos(freq))
    s = float32(math.sin(freq))
    a = p if neox else 2 * p
    b = p + half if neox else 2 * p + 1
    x0 = x[t, h, a]
    x1 = x[t, h, b]
    x[t, h, a] = x0 * c - x1 * s
    x[t, h, b] = x0 * s + x1 * c


@cuda.jit(**JIT)
def rope_kernel(x, positions, theta, neox):
    """x[T, heads, E] in place; one thread per (token, head, pair)."""
    i = cuda.grid(1)
    t_count, heads, e = x.shape
    half = e // 2
    if i < t_count * heads * half:
        t = i // (heads * half)
        _rotate(x, t, (i // half) % heads, i % half, positions[t], theta, neox)


@cuda.jit(**JIT)
def rope_store_kernel(q, k, v, cache_k, cache_v, slots, positions, theta, neox):
    """rope(q), rope(k) and the KV store of the step in one launch: one block per token."""
    t = cuda.blockIdx.x
    hq = q.shape[1]
    g_count, e = k.shape[1], k.shape[2]
    half = e // 2
    s = slots[t]
    pos = positions[t]
    n_rot = (hq + g_count) * half
    for i in range(cuda.threadIdx.x, n_rot + g_count * e, cuda.blockDim.x):
        if i < n_rot:
            h = i // half
            p = i % half
            if h < hq:
                _rotate(q, t, h, p, pos, theta, neox)
            else:
                h -= hq
                _rotate(k, t, h, p, pos, theta, neox)
                a = p if neox else 2 * p
                b = p + half if neox else 2 * p + 1
                cache_k[s, pos, h, a] = fp16_round(k[t, h, a])  # llama.cpp's cache is fp16
                cache_k[s, pos, h, b] = fp16_round(k[t, h, b])
        else:
            j = i - n_rot
            cache_v[s, pos, j // e, j % e] = fp16_round(v[t, j // e, j % e])


@cuda.jit(**JIT)
def kv_store_kernel(k, v, cache_k, cache_v, slots, positions):
    i = cuda.grid(1)
    t_count, g_count, e = k.shape
    if i < t_count * g_count * e:
        t = i // (g_count * e)
        g = (i // e) % g_count
        j = i % e
        cache_k[slots[t], positions[t], g, j] = fp16_round(k[t, g, j])  # llama.cpp's cache is fp16
        cache_v[slots[t], positions[t], g, j] = fp16_round(v[t, g, j])


@cuda.jit(**DEVICE)
def _scores(qs, cache_k, s, g, c0, c1, scale, scores, weights, best):
    """Scores of positions c0..c1 into shared memory (exp(score - best) when weights); this thread's max."""
    local = float32(-math.inf)
    for p in range(c0 + cuda.threadIdx.x, c1, ATT_THREADS):
        dot = float32(0.0)
        for i in range(cache_k.shape[3]):
            dot += qs[i] * cache_k[s, p, g, i]
        dot *= scale
        scores[p - c0] = math.exp(dot - best) if weights else dot
        local = max(local, dot)
    return local


@cuda.jit(**JIT)
def attention_kernel(q, cache_k, cache_v, slots, positions, out):
    """One block per (token, head), rounding like llama.cpp (and the CPU backend).

    The query and the softmax weights are rounded to fp16 values (the cache holds
    fp16 values already), the softmax sum is float64. Three passes over the
    positions (max, sum, weighted values) keep a chunk of scores in shared memory;
    a context longer than one chunk recomputes them. The weighted sum splits the
    positions among ATT_THREADS // E groups of E threads, summed at the end.
    """
    scores = cuda.shared.array(ATT_CHUNK, float32)
    sh = cuda.shared.array(ATT_THREADS, float32)
    sh64 = cuda.shared.array(ATT_THREADS, float64)
    qs = cuda.shared.array(ATT_THREADS, float32)
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    e = q.shape[2]
    g = h // (q.shape[1] // cache_k.shape[2])
    s = slots[t]
    n = positions[t] + 1
    one_chunk = n <= ATT_CHUNK
    parts = ATT_THREADS // e
    part = tid // e
    col = tid % e
    scale = float32(1.0 / math.sqrt(e))
    if tid < e:
        qs[tid] = fp16_round(q[t, h, tid])
    cuda.syncthreads()
    best = float32(-math.inf)
    for c0 in range(0, n, ATT_CHUNK):
        local = _scores(qs, cache_k, s, g, c0, min(n, c0 + ATT_CHUNK), scale, scores, False, best)
        best = max(best, block_max(local, sh))
    total = float64(0.0)
    for c0 in range(0, n, ATT_CHUNK):
        c1 = min(n, c0 + ATT_CHUNK)
        if one_chunk:
            for p in range(tid, c1, ATT_THREADS):
                scores[p] = math.exp(scores[p] - best)
        else:
            cuda.syncthreads()
            _scores(qs, cache_k, s, g, c0, c1, scale, scores, True, best)
        part_sum = float64(0.0)
        for p in range(c0 + tid, c1, ATT_THREADS):
            part_sum += scores[p - c0]
        total += block_sum(part_sum, sh64)  # also orders the score writes before the reads below
    inv = float32(1.0 / total)
    acc = float32(0.0)
    for c0 in range(0, n, ATT_CHUNK):
        c1 = min(n, c0 + ATT_CHUNK)
        if not one_chunk:
            cuda.syncthreads()
            _scores(qs, cache_k, s, g, c0, c1, scale, scores, True, best)
            cuda.syncthreads()
        if part < parts:
            for p in range(c0 + part, c1, parts):
                acc += fp16_round(scores[p - c0] * inv) * cache_v[s, p, g, col]
    sh[tid] = acc
    cuda.syncthreads()
    if tid < e:
        for i in range(1, parts):
            acc += sh[i * e + tid]
        out[t, h, tid] = acc


@cuda.jit(**JIT)
def swiglu_kernel(gate, up, out):
    i, j = cuda.grid(2)
    if i < gate.shape[0] and j < gate.shape[1]:
        g = gate[i, j]
        out[i, j] = g / (float32(1.0) + math.exp(-g)) * up[i, j]


@cuda.jit(**JIT)
def add_kernel(x, y):
    i, j = cuda.grid(2)
    if i < x.shape[0] and j < x.shape[1]:
        x[i, j] += y[i, j]


@cuda.jit(**JIT)
def add_bias_kernel(out, bias):
    i, j = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        out[i, j] += bias[j]


@cuda.jit(**JIT)
def gather_kernel(x, rows, out):
    i, j = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        out[i, j] = x[rows[i], j]
