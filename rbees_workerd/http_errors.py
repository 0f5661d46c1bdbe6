"""Errors only the worker's HTTP side raises, in the same hierarchy (and code style) as errors.py."""

from __future__ import annotations

from rbees_workerd.errors import InvalidParams, RbeesError


class AuthFailed(RbeesError):
    """The bearer token is missing or wrong."""

    code = "AUTH_FAILED"


class NotReady(RbeesError):
    """The model is still loading; retry shortly."""

    code = "WORKER_NOT_READY"
    retriable = True


class Draining(RbeesError):
    """The worker is shutting down and takes no new jobs; retry on another worker."""

    code = "WORKER_DRAINING"
    retriable = True


class JobNotFound(RbeesError):
    """No active job has this id (it never existed or has already ended)."""

    code = "JOB_NOT_FOUND"


class Internal(RbeesError):
    """An unexpected failure inside the worker."""

    code = "INTERNAL"


class FieldInvalid(InvalidParams):
    """One request field breaks a rule only the worker can check (model context, unique job id)."""

    def __init__(self, field: str, constraint: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.constraint = constraint
