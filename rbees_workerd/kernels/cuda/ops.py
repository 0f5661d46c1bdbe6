"""Device kernels for everything but the matrix products: embedding, q/k norms + RoPE + KV store, attention, SwiGLU."""

from __future__ import annotations

import functools
import math

from numba import cuda, float32, float64, int32, uint32

from rbees_workerd.kernels.cuda.device import DEVICE, JIT, SIM, fp16_round, grid_ready, warp_max, warp_sum
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
# attention_seq_kernel's tiles: SEQ_QT queries per block (144 blocks for 512 tokens and 9 heads, more than the
# H200's 132 SMs), SEQ_KT cached positions per K/V tile; a thread scores SEQ_QR queries against
# SEQ_KT // SEQ_KG positions, so SEQ_QT // SEQ_QR * SEQ_KG threads. On the H200, 512 SmolLM2 tokens: 129 us
# per layer (attention_kernel 512 us); 16 or 64 queries, 32 positions or 4 x 4 scores a thread measured slower
SEQ_QT, SEQ_KT, SEQ_QR, SEQ_KG = (8, 16, 2, 8) if SIM else (32, 64, 2, 16)
SEQ_THREADS = SEQ_QT // SEQ_QR * SEQ_KG
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
                cache_k[s, pos, h, a] = fp16_round(k[t, h, a])  # llama.cpp's cache is fp16
                cache_k[s, pos, h, b] = fp16_round(k[t, h, b])
        else:
            j = i - n_rot
            cache_v[s, pos, j // e, j % e] = fp16_round(v[t, j // e, j % e])


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
    """attention_kernel's K tile (positions of about 32 KB of shared memory) and the V rows a warp loads a
    batch (fewer for wider heads and for several heads a block: registers), both powers of two; None
    where the scores and the tile do not fit in shared memory."""
    kt = min(ATT_KT, 1 << (ATT_KT * 64 // e).bit_length() - 1)
    kt = max(kt, 1 << (ATT_WARPS * r - 1).bit_length())  # the warps' parts of the output fit in the tile
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
def _dot_row(e: int, r: int):  # noqa: ANN202
    """A device function dot[j] += qs[j, i] * ks[row, i] for i = 0 .. e - 1 in order and j < r, written out:
    Numba keeps a loop over e (not unrolled), whose index arithmetic costs more than the products."""
    lines = ["def dot_row(ks, qs, row, dot):"]
    for i in range(e):
        lines.append(f"    k = ks[row, {i}]")
        lines += [f"    dot[{j}] += qs[{j}, {i}] * k" for j in range(r)]
    scope: dict = {}
    exec("\n".join(lines), scope)  # noqa: S102 - generated from the two integers above
    return cuda.jit(**DEVICE)(scope["dot_row"])


@functools.cache
def attention_kernel(e: int, r: int = 1, scale: float | None = None):  # noqa: ANN201, C901
    """Per-token attention (decode, or the tokens of several sequences), head size e fixed when compiled.

    One block of ATT_THREADS per token and r query heads of one KV head (r = 1, or all the heads
    sharing it: their K/V rows are then read once), rounding like llama.cpp and the CPU backend:
    the query and the softmax weights rounded to fp16 values (the cache holds fp16 values
    already), scores dot * (1 / sqrt(e)) in float32, the softmax sum in float64.
    Scores: K tiles of kt positions are read coalesced (a warp a row) into shared memory, the next
    tile's loads in flight while this one is scored, and one thread scores one position against
    the r queries, summing over the dimensions in order like the CPU and attention_seq_kernel.
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
    dot_row = _dot_row(e, r)
    scale = float32(1.0 / math.sqrt(e) if scale is None else scale)

    @cuda.jit(**DEVICE)
    def load_rows(cache, sg, p0, stride, last, rows, regs, u0):
        """Start loading rows p0 + w + stride * u of cache[s, :, g] (sg = (s, g); none past last) into
        regs[u0 + u]: warp w's rows, its lanes across the dimensions."""
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
                    ks[uint32(w + warps * u), uint32(lane + 32 * m)] = regs[u, m]
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
        regs = cuda.local.array((kr, dr), float32)
        qv = cuda.local.array(qper, float32)
        vb = cuda.local.array((vrows2, dr), float32)  # this batch's V rows, then the next batch's
        dot = cuda.local.array(r, float32)
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
                        p = t0 + tid
                        if tid < kt and p < c1:
                            for j in range(r):
                                dot[j] = float32(0.0)
                            dot_row(ks, qs, tid, dot)
                            for j in range(r):
                                score = dot[j] * scale
                                if sweep == 0:
                                    sc[j, uint32(p - c0)] = score
                                    best[j] = max(best[j], score)
                                else:
                                    sc[j, uint32(p - c0)] = math.exp(score - best[j])
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
                                    wt = sc[j, uint32(p - c0)]
                                    for m in range(dr):
                                        acc[j, m] += wt * vb[u, m]
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
def attention_seq_kernel(e: int, scale: float | None = None):  # noqa: ANN201
    """attention_kernel for T consecutive positions of one slot (a prompt chunk), head size e fixed when compiled.

    attention_kernel's one block per (token, head) reads each cached row once per query, a thread
    per position striding through it: for a long prompt the time goes to those uncoalesced reads.
    Here one block takes SEQ_QT queries of one head: each K/V tile of positions is read once per
    query tile, coalesced, into shared memory, and every query of the tile is scored against it;
    the next tile's loads are in flight while the scores of this one are computed. The rounding
    per query is attention_kernel's (and the CPU's); the three passes (max, float64 sum, weighted
    values) recompute the scores from the tiles rather than keeping a long context's scores.
    Grid (ceil(T / SEQ_QT), H); e a multiple of 8 up to SEQ_MAX_E. Scores scaled by `scale` (None: 1 / sqrt(e)).
    """
    kt = SEQ_KT if e <= 64 else SEQ_KT // 2  # a tile of SEQ_KT rows of 128 does not fit beside the rest
    kr = kt // SEQ_KG  # positions per thread in the scores
    qg = SEQ_QT // SEQ_QR  # query groups in the scores
    threads = SEQ_THREADS
    warps = threads // 32
    pq = SEQ_QT // warps  # queries per warp in the weighted sum; its lanes take the dimensions
    dr = -(-e // 32)  # dimensions per lane
    per = kt * e // threads  # tile elements per thread
    scale = float32(1.0 / math.sqrt(e) if scale is None else scale)
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
        grid_ready()
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
        g = gate[i, j]
        out[i, j] = g / (float32(1.0) + math.exp(-g)) * up[i, j]


@cuda.jit(**JIT)
def gather_kernel(x, rows, out):
    grid_ready()
    i, j = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        out[i, j] = x[rows[i], j]
