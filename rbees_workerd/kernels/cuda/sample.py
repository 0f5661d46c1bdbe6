"""Token sampling on the device; only the chosen ids go to the host.

Greedy rows (temperature 0, no penalty history) take `argmax_kernel`: several
blocks per row, each the maximum of a slice as one 64-bit key (the value's
order-preserving bits, then the inverted id, so the lowest id wins ties and the
result is the same in any order), combined by an atomic maximum per row; the
row's last block to finish writes the id and resets the row's maximum and count.

The other rows take `sample_kernel`, one block per row. Its filters follow
`Backend.sample` (and `engine.sampling`) in order. Instead of sorting the
vocabulary, each cut is a binary search over the float bits of a threshold
(32 block-wide passes over the row): the k-th largest logit for top-k, the
smallest probability of the top-p prefix, and finally the token at which the
cumulative probability in descending order passes `uniform`. Ties at a
threshold are kept together (a sort would split them by id).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32, int64, uint32, uint64

from rbees_workerd.kernels.backend import SamplingRow
from rbees_workerd.kernels.cuda.device import (
    DEVICE,
    JIT,
    SIM,
    UNROLL,
    bits_from_f32,
    block_sum,
    f32_from_bits,
    grid_ready,
    warp_max,
)

THREADS = 32 if SIM else 1024
HEAD = 8  # params row: temperature, top_p, min_p, penalty, uniform (float bits), top_k, history length, 0
INF_BITS = 0x7F800000
ARGMAX_THREADS = 32 if SIM else 256
ARGMAX_PER_THREAD = 4 if SIM else 8  # logits a thread loads, all in flight at once
ARGMAX_TILE = ARGMAX_THREADS * ARGMAX_PER_THREAD  # logits per block of argmax_kernel
ARGMAX_NONE = -(1 << 63)  # argmax_kernel's key below every logit's, where acc rests between launches
_LOW = 0xFFFFFFFF


def is_greedy(row: SamplingRow) -> bool:
    """Whether argmax_kernel takes the row: temperature 0 as float32 and no penalty history, which
    both kernels test on the packed row."""
    return np.float32(row.temperature) == 0 and (row.repetition_penalty == 1.0 or not len(row.history))


def pack_params(rows: list[SamplingRow], width: int, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """int32[R, HEAD + width]: each row's settings, then its distinct history ids; and the count of
    greedy rows (is_greedy).

    Into `out` when given: only the first `history length` ids of a row are read, so
    the columns after them are left as they were."""
    if out is None:
        out = np.zeros((len(rows), HEAD + width), np.int32)
    f = np.array([(r.temperature, r.top_p, r.min_p, r.repetition_penalty, r.uniform) for r in rows], np.float32)
    out[:, :5] = f.view(np.int32)
    out[:, 5] = [r.top_k for r in rows]
    out[:, 6:HEAD] = 0
    for r, row in enumerate(rows):
        if row.repetition_penalty != 1.0 and len(row.history):  # the history matters only to the penalty
            hist = np.unique(np.asarray(row.history, np.int32))
            out[r, 6] = hist.size
            out[r, HEAD : HEAD + hist.size] = hist
    return out, sum(map(is_greedy, rows))


@cuda.jit(**DEVICE)
def _key(y):
    """Order-preserving map of a float32 to uint32."""
    b = bits_from_f32(y)
    return uint32(b ^ 0x80000000) if b < 0x80000000 else uint32(~b & 0xFFFFFFFF)


@cuda.jit(**DEVICE)
def _kth_key(work, r, k, sh):
    """The largest key whose count of keys at or above it is at least k."""
    lo = int64(0)  # 64-bit: hi - lo + 1 reaches 2^32 (the simulator's uint32 would wrap to 0, for ever)
    hi = int64(0xFFFFFFFF)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        c = float32(0.0)
        for i in range(cuda.threadIdx.x, work.shape[1], THREADS):
            if _key(work[r, i]) >= mid:
                c += 1.0
        if block_sum(c, sh) >= k:
            lo = mid
        else:
            hi = mid - 1
    return uint32(lo)


@cuda.jit(**DEVICE)
def _mass_cut(work, r, lo, target, strict, sh):
    """The largest probability bits tau >= lo with sum(p >= tau) >= target (> when strict)."""
    hi = int32(INF_BITS)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        s = float32(0.0)
        for i in range(cuda.threadIdx.x, work.shape[1], THREADS):
            p = work[r, i]
            if bits_from_f32(p) >= mid:
                s += p
        total = block_sum(s, sh)
        if total > target or (not strict and total == target):
            lo = mid
        else:
            hi = mid - 1
    return lo


@cuda.jit(**DEVICE)
def _drop_below(work, r, cut):
    """Zero the probabilities under cut and return this thread's part of the kept mass."""
    s = float32(0.0)
    for i in range(cuda.threadIdx.x, work.shape[1], THREADS):
        p = work[r, i]
        if p < cut:
            work[r, i] = 0.0
        else:
            s += p
    return s


