"""Device kernels for everything but the matrix products: norm, RoPE, KV store, attention, SwiGLU."""

from __future__ import annotations

import functools
import math

from numba import cuda, float32, float64, int32, uint32

from rbees_workerd.kernels.cuda.device import DEVICE, EXACT, JIT, SIM, block_max, block_sum, fp16_round, inv_rms

NORM_THREADS = 32 if SIM else 256  # the simulator runs a Python thread per GPU thread: keep blocks small
ATT_THREADS = 32 if SIM else 256  # a power of two, at least the head size (few in the slow simulator)
ATT_CHUNK = 1024  # positions whose scores one pass keeps in shared memory
# attention_seq_kernel's tiles: SEQ_QT queries per block (144 blocks for 512 tokens and 9 heads, more than the
# H200's 132 SMs), SEQ_KT cached positions per K/V tile; a thread scores SEQ_QR queries against
# SEQ_KT // SEQ_KG positions, so SEQ_QT // SEQ_QR * SEQ_KG threads. On the H200, 512 SmolLM2 tokens: 129 us
# per layer (attention_kernel 512 us); 16 or 64 queries, 32 positions or 4 x 4 scores a thread measured slower
SEQ_QT, SEQ_KT, SEQ_QR, SEQ_KG = (8, 16, 2, 8) if SIM else (32, 64, 2, 16)
SEQ_THREADS = SEQ_QT // SEQ_QR * SEQ_KG
SEQ_MIN_TOKENS = 2 if SIM else 16  # one sequence's tokens from which attention takes attention_seq_kernel
SEQ_MAX_E = 128  # the head sizes whose tiles fit in 48 KB of shared memory


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


