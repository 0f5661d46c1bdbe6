"""Quantized matrices on the CPU: `prepare` once at load, then `matmul` and `embed_rows` per step.

A `QMatrix` keeps the GGUF weights quantized, repacked by `quant_pack` into the
layout the Numba kernels of `quant_kernels` stream (scales widened to float32,
rows grouped in chunks). The kernels multiply float32 activations by the integer
quant values and apply the block scales once per block. For the 32-block types and
F16 and the K-quants the activations are first rounded the way llama.cpp rounds them
(`quant_act`), so products match llama.cpp's up to float32 summation order; BF16 and
F32 use the activations as they are. On hosts with AVX2 every block type is instead
stored in `quant_tiles`' layout and multiplied by `simd` (integer dot products, as
llama.cpp's x86 kernels).

Threads: `matmul` uses `numba.get_num_threads()` of the calling thread (set it with
`numba.set_num_threads`). With the default OpenMP layer, idle workers spin between
parallel regions; on a machine shared with other busy processes set
OMP_WAIT_POLICY=passive before numba starts its threads, or two-thread steps get
many times slower than one-thread ones.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rbees_workerd.errors import InvalidParams, ModelLoadError
from rbees_workerd.kernels.cpu import quant_kernels as qk
from rbees_workerd.kernels.cpu import quant_tiles, simd
from rbees_workerd.kernels.cpu.quant_pack import KIND_BYTE, KIND_NIBBLE, Blocks, gguf_fields, pack_blocks, pack_dense

_Q = GGMLQuantizationType
_DENSE = (_Q.F32, _Q.F16, _Q.BF16)
# Row ranges per matmul, several per thread, so that threads that finish early take more when the
# machine is shared. Fixed for the process (numba's most threads): fewer threads just take more each.
_TASKS = 4 * numba.config.NUMBA_NUM_THREADS
_INTEGER_MAX_TOKENS = 3  # decode steps of up to 3 tokens take the integer kernel (measured faster there)
_thread = threading.local()  # whether this thread's parallel chunk size is set
# llama.cpp's activation rounding per weight type (see quant_act); BF16 and F32 keep float32
_ACTIVATIONS = {_Q.Q4_0: qk.ACT_Q8_0, _Q.Q5_0: qk.ACT_Q8_0, _Q.Q8_0: qk.ACT_Q8_0,
                _Q.Q4_1: qk.ACT_Q8_1, _Q.Q5_1: qk.ACT_Q8_1, _Q.F16: qk.ACT_F16,
                _Q.Q4_K: qk.ACT_Q8_K, _Q.Q5_K: qk.ACT_Q8_K, _Q.Q6_K: qk.ACT_Q8_K}  # fmt: skip
SUPPORTED = frozenset({*_DENSE, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K})


@dataclasses.dataclass(frozen=True)
class QMatrix:
    """A prepared `[N, K]` weight matrix. Exactly one of `blocks` / `dense` / `tiles` is set."""

    qtype: int
    shape: tuple[int, int]
    nbytes: int
    blocks: Blocks | None = None
    dense: np.ndarray | None = None
    tiles: np.ndarray | None = None  # `quant_tiles`' layout, for `simd`
    # the integer kernel with its weight arguments bound (a decode step makes ~200 calls: keep them short)
    simd_matmul: Callable[[np.ndarray, np.ndarray], None] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )


def prepare(qtype: int, shape: tuple[int, int], raw: np.ndarray, level: int = simd.LEVEL) -> QMatrix:
    """Repack the GGUF bytes `raw` (uint8[N, row_bytes]) of an `[N, K]` matrix; `raw` is copied.

    At `level` AVX2 or VNNI (default: the best the host has, see `simd`) the block types take
    `quant_tiles`' layout and `simd`'s kernels of that level; PORTABLE keeps `quant_pack`'s.
    """
    if qtype not in SUPPORTED:
        raise ModelLoadError(f"quant type {qtype} is not supported by the CPU backend")
    n, k = (int(s) for s in shape)
    block, type_size = GGML_QUANT_SIZES[_Q(qtype)]
    if n <= 0 or k <= 0 or k % block or raw.dtype != np.uint8 or raw.shape != (n, k // block * type_size):
        raise ModelLoadError(
            f"{_Q(qtype).name} tensor of shape {shape} needs uint8[{n}, {k // block * type_size}] "
            f"(K a multiple of {block}), got {raw.dtype}{list(raw.shape)}"
        )
    if qtype in _DENSE:
        dense = pack_dense(qtype, raw)
        return QMatrix(qtype, (n, k), dense.nbytes, dense=dense)
    if level == simd.PORTABLE:
        b = pack_blocks(qtype, raw)
        return QMatrix(qtype, (n, k), b.qs.nbytes + b.qh.nbytes + b.d.nbytes + b.m.nbytes, blocks=b)
    tiles = quant_tiles.to_tiles(quant_tiles.FORMATS[_Q(qtype)], gguf_fields(qtype, raw))
    kernel = simd.matmul_kernel(quant_tiles.FORMATS[_Q(qtype)], level)
    return QMatrix(qtype, (n, k), tiles.nbytes, tiles=tiles,
                   simd_matmul=lambda x, out: kernel(x, tiles, _TASKS, out))  # fmt: skip


def _check(a: np.ndarray, rows: int, cols: int, what: str) -> None:
    if a.dtype != np.float32 or a.ndim != 2 or a.shape != (rows, cols) or not a.flags.c_contiguous:
        raise InvalidParams(f"{what} must be C-contiguous float32[{rows}, {cols}], got {a.dtype}{list(a.shape)}")


def matmul(x: np.ndarray, w: QMatrix, out: np.ndarray) -> None:
    """out[T, N] = x[T, K] @ dequant(w).T."""
    n, k = w.shape
    t = x.shape[0] if x.ndim == 2 else -1
    _check(x, t, k, "matmul input")
    _check(out, t, n, "matmul output")
    if np.may_share_memory(x, out):
        raise InvalidParams("matmul input and output must not overlap")
    if t == 0:
        return
    if not getattr(_thread, "chunked", False):
        numba.set_parallel_chunksize(1)  # the kernels' row ranges are handed out one at a time
        _thread.chunked = True
    if w.simd_matmul is not None:
        w.simd_matmul(x, out)
        return
    act = _ACTIVATIONS.get(w.qtype, qk.ACT_FLOAT)
    if w.blocks is not None:
        b = w.blocks
        if b.kind == KIND_NIBBLE and t <= _INTEGER_MAX_TOKENS and act in (qk.ACT_Q8_0, qk.ACT_Q8_1):
            qk.matmul_nibble_q8(x, b.qs, b.d, b.m, np.float32(b.offset), _TASKS, out)
        elif b.kind == KIND_NIBBLE:
            qk.matmul_nibble(x, b.qs, b.d, b.m, np.float32(b.offset), act, _TASKS, out)
        elif b.kind == KIND_BYTE:
            qk.matmul_byte(x, b.qs, b.d, act, _TASKS, out)
        else:
            qk.matmul_ext(x, b.qs, b.qh, b.d, b.m, b.ebits, b.half, np.float32(b.offset), act, _TASKS, out)
    elif w.qtype == _Q.F32:
        qk.matmul_f32(x, w.dense, _TASKS, out)
    else:
        qk.matmul_f16(x, w.dense, w.qtype == _Q.BF16, act, _TASKS, out)


def embed_rows(w: QMatrix, tokens: np.ndarray, out: np.ndarray) -> None:
    """out[t] = dequant(w)[tokens[t]] (the embedding lookup on the quantized table)."""
    n, k = w.shape
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise InvalidParams(f"token ids must be a 1-D integer array, got {tokens.dtype}{list(tokens.shape)}")
    _check(out, tokens.shape[0], k, "embedding output")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= n):
        raise InvalidParams(f"token id out of range [0, {n})")
    ids = tokens.astype(np.int64, copy=False)
    if w.tiles is not None:
        fmt = quant_tiles.FORMATS[_Q(w.qtype)]
        out[:] = quant_tiles.dequantize(fmt, quant_tiles.rows_fields(fmt, w.tiles, ids))
    elif w.blocks is not None:
        b = w.blocks
        qk.embed_blocks(b.qs, b.qh, b.d, b.m, b.kind, b.ebits, b.half, np.float32(b.offset), ids, out)
    elif w.qtype == _Q.F32:
        qk.embed_dense(w.dense, ids, out)
    else:
        qk.embed_half(w.dense, w.qtype == _Q.BF16, ids, out)