@cuda.jit(**DEVICE)
def _argmax_key(x):
    """Order-preserving uint32 of a logit for the argmax: NaN counts as -inf and -0 as +0 (as on the CPU)."""
    b = bits_from_f32(x)
    a = b & 0x7FFFFFFF
    if a > INF_BITS:
        b = uint32(0xFF800000)
    elif a == 0:
        b = uint32(0)
    return uint32(b ^ 0x80000000) if b < 0x80000000 else uint32(~b & 0xFFFFFFFF)


@cuda.jit(**JIT)
def argmax_kernel(logits, params, acc, count, out, check):
    """out[r] = the lowest id of the row's maximum, for the greedy rows (all of them unless check).

    Grid (ceil(V / ARGMAX_TILE), R) of ARGMAX_THREADS. Each block folds its tile into one int64 key,
    (_argmax_key - 2^31) * 2^32 + (0xFFFFFFFF - id) (signed: numba shuffles no uint64), and takes the
    atomic maximum of acc[r] with it; the row's last block (counted in count[r]) swaps acc[r] back to
    ARGMAX_NONE, resets count[r] and writes the id. The maximum is the same in any order.
    """
    grid_ready()
    scratch = cuda.shared.array(ARGMAX_THREADS, int64)  # the simulator's warp_max
    warps = cuda.shared.array(32, int64)
    xs = cuda.local.array(ARGMAX_PER_THREAD, float32)
    r = uint64(cuda.blockIdx.y)  # unsigned indices: no wraparound code, and constant offsets below
    if check:  # (else params is a stand-in: every row is greedy)
        temperature_bits = params[r, 0]
        history = params[r, 6]
        if ((temperature_bits & 0x7FFFFFFF) | history) != 0:  # sample_kernel's row
            return
    tid = cuda.threadIdx.x
    v_count = logits.shape[1]
    first = cuda.blockIdx.x * ARGMAX_TILE + tid  # this thread's first id, then every ARGMAX_THREADS
    i0 = uint64(first)
    # all the loads first, none behind a branch, so that they are in flight together
    if cuda.blockIdx.x * ARGMAX_TILE + ARGMAX_TILE <= v_count:
        for u in range(ARGMAX_PER_THREAD):
            xs[u] = logits[r, i0 + uint64(u * ARGMAX_THREADS)]
    else:  # the row's last tile: past the end, the last logit again
        for u in range(ARGMAX_PER_THREAD):
            xs[u] = logits[r, min(i0 + uint64(u * ARGMAX_THREADS), uint64(v_count - 1))]
    bk = uint32(0)  # below every logit's key
    bi = first
    for u in range(ARGMAX_PER_THREAD):  # ascending ids: strictly greater keeps the lowest
        i = first + u * ARGMAX_THREADS
        k = _argmax_key(xs[u])
        if i < v_count and k > bk:
            bk = k
            bi = i
    key = ((int64(bk) - 0x80000000) << 32) + int64(_LOW - bi) if bk != 0 else int64(ARGMAX_NONE)
    key = warp_max(key, scratch)
    lane = tid % 32
    if lane == 0:
        warps[tid // 32] = key
    cuda.syncthreads()
    key = warps[lane] if lane < ARGMAX_THREADS // 32 else int64(ARGMAX_NONE)
    key = warp_max(key, scratch)
    if tid == 0:
        cuda.atomic.max(acc, r, key)
        cuda.threadfence()  # the maximum before the count
        if cuda.atomic.add(count, r, 1) == cuda.gridDim.x - 1:  # the row's last block
            cuda.threadfence()
            key = cuda.atomic.exch(acc, r, int64(ARGMAX_NONE))
            count[r] = 0
            out[r] = int32(_LOW - (key & _LOW))


_FIT = {} if SIM else {"max_registers": 65536 // THREADS}  # a block of THREADS must fit one SM's registers


@cuda.jit(**JIT, **_FIT)
def sample_kernel(logits, params, work, out):
    grid_ready()
    sh = cuda.shared.array(THREADS, float32)
    best_v = cuda.shared.array(THREADS, float32)
    best_i = cuda.shared.array(THREADS, int32)
    r = cuda.blockIdx.x
    if (params[r, 0] & 0x7FFFFFFF) == 0 and params[r, 6] == 0:  # greedy without a penalty: argmax_kernel's row
        return
    tid = cuda.threadIdx.x
    v_count = logits.shape[1]
    temperature = f32_from_bits(params[r, 0])
    penalty = f32_from_bits(params[r, 3])
    for i in range(tid, v_count, THREADS):
        x = logits[r, i]
        work[r, i] = -math.inf if (bits_from_f32(x) & 0x7FFFFFFF) > INF_BITS else x  # NaN (fastmath may drop isnan)
    cuda.syncthreads()
    for j in range(tid, params[r, 6], THREADS):
        i = params[r, HEAD + j]
        x = work[r, i]
        work[r, i] = x / penalty if x > 0 else x * penalty
    cuda.syncthreads()
    # argmax, lowest id on ties; NaN never wins (tested on its bits: fastmath may assume no NaN)
    bv = float32(-math.inf)
    bi = int32(0)
    for i0 in range(tid, v_count, THREADS * UNROLL):  # UNROLL loads in flight per thread
        for u in range(UNROLL):
            i = i0 + u * THREADS
            if i < v_count:
                x = work[r, i]
                if x > bv and (bits_from_f32(x) & 0x7FFFFFFF) <= INF_BITS:
                    bv = x
                    bi = i
    best_v[tid] = bv
    best_i[tid] = bi
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if tid < s:
            ov = best_v[tid + s]
            oi = best_i[tid + s]
            if ov > best_v[tid] or (ov == best_v[tid] and oi < best_i[tid]):
                best_v[tid] = ov
                best_i[tid] = oi
        cuda.syncthreads()
        s //= 2
    m = best_v[0]
    argmax = best_i[0]
    if temperature == 0.0 or m == -math.inf:
        if tid == 0:
            out[r] = argmax
        return
    for i in range(tid, v_count, THREADS):  # y = (x - max) / T: the top token has y = 0
        x = work[r, i]
        if m == math.inf:
            work[r, i] = 0.0 if x == math.inf else -math.inf
        else:
            work[r, i] = (x - m) / temperature
    cuda.syncthreads()
    top_k = params[r, 5]
    kth = uint32(0)
    if 0 < top_k < v_count:
        kth = _kth_key(work, r, top_k, sh)
    z = float32(0.0)
    for i in range(tid, v_count, THREADS):  # p = exp(y) for the top-k, 0 for the rest
        p = math.exp(work[r, i]) if _key(work[r, i]) >= kth else float32(0.0)
        work[r, i] = p
        z += p
    z = block_sum(z, sh)  # orders the writes above before the reads below
    top_p = f32_from_bits(params[r, 1])
    if top_p < 1.0:
        cut = _mass_cut(work, r, int32(0), top_p * z, False, sh)
        block_sum(_drop_below(work, r, f32_from_bits(cut)), sh)
    min_p = f32_from_bits(params[r, 2])
    total = block_sum(_drop_below(work, r, min_p), sh)
    target = f32_from_bits(params[r, 4]) * total
    pick = _mass_cut(work, r, int32(1), target, True, sh)
    bi = int32(v_count)
    for i in range(tid, v_count, THREADS):
        if bits_from_f32(work[r, i]) == pick and i < bi:
            bi = i
    best_i[tid] = bi
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if tid < s:
            best_i[tid] = min(best_i[tid], best_i[tid + s])
        cuda.syncthreads()
        s //= 2
    if tid == 0:
        out[r] = best_i[0] if best_i[0] < v_count else argmax  # argmax if rounding found none