@functools.cache
def attention_seq_kernel(e: int):  # noqa: ANN201
    """attention_kernel for T consecutive positions of one slot (a prompt chunk), head size e fixed when compiled.

    attention_kernel's one block per (token, head) reads each cached row once per query, a thread
    per position striding through it: for a long prompt the time goes to those uncoalesced reads.
    Here one block takes SEQ_QT queries of one head: each K/V tile of positions is read once per
    query tile, coalesced, into shared memory, and every query of the tile is scored against it;
    the next tile's loads are in flight while the scores of this one are computed. The rounding
    per query is attention_kernel's (and the CPU's); the three passes (max, float64 sum, weighted
    values) recompute the scores from the tiles rather than keeping a long context's scores.
    Grid (ceil(T / SEQ_QT), H); e a multiple of 8 up to SEQ_MAX_E.
    """
    kt = SEQ_KT if e <= 64 else SEQ_KT // 2  # a tile of SEQ_KT rows of 128 does not fit beside the rest
    kr = kt // SEQ_KG  # positions per thread in the scores
    qg = SEQ_QT // SEQ_QR  # query groups in the scores
    threads = SEQ_THREADS
    warps = threads // 32
    pq = SEQ_QT // warps  # queries per warp in the weighted sum; its lanes take the dimensions
    dr = -(-e // 32)  # dimensions per lane
    per = kt * e // threads  # tile elements per thread
    scale = float32(1.0 / math.sqrt(e))
    row, wrow = e + 1, kt + 1  # shared rows padded by one: a warp's strided reads hit distinct banks

    @cuda.jit(**DEVICE)
    def fetch(cache, s, g, c0, n, regs):
        """Start loading rows c0.. of cache[s, :, g, :] (those past n - 1 repeat it) into registers."""
        for u in range(per):
            i = cuda.threadIdx.x + threads * u
            regs[u] = cache[s, min(c0 + i // e, n - 1), g, i % e]

    @cuda.jit(**DEVICE)
    def stash(regs, tile):
        """The fetched rows into the shared tile, once every thread is done with its previous rows."""
        cuda.syncthreads()
        for u in range(per):
            i = cuda.threadIdx.x + threads * u
            tile[i // e, i % e] = regs[u]
        cuda.syncthreads()

    @cuda.jit(**DEVICE)
    def score(qs, ks, sc):
        """sc[r, u]: query a + qg * r against position b + SEQ_KG * u of the tile (a, b: this thread's)."""
        a = cuda.threadIdx.x // SEQ_KG
        b = cuda.threadIdx.x % SEQ_KG
        for r in range(SEQ_QR):
            for u in range(kr):
                sc[r, u] = float32(0.0)
        for i0 in range(0, e, 4):  # unsigned indices: Numba checks no negative-index wraparound
            for i1 in range(4):
                i = uint32(i0 + i1)
                for u in range(kr):
                    k = ks[uint32(b + SEQ_KG * u), i]
                    for r in range(SEQ_QR):
                        sc[r, u] += qs[uint32(a + qg * r), i] * k
        for r in range(SEQ_QR):
            for u in range(kr):
                sc[r, u] *= scale

    @cuda.jit(**DEVICE)
    def combine(vals, red, take_max):
        """Max or sum of each of this thread's queries' values over the SEQ_KG threads holding that query."""
        a = cuda.threadIdx.x // SEQ_KG
        for r in range(SEQ_QR):
            red[a + qg * r, cuda.threadIdx.x % SEQ_KG] = vals[r]
        cuda.syncthreads()
        for r in range(SEQ_QR):
            v = red[a + qg * r, 0]
            for b in range(1, SEQ_KG):
                v = max(v, red[a + qg * r, b]) if take_max else v + red[a + qg * r, b]
            vals[r] = v
        cuda.syncthreads()

    @cuda.jit(**JIT)
    def kernel(q, cache_k, cache_v, slots, positions, out):
        qs = cuda.shared.array((SEQ_QT, row), float32)
        kv = cuda.shared.array((kt, row), float32)  # the K tile, then in the last pass the V tile
        ws = cuda.shared.array((SEQ_QT, wrow), float32)
        red = cuda.shared.array((SEQ_QT, SEQ_KG), float64)
        regs = cuda.local.array(per, float32)
        sc = cuda.local.array((SEQ_QR, kr), float32)
        lim = cuda.local.array(SEQ_QR, int32)
        best = cuda.local.array(SEQ_QR, float32)
        total = cuda.local.array(SEQ_QR, float64)
        acc = cuda.local.array((pq, dr), float32)
        t0 = (cuda.gridDim.x - 1 - cuda.blockIdx.x) * SEQ_QT  # the longest contexts start first
        h = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        last = q.shape[0] - 1  # queries past it repeat the last one, and are not written
        g = h // (q.shape[1] // cache_k.shape[2])
        s = slots[t0]
        n = positions[min(t0 + SEQ_QT - 1, last)] + 1  # the positions the block's last query sees
        for u in range(SEQ_QT * e // threads):
            i = tid + threads * u
            qs[i // e, i % e] = fp16_round(q[min(t0 + i // e, last), h, i % e])
        a = tid // SEQ_KG
        b = tid % SEQ_KG
        for r in range(SEQ_QR):
            lim[r] = positions[min(t0 + a + qg * r, last)]
            best[r] = -math.inf
            total[r] = 0.0
        fetch(cache_k, s, g, 0, n, regs)
        for c0 in range(0, n, kt):
            stash(regs, kv)
            fetch(cache_k, s, g, c0 + kt, n, regs)
            score(qs, kv, sc)
            for r in range(SEQ_QR):
                for u in range(kr):
                    if c0 + b + SEQ_KG * u <= lim[r]:
                        best[r] = max(best[r], sc[r, u])
        combine(best, red, True)
        # the same pass for the float64 sum (one loop over both passes spills registers: kept apart)
        fetch(cache_k, s, g, 0, n, regs)
        for c0 in range(0, n, kt):
            stash(regs, kv)
            fetch(cache_k, s, g, c0 + kt, n, regs)
            score(qs, kv, sc)
            for r in range(SEQ_QR):
                for u in range(kr):
                    if c0 + b + SEQ_KG * u <= lim[r]:
                        total[r] += float32(math.exp(sc[r, u] - best[r]))
        combine(total, red, False)
        for i in range(pq):
            for m in range(dr):
                acc[i, m] = float32(0.0)
        w0 = tid // 32
        lane = tid % 32
        fetch(cache_k, s, g, 0, n, regs)
        for c0 in range(0, n, kt):
            stash(regs, kv)
            fetch(cache_v, s, g, c0, n, regs)
            score(qs, kv, sc)
            for r in range(SEQ_QR):
                inv = float32(1.0 / total[r])
                for u in range(kr):
                    w = float32(0.0)
                    if c0 + b + SEQ_KG * u <= lim[r]:
                        w = fp16_round(float32(math.exp(sc[r, u] - best[r])) * inv)
                    ws[a + qg * r, b + SEQ_KG * u] = w
            stash(regs, kv)  # the V tile
            fetch(cache_k, s, g, c0 + kt, n, regs)
            for j in range(min(kt, n - c0)):
                for i in range(pq):
                    w = ws[uint32(w0 + warps * i), uint32(j)]
                    for m in range(dr):
                        if lane + 32 * m < e:
                            acc[i, m] += w * kv[uint32(j), uint32(lane + 32 * m)]
        for i in range(pq):
            t = t0 + w0 + warps * i
            if t <= last:
                for m in range(dr):
                    if lane + 32 * m < e:
                        out[t, h, lane + 32 * m] = acc[i, m]

    return kernel


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
