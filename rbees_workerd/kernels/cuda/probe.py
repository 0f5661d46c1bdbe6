"""Can the cuda backend run here? Only when numba-cuda imports and a device answers.

NVML seeing a GPU is not enough: without numba-cuda (the CPU-only install) or with a driver numba-cuda
cannot use, the backend would fail at its first import or launch. The CUDA simulator counts as a device.
"""

from __future__ import annotations

import importlib

from rbees_workerd.errors import BackendUnavailable


def cuda_unavailable_reason() -> str | None:
    """Why the cuda backend cannot run on this host, or None when it can."""
    try:
        from numba import config, cuda

        if not config.ENABLE_CUDASIM:
            importlib.import_module("cuda.core")  # the backend's streams and graphs come from it
    except ImportError as e:
        return f"numba-cuda is not installed ({e}); install rbees[cuda]"
    try:
        if cuda.is_available():
            return None
    except Exception as e:  # noqa: BLE001 - a broken driver is "no device", whatever numba raises
        return f"numba-cuda cannot reach a CUDA device ({type(e).__name__}: {e})"
    return "numba-cuda finds no usable CUDA device (no NVIDIA GPU or driver)"


def require_cuda() -> None:
    """Raise BackendUnavailable (one line) unless the cuda backend can run here."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend cuda is unavailable: {reason}")
