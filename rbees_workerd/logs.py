"""JSON logs, one object per line, so a pool or a log shipper can parse them without guessing.

Every record carries the worker id and, inside a request, its correlation id. Callers pass
structured fields through `extra={"fields": {...}}` and a short sentence as the message (`human`).
Prompts, token text and secrets are never passed here.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, the process's own fields (its worker_id or
    service), correlation_id, the record's fields, human; and for an exception its type (`exception`) and
    formatted traceback (`exc`), so that a failure can be traced from the log alone."""

    def __init__(self, **process_fields: str) -> None:
        super().__init__()
        self.process_fields = process_fields

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            **self.process_fields,
        }
        cid = correlation_id.get()
        if cid is not None:
            entry["correlation_id"] = cid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        entry["human"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(worker_id: str, level: str) -> None:
    """Route the root logger (and uvicorn's) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker_id=worker_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings too become JSON lines, not raw stderr text
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("numba").setLevel(logging.WARNING)  # its CUDA driver logs every allocation at INFO
    # uvicorn's own lines ("Started server process", ...) are noise at INFO for an operator.
    logging.getLogger("uvicorn.error").setLevel(max(logging.getLevelName(level), logging.WARNING))
