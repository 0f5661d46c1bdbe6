"""One exception tree for the worker: every failure carries a stable code from the SPEC, its HTTP status and
whether retrying may help.

The attributes are class attributes, found along the class's MRO (as Starlette finds an exception handler):
a class that does not set `status` answers with its nearest base's. `Unavailable` (503, retriable, with a
Retry-After) is the base of every "not now" refusal: ALL_SLOTS_BUSY, WORKER_NOT_READY, WORKER_DRAINING.
The CLI exits with `exit_code`, numbered as rbees-pool's exit codes (one table for every rbees command).
"""

from __future__ import annotations

import copyreg
from typing import Any

from rbees_pool.exitcodes import ExitCode


class RbeesError(Exception):
    """Base error. `code` is the stable string clients and scripts match on; `status` the HTTP answer."""

    code = "INTERNAL"
    status = 500
    retriable = False
    retry_after_s: int | None = None  # sent as Retry-After (and retry_after_ms in the body) when set
    exit_code = ExitCode.FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its class and attributes, not by calling `__init__` again (FieldInvalid's takes three
        arguments): a refusal raised in the engine process reaches the HTTP side as the same error."""
        return copyreg.__newobj__, (type(self), *self.args), self.__dict__

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message, "retriable": self.retriable}
        if self.retry_after_s is not None:
            body["retry_after_ms"] = self.retry_after_s * 1000
        return body


def lookup(error: BaseException | type[BaseException], name: str, default: Any = None) -> Any:
    """The attribute `name` of the first class along the error's MRO that defines it (what attribute access
    does, spelled out so that a mapping kept outside the classes could be searched the same way)."""
    cls = error if isinstance(error, type) else type(error)
    for base in cls.__mro__:
        if name in vars(base):
            return vars(base)[name]
    return default


# ---- loading and the engine
class ModelLoadError(RbeesError):
    """The model file is unreadable, corrupt, truncated or of an unsupported kind."""

    code = "MODEL_LOAD_FAILED"


class VramOOM(RbeesError):
    """The GPU lacks the memory the model, its KV cache and its slots need."""

    code = "VRAM_OOM"


class CudaError(RbeesError):
    """A CUDA call failed; the worker cannot continue on that device."""

    code = "CUDA_ERROR"


class BackendUnavailable(RbeesError):
    """The backend asked for cannot run on this host (cuda without numba-cuda or without a device)."""

    code = "BACKEND_UNAVAILABLE"
    exit_code = ExitCode.BACKEND_UNAVAILABLE


class PortUnavailable(RbeesError):
    """The daemon cannot listen on its address (taken, or not an address of this host)."""

    code = "PORT_UNAVAILABLE"


class Internal(RbeesError):
    """An unexpected failure inside the worker."""

    code = "INTERNAL"


# ---- requests
class InvalidParams(RbeesError):
    """A request or a configuration value is out of its allowed range."""

    code = "INVALID_PARAMS"
    status = 400


class FieldInvalid(InvalidParams):
    """One request field breaks a rule only the worker can check (model context, unique job id); answered
    as a 400 ValidationErrors body naming the field."""

    def __init__(self, field: str, constraint: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.constraint = constraint


class AuthFailed(RbeesError):
    """The bearer token is missing or wrong."""

    code = "AUTH_FAILED"
    status = 401


class JobNotFound(RbeesError):
    """No active job has this id (it never existed or has already ended)."""

    code = "JOB_NOT_FOUND"
    status = 404


class Unavailable(RbeesError):
    """The worker cannot take this request now; the same request may succeed shortly (503, Retry-After)."""

    code = "UNAVAILABLE"
    status = 503
    retriable = True
    retry_after_s = 1


class AllSlotsBusy(Unavailable):
    """Every slot of the worker is generating; the client may retry shortly."""

    code = "ALL_SLOTS_BUSY"


class NotReady(Unavailable):
    """The model is still loading; retry shortly."""

    code = "WORKER_NOT_READY"
    retry_after_s = 2


class Draining(Unavailable):
    """The worker is shutting down and takes no new jobs; retry on another worker."""

    code = "WORKER_DRAINING"
    retry_after_s = 5
