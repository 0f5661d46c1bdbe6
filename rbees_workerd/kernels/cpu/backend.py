"""The CPU backend: NumPy arrays in host memory, Numba `@njit` kernels."""

from __future__ import annotations

from collections.abc import Sequence
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
        self._threads = min(threads, numba.config.NUMBA_NUM_THREADS) if threads else None
        self.enter_thread()  # the loading thread, which also runs the warm-up
        self._bytes = 0
        self._tmp = np.empty(0, np.float32)

    def enter_thread(self) -> None:
        if self._threads is not None:
            numba.set_num_threads(self._threads)

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

    def products(
        self,
        x: np.ndarray,
        prods: Sequence[backend.Product],
        norm: backend.Norm | None = None,
        rope: backend.RopeStore | None = None,
    ) -> None:
        if norm is not None:
            ops.rmsnorm(x, norm.weight, norm.eps, norm.out)
            x = norm.out
        for p in prods:
            out = self._scratch(p.out.shape) if p.accumulate else p.out
            quant.matmul(x, p.weight, out)
            if p.bias is not None:
                ops.add_bias(out, p.bias)
            if p.accumulate:
                ops.add(p.out, out)
        if rope is not None:
            if rope.q_norm is not None:
                ops.head_rmsnorm(rope.q, rope.q_norm, rope.norm_eps)
                ops.head_rmsnorm(rope.k, rope.k_norm, rope.norm_eps)
            for x in (rope.q, rope.k):
                ops.rope(x, rope.positions, rope.theta, rope.neox, *rope.angles_key[1:])
            if rope.q_scale != 1.0:
                np.multiply(rope.q, np.float32(rope.q_scale), out=rope.q)
            ops.kv_store(rope.k, rope.v, rope.cache_k, rope.cache_v, rope.slots, rope.positions)

    def gated_ffn(self, x: np.ndarray, ffn: backend.GatedFFN) -> None:
        ops.rmsnorm(x, ffn.norm.weight, ffn.norm.eps, ffn.norm.out)
        quant.matmul(ffn.norm.out, ffn.gate, ffn.act)
        quant.matmul(ffn.norm.out, ffn.up, ffn.up_out)
        ops.swiglu(ffn.act, ffn.up_out, ffn.act)
        self.products(ffn.act, [backend.Product(ffn.down, ffn.out, accumulate=ffn.accumulate)])

    def attention(self, q, cache_k, cache_v, slots, positions, out, one_sequence=False, scale=None) -> None:  # noqa: ANN001
        ops.attention(q, cache_k, cache_v, slots, positions, out, 0.0 if scale is None else float(scale))

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 buffer for a product that is added to its output (grown on demand, never shared
        by two live results: a products call adds each one before the next is computed)."""
        size = int(np.prod(shape))
        if self._tmp.size < size:
            self._tmp = np.empty(size, np.float32)
        return self._tmp[:size].reshape(shape)

    def gather_rows(self, x: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        np.take(x, rows, axis=0, out=out)

    def sample(self, logits: np.ndarray, rows: list[backend.SamplingRow]) -> np.ndarray:
        return sample_rows(logits, rows)
