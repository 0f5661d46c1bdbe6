"""How every product kernel writes its results: the flags, the matrices of a launch, the store.

A launch multiplies one input by up to three matrices of one weight type, each a tuple
(words, gs, sb, out, bias) (see formats); absent ones are dummies with no rows. Modes:
MODE_ROWS: the rows of the matrices one after another, each written to its own output;
MODE_SWIGLU: matrices 0 and 1 are gate and up, row r of both, out0 = silu(gate) * up;
MODE_QKV: q, k and v, a pair of rows at a time, rotated by RoPE and stored in the KV cache.
"""

from __future__ import annotations

from numba import cuda, float32, uint32

from rbees_workerd.kernels.cuda.device import DEVICE, silu_mul

MODE_ROWS, MODE_SWIGLU, MODE_QKV = 0, 1, 2
# flags of a launch
BIAS = (1, 2, 4)  # BIAS[i]: matrix i has a bias
ACCUMULATE = 8  # the outputs are added to (out += product: the residual add)
NORM = 16  # the input is rmsnorm(x) * norm weight, which the kernel computes (and writes to hout)
Q8_1_SUMS = 32  # (float products of many tokens) the input was rounded to Q8_1, its block sums in msum


@cuda.jit(**DEVICE)
def matrix_row(row, n0, n1):
    """MODE_ROWS: the matrix (0, 1, 2) and its row for the row-th of their rows one after another."""
    if row < n0:
        return 0, row
    if row < n0 + n1:
        return 1, row - n0
    return 2, row - n0 - n1


@cuda.jit(**DEVICE)
def residual(flags, which, t, r, o0, o1, o2):
    """What output element (t, r) of matrix `which` holds before the store adds to it (0 unless ACCUMULATE)."""
    if not flags & ACCUMULATE:
        return float32(0.0)
    o = o0 if which == 0 else (o1 if which == 1 else o2)
    return o[uint32(t), uint32(r)]


@cuda.jit(**DEVICE)
def store(which, mode, flags, t, r, a, b, o0, b0, o1, b1, o2, b2, res):
    """Write output element (t, r) of matrix `which`: a plus its bias plus res (residual's value of it);
    MODE_SWIGLU: a and b are gate and up, out0 = silu(gate) * up."""
    t = uint32(t)
    r = uint32(r)
    if mode == MODE_SWIGLU:
        if flags & BIAS[0]:
            a += b0[r]
        if flags & BIAS[1]:
            b += b1[r]
        o0[t, r] = silu_mul(a, b)
    elif which == 0:
        o0[t, r] = (a + b0[r] if flags & BIAS[0] else a) + res
    elif which == 1:
        o1[t, r] = (a + b1[r] if flags & BIAS[1] else a) + res
    else:
        o2[t, r] = (a + b2[r] if flags & BIAS[2] else a) + res


@cuda.jit(**DEVICE)
def last_of_split(count, split, flag):
    """Called by the whole block of a product split over K once it has written its part: whether it is
    the last of its tile's blocks to finish (counted in count[tile], which it then resets for the next
    launch), the one that adds the parts."""
    tile = cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        flag[0] = cuda.atomic.add(count, tile, 1)
    cuda.syncthreads()
    last = flag[0] == split - 1
    if last and cuda.threadIdx.x == 0:
        count[tile] = 0
    cuda.threadfence()
    return last


@cuda.jit(**DEVICE)
def split_sum(part, split, t, row):
    """The parts of output (t, row) added in the order of z, so the sum does not depend on which block finished last."""
    v = float32(0.0)
    for z in range(split):
        v += part[z, t, row]
    return v
