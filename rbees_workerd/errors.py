"""One exception hierarchy for the worker: every failure carries a stable code from the SPEC.

The CLI exits with `exit_code`, numbered as rbees-pool's exit codes (one table for every rbees command).
"""

from __future__ import annotations

from rbees_pool.exitcodes import ExitCode


class RbeesError(Exception):
    """Base error. `code` is the stable string clients and scripts match on."""

    code = "INTERNAL"
    retriable = False
    exit_code = ExitCode.FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "retriable": self.retriable}


class ModelLoadError(RbeesError):
    """The model file is unreadable, corrupt, truncated or of an unsupported kind."""

    code = "MODEL_LOAD_FAILED"


class VramOOM(RbeesError):
    """The GPU lacks the memory the model, its KV cache and its slots need."""

    code = "VRAM_OOM"


class CudaError(RbeesError):
    """A CUDA call failed; the worker cannot continue on that device."""

    code = "CUDA_ERROR"


class InvalidParams(RbeesError):
    """A request or a configuration value is out of its allowed range."""

    code = "INVALID_PARAMS"


class AllSlotsBusy(RbeesError):
    """Every slot of the worker is generating; the client may retry shortly."""

    code = "ALL_SLOTS_BUSY"
    retriable = True


class BackendUnavailable(RbeesError):
    """The backend asked for cannot run on this host (cuda without numba-cuda or without a device)."""

    code = "BACKEND_UNAVAILABLE"
    exit_code = ExitCode.BACKEND_UNAVAILABLE


class PortUnavailable(RbeesError):
    """The daemon cannot listen on its address (taken, or not an address of this host)."""

    code = "PORT_UNAVAILABLE"
