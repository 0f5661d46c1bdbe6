"""Device kernels for everything but the matrix products: embedding, q/k norms + RoPE + KV store, attention, SwiGLU."""

from __future__ import annotations

import functools
import math

from numba import cuda, float32, float64, int32, uint32

from rbees_workerd.kernels.cuda.device import (
    DEVICE,
    JIT,
    SIM,
    f16_bits,
    fp16_round,
    grid_ready,
    half_to_f32,
    mma_f16,
    pack_f16,
    quad_max,
    quad_sum,
    silu_mul,
    warp_max,
    warp_sum,
)  # fmt: skip
from rbees_workerd.kernels.cuda.formats import OFFSET, decode, elem

# attention_kernel: ATT_THREADS a block (a multiple of 32; two warps in the slow simulator), K tiles of ATT_KT
# positions up to head size 64 (fewer for larger heads), up to ATT_VROWS V rows a warp in flight in the weighted
# sum, the scores of ATT_CHUNK positions kept in shared memory (a longer context recomputes them chunk by chunk;
# the simulator's tile and chunk are small so that the tests reach several tiles and chunks)
ATT_THREADS = 64 if SIM else 256
ATT_WARPS = ATT_THREADS // 32
ATT_KT = 16 if SIM else 128
ATT_VROWS = 2 if SIM else 8
ATT_CHUNK = 32 if SIM else 1024
ATT_SHARED = 46 * 1024  # bytes of the K tile and the scores together (static shared memory stops at 48 KB)
ATT_MAX_E = 256
ATT_GROUP_MIN_BLOCKS = 128  # blocks of (token, KV head) from which a block serves all query heads of its KV head
_ATT_FIT = {} if SIM else {"max_registers": 65536 // (2 * ATT_THREADS)}  # two blocks an SM, without spills (ptxas)
# attention_seq_kernel's tiles: SEQ_QT queries per block (16 a warp), SEQ_KT cached positions per K/V tile
SEQ_WARPS = 1 if SIM else 4
SEQ_QT, SEQ_KT = 16 * SEQ_WARPS, 16 if SIM else 64
SEQ_THREADS = 32 * SEQ_WARPS
SEQ_SCRATCH = SEQ_THREADS if SIM else 1  # (the simulator's mma and quad reductions exchange through it)
SEQ_MIN_TOKENS = 2 if SIM else 16  # one sequence's tokens from which attention takes attention_seq_kernel
SEQ_MAX_E = 128  # the head sizes whose tiles fit in 48 KB of shared memory


ROPE_MAX_HEADS = 256  # q and k heads of a token in rope_store_kernel (its shared row of q/k norm scales)


@cuda.jit(**DEVICE)
def _rotate(x, t, h, a, b, c, s, inv, w, head_norm, after):
    """Rotate the pair (a, b) of x[t, h] by cos c and sin s, first normalizing it (head_norm: times
    the head's inverse RMS inv and the norm weights w[a], w[b]), then scale it by `after`."""
    x0 = x[t, h, a]
    x1 = x[t, h, b]
    if head_norm:
        x0 = x0 * inv * w[a]
        x1 = x1 * inv * w[b]
    x[t, h, a] = (x0 * c - x1 * s) * after
    x[t, h, b] = (x0 * s + x1 * c) * after


@cuda.jit(**DEVICE)
def _head_scale(x, t, h, e, eps):
    """1 / RMS of x[t, h, :e] (+ eps), like the CPU's rmsnorm."""
    ss = float32(0.0)
    for i in range(e):
        ss += x[t, h, i] * x[t, h, i]
    return float32(1.0 / math.sqrt(ss / e + eps))


@cuda.jit(**JIT)
def rope_store_kernel(q, k, v, cache_k, cache_v, slots, positions, cos_t, sin_t, neox, qn, kn, eps, head_norm,
                      q_scale):  # fmt: skip
    """The q/k head norms (head_norm: qwen3's, weights qn and kn [E]), rope(q) (times q_scale), rope(k)
    and the KV store of the step in one launch: one block per token. cos_t/sin_t[position, pair]: the
    angles (backend.rope_table)."""
    grid_ready()
    inv = cuda.shared.array(ROPE_MAX_HEADS, float32)  # per q head then k head: 1 / RMS
    t = cuda.blockIdx.x
    hq = q.shape[1]
    g_count, e = k.shape[1], k.shape[2]
    half = e // 2
    s = slots[t]
    pos = positions[t]
    if head_norm:
        for h in range(cuda.threadIdx.x, hq + g_count, cuda.blockDim.x):
            if h < hq:
                inv[h] = _head_scale(q, t, h, e, eps)
            else:
                inv[h] = _head_scale(k, t, h - hq, e, eps)
        cuda.syncthreads()
    n_rot = (hq + g_count) * half
    for i in range(cuda.threadIdx.x, n_rot + g_count * e, cuda.blockDim.x):
        if i < n_rot:
            h = i // half
            p = i % half
            a = p if neox else 2 * p
            b = p + half if neox else 2 * p + 1
            c = cos_t[pos, p]
            sn = sin_t[pos, p]
            scale = inv[h] if head_norm else float32(1.0)
            if h < hq:
                _rotate(q, t, h, a, b, c, sn, scale, qn, head_norm, q_scale)
            else:
                h -= hq
                _rotate(k, t, h, a, b, c, sn, scale, kn, head_norm, float32(1.0))
                cache_k[s, pos, h, a] = f16_bits(k[t, h, a])  # float16, as llama.cpp's cache
                cache_k[s, pos, h, b] = f16_bits(k[t, h, b])
        else:
            j = i - n_rot
            cache_v[s, pos, j // e, j % e] = f16_bits(v[t, j // e, j % e])


@cuda.jit(**DEVICE)
def _across_warps(vals, red, scratch, r, take_max):
    """vals[j] (j < r) becomes the maximum, or the sum, of every thread's vals[j] in the block: warp
    shuffles, then one exchange of the ATT_WARPS warps' results through red[r, ATT_WARPS], in warp order."""
    w = cuda.threadIdx.x // 32
    for j in range(r):
        v = warp_max(vals[j], scratch) if take_max else warp_sum(vals[j], scratch)
        if cuda.threadIdx.x % 32 == 0:
            red[j, w] = v
    cuda.syncthreads()
    for j in range(r):
        v = red[j, 0]
        for i in range(1, ATT_WARPS):
            v = max(v, red[j, i]) if take_max else v + red[j, i]
        vals[j] = v


def _att_shape(e: int, r: int) -> tuple[int, int] | None:
    """attention_kernel's K tile (positions of about 32 KB of shared memory, halved while r heads' scores
    leave it too little) and the V rows a warp loads a batch (fewer for wider heads and for several heads a
    block: registers), both powers of two; None where the scores and the tile do not fit in shared memory."""
    kt = min(ATT_KT, 1 << (ATT_KT * 64 // e).bit_length() - 1)
    least = 1 << (ATT_WARPS * r - 1).bit_length()  # the warps' parts of the output fit in the tile
    kt = max(kt, least)
    while kt > least and r * ATT_CHUNK * 4 + kt * (e + 1) * 4 > ATT_SHARED:
        kt //= 2  # (Llama 3's 4 heads of 128 a block: a tile of 32 positions beside the scores)
    budget = (ATT_VROWS * 4 if r == 1 else ATT_VROWS * 2) // (1 if e % 32 == 0 else 2)  # V registers a thread
    vrows = 1 << max(1, min(ATT_VROWS, budget // (2 * -(-e // 32)))).bit_length() - 1
    if r * ATT_CHUNK * 4 + kt * (e + 1) * 4 > ATT_SHARED or ATT_CHUNK % kt or ATT_CHUNK % (ATT_WARPS * vrows):
        return None
    return kt, vrows


def attention_heads_per_block(t_count: int, heads: int, kv_heads: int, e: int) -> int:
    """The query heads one attention_kernel block serves: all of a KV head's, once the blocks of
    (token, KV head) fill the GPU and their scores fit in shared memory; else one (more blocks, shorter ones)."""
    group = heads // kv_heads
    fits = _att_shape(e, group) is not None
    return group if group > 1 and fits and t_count * kv_heads >= ATT_GROUP_MIN_BLOCKS else 1


@functools.cache
def _dot_row(e: int):  # noqa: ANN202
    """A device function: the sum of qs[j, i] * ks[row, i] for i = 0 .. e - 1, in order, written out: Numba
    keeps a loop over e (not unrolled), whose index arithmetic costs more than the products."""
    lines = ["def dot_row(ks, qs, row, j):", "    d = qs[j, 0] * ks[row, 0]"]
    lines += [f"    d += qs[j, {i}] * ks[row, {i}]" for i in range(1, e)]
    lines.append("    return d")
    scope: dict = {}
    exec("\n".join(lines), scope)  # noqa: S102 - generated from the integer above
    return cuda.jit(**DEVICE)(scope["dot_row"])


@cuda.jit(**DEVICE)
def _pick(vals, r, j):
    """vals[j] of a local array of r values, by selects: an index not known when compiled would move the
    array to local memory."""
    v = vals[0]
    for i in range(1, r):
        if i == j:
            v = vals[i]
    return v


@functools.cache
def attention_kernel(e: int, r: int = 1, scale: float | None = None):  # noqa: ANN201, C901
    """Per-token attention (decode, or the tokens of several sequences), head size e fixed when compiled.

    One block of ATT_THREADS per token and r query heads of one KV head (r = 1, or all the heads
    sharing it: their K/V rows are then read once), rounding like llama.cpp and the CPU backend:
    the query and the softmax weights rounded to fp16 values (the cache holds fp16 values
    already), scores dot * (1 / sqrt(e)) in float32, the softmax sum in float64.
    Scores: K tiles of kt positions are read coalesced (a warp a row) into shared memory, the next
    tile's loads in flight while this one is scored, and one thread scores one position against
    one of the r queries, summing over the dimensions in order like the CPU and attention_seq_kernel.
    Max and sum reduce through warp shuffles and one exchange between the warps. Weighted sum:
    lanes across the dimensions, each warp vrows positions a batch, the next batch's loads in
    flight; the first batch of V rows loads with the first K tile, the second once the scores are
    done. The warps' parts are summed in order at the end. A context longer than ATT_CHUNK
    positions takes three sweeps over its chunks (max, sum, weighted sum), recomputing the scores.
    Grid (T, H // r), r dividing H // G. The scores are scaled by `scale` (None: 1 / sqrt(e)).
    """
    shape = _att_shape(e, r)
    if shape is None:
        raise ValueError(f"no attention kernel for head size {e} with {r} heads a block")
    kt, vrows = shape
    nt, warps, ch = ATT_THREADS, ATT_WARPS, ATT_CHUNK
    row = e + 1  # shared rows padded by one: a warp's strided reads hit distinct banks
    dr = -(-e // 32)  # dimensions a lane takes in the loads and the weighted sum
    kr = kt // warps  # tile rows a warp loads
    qper = -(-r * e // nt)
    step = warps * vrows  # positions of one batch of the weighted sum
    vrows2 = 2 * vrows
    full = e % 32 == 0
    scratch_n = nt if SIM else 1  # the simulator's warp reductions go through shared memory
    dot_row = _dot_row(e)
    scale = float32(1.0 / math.sqrt(e) if scale is None else scale)

    @cuda.jit(**DEVICE)
    def load_rows(cache, sg, p0, stride, last, rows, regs, u0):
        """Start loading rows p0 + w + stride * u of cache[s, :, g] (sg = (s, g); none past last) into
        regs[u0 + u]: warp w's rows, its lanes across the dimensions, as the cache's float16 bits (made floats
        where they are used: a conversion here would wait for the load, which must stay in flight)."""
        w = uint32(cuda.threadIdx.x) // 32
        lane = uint32(cuda.threadIdx.x) % 32
        kv = cache[sg[0], :, sg[1]]  # [position, dimension]: one multiply a row
        for u in range(rows):
            p = uint32(p0 + w + stride * u)  # 32-bit, like last; rows past it stay unread
            if p <= last:
                for m in range(dr):
                    if full or lane + 32 * m < e:
                        regs[u0 + u, m] = kv[p, uint32(lane + 32 * m)]

    @cuda.jit(**DEVICE)
    def stash(regs, ks):
        """The fetched K rows into the shared tile, once every thread is done with the previous tile."""
        w = uint32(cuda.threadIdx.x) // 32
        lane = uint32(cuda.threadIdx.x) % 32
        cuda.syncthreads()
        for u in range(kr):
            for m in range(dr):
                if full or lane + 32 * m < e:
                    ks[uint32(w + warps * u), uint32(lane + 32 * m)] = half_to_f32(regs[u, m])
        cuda.syncthreads()

    @cuda.jit(**JIT, **_ATT_FIT)
    def kernel(q, cache_k, cache_v, slots, positions, out):
        grid_ready()
        ks = cuda.shared.array((kt, row), float32)  # the K tile; at the end the warps' parts of the output
        qs = cuda.shared.array((r, e), float32)
        sc = cuda.shared.array((r, ch), float32)  # scores, then exp(score - max), then the weights
        red = cuda.shared.array((r, warps), float32)
        red64 = cuda.shared.array((r, warps), float64)
        scratch = cuda.shared.array(scratch_n, float32)
        scratch64 = cuda.shared.array(scratch_n, float64)
        regs = cuda.local.array((kr, dr), uint32)  # the next K tile's float16 bits
        qv = cuda.local.array(qper, float32)
        vb = cuda.local.array((vrows2, dr), uint32)  # this batch's V rows' float16 bits, then the next batch's
        wt = cuda.local.array(r, float32)
        best = cuda.local.array(r, float32)
        inv = cuda.local.array(r, float32)
        tot = cuda.local.array(r, float64)
        acc = cuda.local.array((r, dr), float32)
        t = uint32(cuda.blockIdx.x)
        h0 = uint32(cuda.blockIdx.y) * r
        tid = uint32(cuda.threadIdx.x)
        w = tid // 32
        lane = tid % 32
        for u in range(qper):
            i = tid + nt * u
            if i < r * e:
                qv[u] = q[t, uint32(h0 + i // e), uint32(i % e)]
        g = uint32(h0 // uint32(q.shape[1] // cache_k.shape[2]))
        s = uint32(slots[t])
        n = positions[t] + 1
        single = n <= ch
        last = uint32(n - 1)
        sg = (s, g)
        load_rows(cache_k, sg, 0, warps, last, kr, regs, 0)  # the first K tile and V batch load
        load_rows(cache_v, sg, 0, warps, last, vrows, vb, 0)  # while the query is rounded
        for u in range(qper):
            i = tid + nt * u
            if i < r * e:
                qs[uint32(i // e), uint32(i % e)] = fp16_round(qv[u])  # the tile's barriers order these first
        for j in range(r):
            best[j] = -math.inf
            tot[j] = 0.0
            for m in range(dr):
                acc[j, m] = float32(0.0)
        for sweep in range(3):  # max, sum, weighted sum; a single chunk is scored once
            for c0 in range(0, n, ch):
                c1 = min(n, c0 + ch)
                if sweep == 0 or not single:
                    for t0 in range(c0, c1, kt):
                        stash(regs, ks)
                        nxt = t0 + kt  # the next tile to score loads while this one is
                        if nxt >= n and sweep < 2 and not single:
                            nxt = 0
                        if nxt < n:
                            load_rows(cache_k, sg, nxt, warps, last, kr, regs, 0)
                        for i in range(tid, kt * r, nt):  # a thread a (position, head) of the tile
                            pos = i % kt
                            jj = i // kt
                            p = t0 + pos
                            if p < c1:
                                score = dot_row(ks, qs, pos, jj) * scale
                                if sweep == 0:
                                    sc[jj, uint32(p - c0)] = score
                                    for j in range(r):
                                        if j == jj:
                                            best[j] = max(best[j], score)
                                else:
                                    sc[jj, uint32(p - c0)] = math.exp(score - _pick(best, r, jj))
                    if sweep > 0:
                        cuda.syncthreads()  # below, a thread takes other positions than it scored
                if sweep == 1:
                    for p in range(tid, c1 - c0, nt):
                        for j in range(r):
                            x = sc[j, uint32(p)]
                            if single:  # sc still holds the scores
                                x = float32(math.exp(x - best[j]))  # (the simulator's exp is float64)
                                sc[j, uint32(p)] = x
                            tot[j] += x
                if sweep == 2:
                    for p in range(tid, c1 - c0, nt):  # single: the same thread wrote these exponentials
                        for j in range(r):
                            sc[j, uint32(p)] = fp16_round(sc[j, uint32(p)] * inv[j])
                    cuda.syncthreads()
                    for b0 in range(c0, c1, step):  # batches run on across chunks: ch is a multiple of step
                        for u in range(vrows):
                            p = b0 + w + warps * u
                            if p < c1:
                                for j in range(r):
                                    wt[j] = sc[j, uint32(p - c0)]
                                for m in range(dr):
                                    vv = half_to_f32(vb[u, m])
                                    for j in range(r):
                                        acc[j, m] += wt[j] * vv
                        for u in range(vrows):
                            for m in range(dr):
                                vb[u, m] = vb[vrows + u, m]
                        if b0 + 2 * step < n:
                            load_rows(cache_v, sg, b0 + 2 * step, warps, last, vrows, vb, vrows)
            if sweep == 0:
                load_rows(cache_v, sg, step, warps, last, vrows, vb, vrows)  # the second V batch, meanwhile
                _across_warps(best, red, scratch, r, True)
            if sweep == 1:
                _across_warps(tot, red64, scratch64, r, False)
                for j in range(r):
                    inv[j] = float32(1.0 / tot[j])
        for j in range(r):  # ks is free: the last tile was scored before the barriers above
            for m in range(dr):
                if full or lane + 32 * m < e:
                    ks[uint32(w * r + j), uint32(lane + 32 * m)] = acc[j, m]
        cuda.syncthreads()
        for i in range(tid, r * e, nt):
            j = uint32(i // e)
            col = uint32(i % e)
            o = ks[j, col]
            for k in range(1, warps):
                o += ks[uint32(k * r + j), col]
            out[t, uint32(h0 + j), col] = o

    return kernel


@functools.cache
def attention_seq_kernel(e: int, scale: float | None = None):  # noqa: ANN201, C901
    """attention_kernel for T consecutive positions of one slot (a prompt chunk) on the tensor cores, head
    size e (a multiple of 16 up to SEQ_MAX_E) fixed when compiled.

    One block takes SEQ_QT queries of one head, a warp 16 of them. Each K/V tile of SEQ_KT cached positions
    (fewer for heads over 64) is read once per block, coalesced, into shared memory as float16 pairs: the
    cache holds fp16 values and the queries are rounded to fp16 as attention_kernel does, so the products
    are exact and only the order of the float32 sums differs. Scores are mma_f16 products of a warp's query
    fragments (kept in registers) and the K tile; the weights, rounded to fp16 as attention_kernel rounds
    them, are the A fragments of the product with the V tile, staged transposed (a B fragment is then one
    word). The rounding per query is attention_kernel's (and the CPU's): three passes (max, float64 sum,
    weighted values) that recompute the scores from the tiles. Grid (ceil(T / SEQ_QT), H). Scores scaled by
    `scale` (None: 1 / sqrt(e)).
    """
    kt = SEQ_KT if e <= 64 else max(16, SEQ_KT // 2)  # (a tile's scores and the output stay in registers)
    ks = e // 16  # k-steps of a score product
    nt = kt // 8  # 8-position tiles of a K tile
    me = e // 8  # 8-dimension tiles of the output
    kp = e // 2 + 4  # a staged K row's words (= 4 mod 8: a warp's fragment loads hit 32 banks)
    vp = kt // 2 + 4  # a staged V column's words (the same)
    threads = SEQ_THREADS
    k_per = kt * (e // 2) // threads  # K words a thread stages
    v_per = (kt // 2) * e // threads  # V words a thread stages
    assert e % 16 == 0 and e <= SEQ_MAX_E and k_per * threads == kt * (e // 2)
    scale = float32(1.0 / math.sqrt(e) if scale is None else scale)
    q_n, s_n, o_n, k_size, v_size = 4 * ks, 4 * nt, 4 * me, kt * kp, e * vp

    @cuda.jit(**DEVICE)
    def stage_k(cache, s, g, c0, n, ksh):
        """Positions c0 .. c0 + kt - 1 of cache[s, :, g, :] (those past n - 1 repeat it) into ksh as fp16 pairs."""
        cuda.syncthreads()  # (every warp is done with the tile before)
        for u in range(k_per):
            i = cuda.threadIdx.x + threads * u
            row = i // (e // 2)
            d = 2 * (i % (e // 2))
            pos = min(c0 + row, n - 1)
            ksh[row * kp + d // 2] = uint32(cache[s, pos, g, d]) | uint32(cache[s, pos, g, d + 1]) << uint32(16)
        cuda.syncthreads()

    @cuda.jit(**DEVICE)
    def stage_v(cache, s, g, c0, n, vt):
        """The same positions of the V cache, transposed: vt[d * vp + j] holds dimension d of positions 2 j, 2 j + 1."""
        for u in range(v_per):
            i = cuda.threadIdx.x + threads * u
            d = i % e
            j = i // e
            lo, hi = min(c0 + 2 * j, n - 1), min(c0 + 2 * j + 1, n - 1)
            vt[d * vp + j] = uint32(cache[s, lo, g, d]) | uint32(cache[s, hi, g, d]) << uint32(16)
        cuda.syncthreads()

    @cuda.jit(**DEVICE)
    def scores(qf, ksh, sc, scratch):
        """sc[4 j ..]: the scaled scores of this lane's two queries, tile positions 8 j + 2 (lane % 4) and + 1."""
        lane = cuda.threadIdx.x % 32
        gq = lane // 4
        tq = lane % 4
        for j in range(nt):
            c0 = c1 = c2 = c3 = float32(0.0)
            for kk in range(ks):
                at = (8 * j + gq) * kp + 8 * kk + tq
                c0, c1, c2, c3 = mma_f16(qf[4 * kk], qf[4 * kk + 1], qf[4 * kk + 2], qf[4 * kk + 3], ksh[at],
                                         ksh[at + 4], c0, c1, c2, c3, scratch)  # fmt: skip
            sc[4 * j] = c0 * scale
            sc[4 * j + 1] = c1 * scale
            sc[4 * j + 2] = c2 * scale
            sc[4 * j + 3] = c3 * scale

    @cuda.jit(**DEVICE)
    def seen(c0, i, lim):
        """Whether sc[i] (scores' order) is a position this lane's query of it sees (lim: their positions)."""
        return c0 + 8 * (i // 4) + 2 * (cuda.threadIdx.x % 4) + i % 2 <= lim[(i % 4) // 2]

    @cuda.jit(**JIT)
    def kernel(q, cache_k, cache_v, slots, positions, out):
        grid_ready()
        ksh = cuda.shared.array(k_size, uint32)
        vt = cuda.shared.array(v_size, uint32)
        scratch = cuda.shared.array((SEQ_SCRATCH, 6), uint32)
        red = cuda.shared.array(SEQ_SCRATCH, float64)
        qf = cuda.local.array(q_n, uint32)
        sc = cuda.local.array(s_n, float32)
        oacc = cuda.local.array(o_n, float32)
        lim = cuda.local.array(2, int32)
        best = cuda.local.array(2, float32)
        total = cuda.local.array(2, float64)
        inv = cuda.local.array(2, float32)
        tid = cuda.threadIdx.x
        lane = tid % 32
        gq = lane // 4
        tq = lane % 4
        t0 = (cuda.gridDim.x - 1 - cuda.blockIdx.x) * SEQ_QT  # the longest contexts start first
        h = cuda.blockIdx.y
        last = q.shape[0] - 1  # queries past it repeat the last one, and are not written
        g = h // (q.shape[1] // cache_k.shape[2])
        s = slots[t0]
        n = positions[min(t0 + SEQ_QT - 1, last)] + 1  # the positions the block's last query sees
        tw = t0 + 16 * (tid // 32)  # the warp's first query; this lane's: tw + gq and tw + gq + 8
        for r in range(2):
            t = min(tw + gq + 8 * r, last)
            lim[r] = positions[t]
            best[r] = -math.inf
            total[r] = 0.0
            for kk in range(ks):
                d = 16 * kk + 2 * tq
                qf[4 * kk + r] = pack_f16(q[t, h, d], q[t, h, d + 1])
                qf[4 * kk + 2 + r] = pack_f16(q[t, h, d + 8], q[t, h, d + 9])
        for c0 in range(0, n, kt):  # pass 1: each query's largest score
            stage_k(cache_k, s, g, c0, n, ksh)
            scores(qf, ksh, sc, scratch)
            for i in range(s_n):
                if seen(c0, i, lim):
                    best[(i % 4) // 2] = max(best[(i % 4) // 2], sc[i])
        for r in range(2):
            best[r] = quad_max(best[r], red)
        for c0 in range(0, n, kt):  # pass 2: the float64 sum of the exponentials
            stage_k(cache_k, s, g, c0, n, ksh)
            scores(qf, ksh, sc, scratch)
            for i in range(s_n):
                if seen(c0, i, lim):
                    total[(i % 4) // 2] += float32(math.exp(sc[i] - best[(i % 4) // 2]))
        for r in range(2):
            inv[r] = float32(1.0 / quad_sum(total[r], red))
        for i in range(o_n):
            oacc[i] = float32(0.0)
        for c0 in range(0, n, kt):  # pass 3: the fp16 weights times the V tile
            stage_k(cache_k, s, g, c0, n, ksh)
            stage_v(cache_v, s, g, c0, n, vt)
            scores(qf, ksh, sc, scratch)
            for i in range(s_n):  # (the weights, in the scores' place)
                r = (i % 4) // 2
                sc[i] = float32(math.exp(sc[i] - best[r])) * inv[r] if seen(c0, i, lim) else float32(0.0)
            for kk in range(nt // 2):  # 16 positions a step: the A fragment is two score tiles' weights
                a0 = pack_f16(sc[8 * kk], sc[8 * kk + 1])
                a1 = pack_f16(sc[8 * kk + 2], sc[8 * kk + 3])
                a2 = pack_f16(sc[8 * kk + 4], sc[8 * kk + 5])
                a3 = pack_f16(sc[8 * kk + 6], sc[8 * kk + 7])
                for m in range(me):
                    at = (8 * m + gq) * vp + 8 * kk + tq
                    oacc[4 * m], oacc[4 * m + 1], oacc[4 * m + 2], oacc[4 * m + 3] = mma_f16(
                        a0, a1, a2, a3, vt[at], vt[at + 4], oacc[4 * m], oacc[4 * m + 1], oacc[4 * m + 2],
                        oacc[4 * m + 3], scratch)  # fmt: skip
        for r in range(2):
            t = tw + gq + 8 * r
            if t <= last:
                for m in range(me):
                    out[t, h, 8 * m + 2 * tq] = oacc[4 * m + 2 * r]
                    out[t, h, 8 * m + 2 * tq + 1] = oacc[4 * m + 2 * r + 1]

    return kernel


@functools.cache
def embed_kernel(qt: int):  # noqa: ANN201
    """out[t, :] = dequantized row tokens[t] of a matrix of weight type qt; grid (T, ceil(items / blockDim))."""
    off = float32(OFFSET.get(qt, 0.0))

    @cuda.jit(**JIT)
    def kernel(words, gs, sb, tokens, out):
        grid_ready()
        wv = cuda.local.array(8, float32)
        t = cuda.blockIdx.x
        it = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if it < (out.shape[1] // 32) * 4:
            g = it // 4
            q = it % 4
            decode(qt, words, gs, sb, off, tokens[t], g, q, wv, True)
            for j in range(8):
                out[t, g * 32 + elem(qt, q, j)] = wv[j]

    return kernel


@cuda.jit(**JIT)
def swiglu_kernel(gate, up, out):
    grid_ready()
    i, j = cuda.grid(2)
    if i < gate.shape[0] and j < gate.shape[1]:
        out[i, j] = silu_mul(gate[i, j], up[i, j])


@cuda.jit(**JIT)
def gather_kernel(x, rows, out):
    grid_ready()
    i, j = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        out[i, j] = x[rows[i], j]
