"""Whether the CUDA tests run for real: a GPU that numba-cuda can use, not the simulator."""

from __future__ import annotations

import importlib.util
import os

import pytest


def gpu_usable() -> bool:
    if importlib.util.find_spec("numba_cuda") is None:
        return False
    from numba import config, cuda

    return not config.ENABLE_CUDASIM and cuda.is_available()


def require_gpu() -> None:
    """Skip the calling test without a usable GPU; fail it instead when REQUIRE_REAL_GPU=1."""
    if gpu_usable():
        return
    if os.environ.get("REQUIRE_REAL_GPU") == "1":
        pytest.fail("REQUIRE_REAL_GPU=1 but no CUDA GPU is usable")
    pytest.skip("needs a real CUDA GPU")
