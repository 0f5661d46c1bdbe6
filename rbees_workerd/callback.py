"""The ready callback: tell the pool/orchestrator that this worker serves its model.

Connection errors and 5xx answers are retried with exponential backoff (the orchestrator may be
starting too); a 4xx answer means it refuses this worker, which then exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

log = logging.getLogger("rbees_workerd.callback")


class CallbackFailed(Exception):
    """The callback was refused (4xx) or never got through before the deadline."""


async def send_ready(
    url: str,
    payload: dict[str, Any],
    *,
    deadline_s: float = 300.0,
    first_delay_s: float = 0.25,
    max_delay_s: float = 10.0,
) -> int:
    """POST `payload` until it is accepted (2xx/3xx); returns the number of attempts it took."""
    delay = first_delay_s
    give_up = time.monotonic() + deadline_s
    attempt = 0
    async with httpx.AsyncClient(timeout=10.0) as client:
        while True:
            attempt += 1
            try:
                response = await client.post(url, json=payload)
            except httpx.HTTPError as e:
                reason = f"{type(e).__name__}"
            else:
                if response.status_code < 400:
                    log.info(
                        "ready callback accepted",
                        extra={"fields": {"attempt": attempt, "status": response.status_code}},
                    )
                    return attempt
                if response.status_code < 500:
                    raise CallbackFailed(f"the ready callback was refused with HTTP {response.status_code}")
                reason = f"HTTP {response.status_code}"
            if time.monotonic() + delay > give_up:
                raise CallbackFailed(f"the ready callback did not get through in {deadline_s:.0f}s ({reason})")
            log.warning(
                "ready callback failed, retrying",
                extra={"fields": {"attempt": attempt, "reason": reason, "retry_in_s": delay}},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
