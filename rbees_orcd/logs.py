"""JSON logs, one object per line, as the worker writes them: ts, level, logger, service, correlation id
(the worker's context variable, set by the same middleware), structured fields and a short `human` text.
Prompts, token text and secrets are never logged."""

from __future__ import annotations

import json
import logging
import sys
import time

from rbees_workerd.logs import correlation_id


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "service": "rbees-orcd",
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
        return json.dumps(entry, default=str)


def configure(level: str) -> None:
    """Route the root logger (and uvicorn's) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.error").setLevel(max(logging.getLevelName(level), logging.WARNING))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request to a worker is noise
