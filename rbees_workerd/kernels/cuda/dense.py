"""The products of large steps through cuBLAS, a launch's matrices (up to three of one type over one input: q/k/v,
gate/up) at a time, as one matrix of their rows one after another: those rows converted to float16
(dequant_kernel), one float16 GEMM with float32 sums (cublasGemmEx), then the stores (finish_kernel: the tokens'
scales, each matrix's bias and residual, to each matrix's output).

hmma_kernel converts each weight once per 64 tokens and multiplies on mma.sync; past a few hundred
tokens its conversions and its mma rate bound it, where cuBLAS's GEMMs run the tensor cores at several
times that rate (dense float16, H100). The input is hmma's (prep_f16_kernel: float16 in stage_q8's item
order, token t scaled by 1 / xs[t]); the weights are converted in the same order, which a dot product
does not see. Matrices whose float16 rows or float32 sums would exceed CHUNK_BYTES go in chunks of rows.

On by default (RBEES_CUDA_DENSE=0 turns it off) from MIN_TOKENS tokens. cuBLAS is called through ctypes
(found by cuda.pathfinder), because CuPy's wrapper refuses stream capture, so that a repeated step's graph
holds its GEMMs. So captured, on an H100 (2026-12-07, docs/benchmarks.md, seventeenth session): the 8B's
512-token prefill 14,436 tok/s against hmma_kernel's 8,435 (llama.cpp 9,641); the 0.5B's 2,048-token prefill
72,332 against 60,529, its 256 streams 59,107 against 46,627, 96 streams 29,632 against 24,982, 64 even. (Those
figures are of three launches a matrix. Since the eighteenth session a launch's matrices go together, three
launches a chunk (q/k/v of one type nine to three, gate/up six to three): 256 streams 58,023 -> 61,476 tok/s, a
512-token prompt 63,156 -> 66,175, H100, steps of 128 tokens.)
A step that runs once (a burst's prompts, whose shape never repeats) launches from Python, three launches a
chunk here against hmma_kernel's one: a worker whose one-off steps took this path answered 64 new streams'
first tokens after 118-131 ms instead of 21-24, so those steps keep hmma_kernel (`takes`).
`bench/cuda_bench.py --variant dense=0` measures without it.
Without cuBLAS (`available()`), hmma_kernel stays; in the simulator NumPy stands in for cuBLAS.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import numpy as np
from numba import cuda, float32, uint32

from rbees_workerd.errors import CudaError
from rbees_workerd.kernels.cuda.device import JIT, SIM, address, grid_ready, pack_f16
from rbees_workerd.kernels.cuda.formats import OFFSET, decode
from rbees_workerd.kernels.cuda.outputs import MODE_ROWS, matrix_row, residual, store

ON = os.environ.get("RBEES_CUDA_DENSE", "") != "0"  # large steps' products through cuBLAS (where available)
MIN_TOKENS = 96  # products of this many tokens or more take this path (H100: 96 faster, 64 even)
CHUNK_BYTES = 128 << 20  # at most: a chunk's float16 weights, and its float32 sums
THREADS = 256
WORKSPACE_BYTES = 32 << 20  # cuBLAS's workspace (32 MiB: NVIDIA's advice for Hopper)
_OP_N, _OP_T, _R_16F, _R_32F, _COMPUTE_32F, _DEFAULT_ALGO = 0, 1, 2, 0, 68, -1  # cuBLAS's and CUDA's enums


@functools.cache
def _cublas() -> ctypes.CDLL | None:
    """libcublas, called through ctypes: CuPy's wrapper refuses stream capture (measured on the H100: a call
    during capture ran at once and left the graph empty), and the steps' graphs must hold the GEMMs."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        lib = ctypes.CDLL(load_nvidia_dynamic_lib("cublas").abs_path)
    except (ImportError, RuntimeError, OSError):  # (a worker without cuBLAS keeps the tensor-core kernels)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
    lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
    return lib


def available() -> bool:
    """Whether the GEMM can run: cuBLAS, or the simulator's NumPy."""
    return SIM or _cublas() is not None


def takes(t_count: int, repeats: bool) -> bool:
    """Whether a product of t_count tokens of an integer type goes through cuBLAS: only in a step that came
    before, which is captured and replayed; a step that runs once (a burst's prompts) launches from Python,
    where this path's launches cost more than they save (module docstring)."""
    return ON and repeats and t_count >= MIN_TOKENS and available()


