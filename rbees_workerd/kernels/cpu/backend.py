"""The CPU backend: NumPy arrays in host memory, Numba `@njit` kernels."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from rbees_workerd.engine.sampling import sample_rows
from rbees_workerd.kernels import backend
from rbees_workerd.kernels.cpu import ops, quant


class CpuBackend(backend.Backend):
    name = "cpu"
    device = "cpu"

    def __init__(self, threads: int | None = None) -> None:
        if threads:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self._bytes = 0

    # ---- memory
    def weight(self, qtype: int, shape: tuple[int, int], raw: np.ndarray) -> quant.QMatrix:
        w = quant.prepare(qtype, shape, raw)
        self._bytes += w.nbytes
        return w

    def vector(self, data: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(data, dtype=np.float32).copy()
        self._bytes += a.nbytes
        return a

    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        # np.zeros maps untouched pages lazily, so a long context costs memory only as it fills.
        a = np.zeros(shape, dtype=dtype)
        self._bytes += a.nbytes
        return a

    def upload(self, host: np.ndarray, out: np.ndarray) -> None:
        out[...] = host

    def download(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def memory_bytes(self) -> int:
        return self._bytes

    # ---- ops
    def embed(self, table: quant.QMatrix, tokens: np.ndarray, out: np.ndarray) -> None:
        quant.embed_rows(table, tokens, out)

    def matmul(self, x: np.ndarray, w: quant.QMatrix, out: np.ndarray, bias: np.ndarray | None = None) -> None:
        quant.matmul(x, w, out)
        if bias is not None:
            ops.add_bias(out, bias)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
        ops.rmsnorm(x, weight, eps, out)

    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float, neox: bool) -> None:
        ops.rope(x, positions, theta, neox)

    def attention(self, q, k, v, cache_k, cache_v, slots, positions, out, one_sequence=False) -> None:  # noqa: ANN001
        ops.kv_store(k, v, cache_k, cache_v, slots, positions)
        ops.attention(q, cache_k, cache_v, slots, positions, out)

    def swiglu(self, gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
        ops.swiglu(gate, up, out)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        ops.add(x, y)

    def gather_rows(self, x: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        np.take(x, rows, axis=0, out=out)

    def sample(self, logits: np.ndarray, rows: list[backend.SamplingRow]) -> np.ndarray:
        return sample_rows(logits, rows)
