"""Token sampling on the device: one block per logits row; only the chosen ids go to the host.

The filters follow `Backend.sample` (and `engine.sampling`) in order. Instead of
sorting the vocabulary, each cut is a binary search over the float bits of a
threshold (32 block-wide passes over the row): the k-th largest logit for top-k,
the smallest probability of the top-p prefix, and finally the token at which
the cumulative probability in descending order passes `uniform`. Ties at a
threshold are kept together (a sort would split them by id).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32, uint32

from rbees_workerd.kernels.cuda.device import DEVICE, JIT, SIM, UNROLL, bits_from_f32, block_sum, f32_from_bits

THREADS = 32 if SIM else 1024
HEAD = 8  # params row: temperature, top_p, min_p, penalty, uniform (float bits), top_k, history length, 0
INF_BITS = 0x7F800000


def pack_params(rows: list, width: int) -> np.ndarray:
    """int32[R, HEAD + width]: each row's settings, then its distinct history ids."""
    out = np.zeros((len(rows), HEAD + width), np.int32)
    f = np.array([(r.temperature, r.top_p, r.min_p, r.repetition_penalty, r.uniform) for r in rows], np.float32)
    out[:, :5] = f.view(np.int32)
    out[:, 5] = [r.top_k for r in rows]
    for r, row in enumerate(rows):
        if row.repetition_penalty != 1.0:  # the history matters only to the penalty
            hist = np.unique(np.asarray(row.history, np.int32))
            out[r, 6] = hist.size
            out[r, HEAD : HEAD + hist.size] = hist
    return out


@cuda.jit(**DEVICE)
def _key(y):
    """Order-preserving map of a float32 to uint32."""
    b = bits_from_f32(y)
    return uint32(b ^ 0x80000000) if b < 0x80000000 else uint32(~b & 0xFFFFFFFF)


@cuda.jit(**DEVICE)
def _kth_key(work, r, k, sh):
    """The largest key whose count of keys at or above it is at least k."""
    lo = uint32(0)
    hi = uint32(0xFFFFFFFF)
    while lo < hi:
        mid = uint32(lo + (hi - lo + 1) // 2)
        c = float32(0.0)
        for i in range(cuda.threadIdx.x, work.shape[1], THREADS):
            if _key(work[r, i]) >= mid:
                c += 1.0
        if block_sum(c, sh) >= k:
            lo = mid
        else:
            hi = uint32(mid - 1)
    return lo


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


_FIT = {} if SIM else {"max_registers": 65536 // THREADS}  # a block of THREADS must fit one SM's registers


@cuda.jit(**JIT, **_FIT)
def sample_kernel(logits, params, work, out):
    sh = cuda.shared.array(THREADS, float32)
    best_v = cuda.shared.array(THREADS, float32)
    best_i = cuda.shared.array(THREADS, int32)
    r = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    v_count = logits.shape[1]
    temperature = f32_from_bits(params[r, 0])
    penalty = f32_from_bits(params[r, 3])
    src = logits
    if temperature != 0.0 or params[r, 6] > 0:  # greedy without a penalty reads the logits once, copies nothing
        src = work
        for i in range(tid, v_count, THREADS):
            x = logits[r, i]
            work[r, i] = -math.inf if math.isnan(x) else x
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
                x = src[r, i]
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
