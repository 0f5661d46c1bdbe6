"""The orchestrator's one error tree: each class carries its stable code and its HTTP status.

A route raises one; app.py turns it into `{code, message, retriable, retry_after_ms?}` (openai_api.py into
OpenAI's `{"error": {...}}`). Failures that happen after a task was accepted become its `error` event.
"""

from __future__ import annotations


class OrcdError(Exception):
    """Base error. `code` is the string clients and scripts match on; `status` the HTTP answer."""

    code = "INTERNAL"
    status = 500
    retriable = False

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message, "retriable": self.retriable}
        if self.retry_after_s is not None:
            body["retry_after_ms"] = self.retry_after_s * 1000
        return body


class InvalidParams(OrcdError):
    """The request breaks a rule; `errors` names each field (the rejected value is never echoed)."""

    code = "INVALID_PARAMS"
    status = 400

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [{"field": "body", "constraint": "invalid", "message": message}]


class AuthFailed(OrcdError):
    code = "AUTH_FAILED"
    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ModelNotFound(OrcdError):
    """No worker has ever served this model and the built-in catalog does not know it."""

    code = "MODEL_NOT_FOUND"
    status = 404


class WorkerNotFound(OrcdError):
    code = "WORKER_NOT_FOUND"
    status = 404


class TaskNotFound(OrcdError):
    """No task has this id (never existed, or ended longer ago than events are kept)."""

    code = "TASK_NOT_FOUND"
    status = 404


class RouteNotFound(OrcdError):
    code = "NOT_FOUND"
    status = 404


class MethodNotAllowed(OrcdError):
    code = "METHOD_NOT_ALLOWED"
    status = 405


class TaskEnded(OrcdError):
    """The task has already ended; there is nothing left to cancel."""

    code = "TASK_ENDED"
    status = 409


class QueueFull(OrcdError):
    """The model's queue holds --max-queue tasks; retry after the advertised delay."""

    code = "QUEUE_FULL"
    status = 429
    retriable = True


class PoolUnavailable(OrcdError):
    """No healthy worker serves the model right now."""

    code = "POOL_UNAVAILABLE"
    status = 503
    retriable = True


class QueueTimeout(OrcdError):
    """The task waited in the queue longer than its bound without a worker taking it."""

    code = "QUEUE_TIMEOUT"
    status = 503
    retriable = True


class WorkerLost(OrcdError):
    """The worker died or stopped answering mid-stream; the tokens relayed so far are all there is."""

    code = "WORKER_LOST"
    status = 502
    retriable = True


class WorkerFailed(OrcdError):
    """Every attempt to start the task on a worker failed before its first token."""

    code = "WORKER_FAILED"
    status = 502
    retriable = True


class WorkerError(OrcdError):
    """The worker reported an error event of its own (its code is kept)."""

    status = 502

    def __init__(self, code: str, message: str, retriable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable


class ShuttingDown(OrcdError):
    code = "SHUTTING_DOWN"
    status = 503
    retriable = True
