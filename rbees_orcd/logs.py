"""JSON logs, one object per line, as the worker writes them: ts, level, logger, service, correlation id
(the worker's context variable, set by the same middleware), structured fields and a short `human` text.
Prompts, token text and secrets are never logged."""

from __future__ import annotations

import logging
import sys

from rbees_workerd.logs import JsonFormatter


def configure(level: str) -> None:
    """Route the root logger (and uvicorn's) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service="rbees-orcd"))
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
