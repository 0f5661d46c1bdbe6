"""A worker's GET /health, as the pool sees it."""

from __future__ import annotations

from typing import BinaryIO


def fetch_health(url: str, timeout_s: float = 2.0) -> dict[str, object] | None:
    """The worker's /health document, or None when it does not answer (yet) or answers garbage."""
    import httpx  # slow to import; most commands never poll a worker

    try:
        response = httpx.get(f"{url}/health", timeout=timeout_s)
        doc = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def fetch_ready(url: str, token: str | None = None, timeout_s: float = 2.0) -> dict[str, object] | None:
    """The worker's /ready document (state, load_progress and, from newer workers, phase), or None when it
    does not answer one (not listening yet, or refusing the token)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        doc = httpx.get(f"{url}/ready", headers=headers, timeout=timeout_s).json()
    except (httpx.HTTPError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "state" in doc else None


def tail(path: str, lines: int = 20) -> str:
    """The last lines of a log file (empty when it does not exist)."""
    try:
        with open(path, "rb") as log:
            return tail_of(log, lines)
    except OSError:
        return ""


def tail_of(log: BinaryIO, lines: int) -> str:
    """The last lines (of the last 64 KiB) of an open binary file, which is left at its end."""
    log.seek(0, 2)
    log.seek(max(0, log.tell() - 64 * 1024))
    return "\n".join(log.read().decode("utf-8", errors="replace").splitlines()[-lines:])
