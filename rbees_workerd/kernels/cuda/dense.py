"""The products of large steps through cuBLAS, a matrix at a time: its rows converted to float16
(dequant_kernel), one float16 GEMM with float32 sums (cublasGemmEx, through CuPy), then the stores
(finish_kernel: the tokens' scales, bias, residual).

hmma_kernel converts each weight once per 64 tokens and multiplies on mma.sync; past a few hundred
tokens its conversions and its mma rate bound it, where cuBLAS's GEMMs run the tensor cores at several
times that rate (dense float16, H100). The input is hmma's (prep_f16_kernel: float16 in stage_q8's item
order, token t scaled by 1 / xs[t]); the weights are converted in the same order, which a dot product
does not see. A matrix whose float16 rows or float32 sums would exceed CHUNK_BYTES goes in chunks of rows.

Off (ON) until measured faster than hmma_kernel: on an H100 (2026-12-07) a first version, three launches
a chunk of 16 MB with every matrix of the launch as arguments, took the 8B's 512-token prefill to 965 tok/s
against hmma_kernel's 8,435 (host-bound, by its reckoning: ~2,700 launches a step, none in a graph).
`bench/cuda_bench.py --variant dense=1` measures it, and RBEES_CUDA_DENSE=1 turns it on in a worker (a
burst's prompts over HTTP: bench/gpu/serve.sh). Without CuPy (`available()`), hmma_kernel stays; in the
simulator NumPy stands in for cuBLAS.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from numba import cuda, float32, uint32

from rbees_workerd.errors import CudaError
from rbees_workerd.kernels.cuda.device import JIT, SIM, grid_ready, pack_f16
from rbees_workerd.kernels.cuda.formats import OFFSET, decode
from rbees_workerd.kernels.cuda.outputs import MODE_ROWS, residual, store

ON = os.environ.get("RBEES_CUDA_DENSE", "") == "1"  # large steps' products through cuBLAS (where available)
MIN_TOKENS = 256  # products of this many tokens or more take this path
CHUNK_BYTES = 128 << 20  # at most: a chunk's float16 weights, and its float32 sums
THREADS = 256
_R_16F, _R_32F, _COMPUTE_32F, _DEFAULT_ALGO = 2, 0, 68, -1  # cudaDataType, cublasComputeType_t, cublasGemmAlgo_t

try:
    from cupy_backends.cuda.libs import cublas as _cublas
except ImportError:  # (a worker without CuPy keeps the tensor-core kernels)
    _cublas = None


def available() -> bool:
    """Whether the GEMM can run: cuBLAS through CuPy, or the simulator's NumPy."""
    return SIM or _cublas is not None


def takes(t_count: int) -> bool:
    """Whether a product of t_count tokens of an integer type goes through cuBLAS."""
    return ON and t_count >= MIN_TOKENS and available()


def chunk_rows(t_count: int, k: int) -> int:
    """Rows a chunk: within CHUNK_BYTES of float16 rows of length k and of t_count tokens' float32 sums,
    in whole 128s."""
    return max(128, CHUNK_BYTES // max(2 * k, 4 * t_count) // 128 * 128)


@functools.cache
def dequant_kernel(qt: int):  # noqa: ANN201
    """wh[r] = row r0 + r of the matrix (words, gs, sb), as float16 in stage_q8's item order (words
    4 it .. 4 it + 3: item it's 8 weights); a thread an item."""
    off = float32(OFFSET.get(qt, 0.0))

    @cuda.jit(**JIT)
    def kernel(words, gs, sb, r0, wh):
        grid_ready()
        wv = cuda.local.array(8, float32)
        items = wh.shape[1] // 4
        i = cuda.grid(1)
        r = i // items
        it = i % items
        if r < wh.shape[0]:
            decode(qt, words, gs, sb, off, r0 + r, it // 4, it % 4, wv, True)
            for m in range(4):
                wh[r, uint32(4 * it + m)] = pack_f16(wv[2 * m], wv[2 * m + 1])

    return kernel


@cuda.jit(**JIT)
def finish_kernel(acc, xs, out, bias, r0, flags):
    """out[t, r0 + c] = acc[t, c] times token t's scale back, stored by outputs.store as matrix 0 of a launch
    with flags (its BIAS[0], ACCUMULATE); a thread an element, a block row a token."""
    grid_ready()
    t = cuda.blockIdx.y
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < acc.shape[1]:
        r = r0 + c
        store(0, MODE_ROWS, flags, t, r, acc[t, c] * xs[t], float32(0.0), out, bias, out, bias, out, bias,
              residual(flags, 0, t, r, out, out, out))  # fmt: skip


class Gemm:
    """acc = xh @ wh.T in float32 (xh [T, K] and wh [rows, K] float16, two to a uint32 word; acc [T, rows]),
    on the backend's stream; launched like a kernel (gemm[grid, block, stream](*args)), as the backend
    queues its steps. Its calls are not captured into the steps' graphs."""

    def __init__(self, stream_handle: int) -> None:
        self._stream = stream_handle
        self._handle = None
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)

    def __getitem__(self, config: Any) -> Any:
        return self._run

    def _run(self, xh: Any, wh: Any, acc: Any) -> None:
        (t_count, words), rows = xh.shape, wh.shape[0]
        k = 2 * words
        if SIM:  # (NumPy in cuBLAS's place: float16 values, float32 sums)
            x = xh._ary.view(np.float16).astype(np.float32)
            acc._ary[:] = x @ wh._ary.view(np.float16).astype(np.float32).T
            return
        try:
            if self._handle is None:
                self._handle = _cublas.create()
                _cublas.setStream(self._handle, self._stream)
            _cublas.gemmEx(self._handle, _cublas.CUBLAS_OP_T, _cublas.CUBLAS_OP_N, rows, t_count, k,
                           self._one.ctypes.data, _addr(wh), _R_16F, k, _addr(xh), _R_16F, k,
                           self._zero.ctypes.data, _addr(acc), _R_32F, rows, _COMPUTE_32F, _DEFAULT_ALGO)  # fmt: skip
        except _cublas.CUBLASError as e:
            raise CudaError(f"cuBLAS GEMM of {t_count} x {k} by {rows} rows failed: {e}") from e


def _addr(a: Any) -> int:
    return a.__cuda_array_interface__["data"][0]
