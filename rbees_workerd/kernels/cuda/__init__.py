"""The CUDA backend: Numba CUDA kernels, weights, KV cache and activations in VRAM.

`numba.cuda` is imported only when `CudaBackend` is first used, so this package
imports on machines without numba-cuda (the CPU-only install).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CudaBackend"]


def __getattr__(name: str) -> Any:
    if name == "CudaBackend":
        from rbees_workerd.kernels.cuda.backend import CudaBackend

        return CudaBackend
    raise AttributeError(name)