def chunk_rows(t_count: int, k: int) -> int:
    """Rows a chunk: within CHUNK_BYTES of float16 rows of length k and of t_count tokens' float32 sums,
    in whole 128s."""
    return max(128, CHUNK_BYTES // max(2 * k, 4 * t_count) // 128 * 128)


@functools.cache
def dequant_kernel(qt: int):  # noqa: ANN201
    """wh[r] = row g0 + r of a launch's matrices (m0, m1, m2: words, gs, sb) one after another (n0 and n1 rows
    in the first two), as float16 in stage_q8's item order (words 4 it .. 4 it + 3: item it's 8 weights); a
    thread an item."""
    off = float32(OFFSET.get(qt, 0.0))

    @cuda.jit(**JIT)
    def kernel(w0, gs0, sb0, w1, gs1, sb1, w2, gs2, sb2, n0, n1, g0, wh):
        grid_ready()
        wv = cuda.local.array(8, float32)
        items = wh.shape[1] // 4
        i = cuda.grid(1)
        r = i // items
        it = i % items
        if r < wh.shape[0]:
            which, row = matrix_row(g0 + r, n0, n1)
            w, gs, sb = (w0, gs0, sb0) if which == 0 else ((w1, gs1, sb1) if which == 1 else (w2, gs2, sb2))
            decode(qt, w, gs, sb, off, row, it // 4, it % 4, wv, True)
            for m in range(4):
                wh[r, uint32(4 * it + m)] = pack_f16(wv[2 * m], wv[2 * m + 1])

    return kernel


@cuda.jit(**JIT)
def finish_kernel(acc, xs, o0, b0, o1, b1, o2, b2, n0, n1, g0, flags):
    """Column c of acc is row g0 + c of the launch's matrices one after another: its element of token t times
    the token's scale back, stored by outputs.store with the launch's flags (BIAS, ACCUMULATE); a thread an
    element, a block row a token."""
    grid_ready()
    t = cuda.blockIdx.y
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < acc.shape[1]:
        which, r = matrix_row(g0 + c, n0, n1)
        store(which, MODE_ROWS, flags, t, r, acc[t, c] * xs[t], float32(0.0), o0, b0, o1, b1, o2, b2,
              residual(flags, which, t, r, o0, o1, o2))


class Gemm:
    """acc = xh @ wh.T in float32 (xh [T, K] and wh [rows, K] float16, two to a uint32 word; acc [T, rows]),
    launched like a kernel (gemm[grid, block, stream](*args)) on the stream it is given: the backend's, or
    the graph builder's while a step is captured (cuBLAS supports stream capture; its workspace is ours, so
    that a captured call allocates nothing)."""

    def __init__(self, stream_handle: int, zeros: Any) -> None:
        self._default = stream_handle
        self._zeros = zeros  # the backend's allocator (its memory count), for the workspace
        self._handle = None
        self._workspace = None
        self._on = None  # the stream the handle is set to
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)

    def __getitem__(self, config: Any) -> Any:
        stream = config[2]
        handle = stream.__cuda_stream__()[1] if hasattr(stream, "__cuda_stream__") else self._default
        return functools.partial(self._run, handle)

    def _run(self, stream: int, xh: Any, wh: Any, acc: Any) -> None:
        (t_count, words), rows = xh.shape, wh.shape[0]
        k = 2 * words
        if SIM:  # (NumPy in cuBLAS's place: float16 values, float32 sums)
            x = xh._ary.view(np.float16).astype(np.float32)
            acc._ary[:] = x @ wh._ary.view(np.float16).astype(np.float32).T
            return
        lib = _cublas()
        if self._handle is None:
            self._workspace = self._zeros((WORKSPACE_BYTES // 4,), np.uint32)
            self._handle = ctypes.c_void_p()
            _check(lib.cublasCreate_v2(ctypes.byref(self._handle)), "creating a cuBLAS handle")
        if self._on != stream:  # (setStream puts the handle back on cuBLAS's own workspace)
            _check(lib.cublasSetStream_v2(self._handle, stream), "setting cuBLAS's stream")
            _check(lib.cublasSetWorkspace_v2(self._handle, address(self._workspace), WORKSPACE_BYTES),
                   "setting cuBLAS's workspace")  # fmt: skip
            self._on = stream
        status = lib.cublasGemmEx(self._handle, _OP_T, _OP_N, rows, t_count, k, self._one.ctypes.data, address(wh),
                                  _R_16F, k, address(xh), _R_16F, k, self._zero.ctypes.data, address(acc), _R_32F, rows,
                                  _COMPUTE_32F, _DEFAULT_ALGO)  # fmt: skip
        _check(status, f"a cuBLAS GEMM of {t_count} x {k} by {rows} rows")


def _check(status: int, doing: str) -> None:
    if status:
        raise CudaError(f"{doing} failed: cublasStatus_t {status}")
