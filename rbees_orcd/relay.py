"""One attempt of a task on one worker: POST /execute, read its SSE, publish the frames to the task.

The worker's `started` frame is held back until its first token (or end), so a worker that fails before
then leaves no trace in the task's events and the task can go to another worker. After the first token
a failure is the task's `error` event (WORKER_LOST). A stream that goes quiet is checked on: if the
worker's /health does not answer either, the stream is given up within a few seconds, since a worker
whose host vanished closes no socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from rbees_orcd import wire
from rbees_orcd.metrics import OrcdMetrics
from rbees_orcd.registry import State, Worker
from rbees_orcd.settings import WorkerTokens
from rbees_orcd.tasks import Event, Task, error_event, event, token_event

log = logging.getLogger("rbees_orcd.relay")

IDLE_PROBE_S = 2.0  # a stream quiet this long makes the relay ask the worker's /health
PROBE_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 3.0
_BUSY_STATES: dict[str, State | None] = {
    "ALL_SLOTS_BUSY": None,
    "WORKER_NOT_READY": "loading",
    "WORKER_DRAINING": "draining",
}


@dataclass(frozen=True)
class Finished:
    """The task ended on this worker (completed, cancelled, or failed for good)."""

    status: str
    event: Event
    worker_lost: bool = False


@dataclass(frozen=True)
class Retry:
    """The worker did not start the task; it may run elsewhere. `busy`: a refusal, not a fault."""

    reason: str
    busy: bool = False
    worker_state: State | None = "unhealthy"


class _Lost(Exception):
    """The stream broke or the worker stopped answering."""


class Relay:
    """Talks to workers: their streams on a connection each (wire.py), the short calls (health, cancel) on
    one shared httpx pool."""

    def __init__(self, tokens: WorkerTokens, metrics: OrcdMetrics) -> None:
        self._tokens = tokens
        self._metrics = metrics
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=None, write=10.0, pool=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def health(self, worker: Worker, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any] | None:
        """The worker's /health document, or None when it does not answer with one."""
        try:
            response = await self.client.get(f"{worker.url}/health", timeout=timeout_s)
            doc = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        return doc if response.status_code == 200 and isinstance(doc, dict) else None

    async def cancel(self, worker: Worker, worker_job_id: str) -> bool:
        """Ask the worker to end the job; False when it no longer knows it or cannot be reached."""
        try:
            response = await self.client.post(
                f"{worker.url}/cancel",
                json={"job_id": worker_job_id},
                headers=self._tokens.headers(worker.worker_id),
                timeout=PROBE_TIMEOUT_S,
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 202

    async def run(self, task: Task, worker: Worker, attempt: int) -> Finished | Retry:
        """Run the task on the worker; returns how it ended or why it should be placed again."""
        task.worker_job_id = task.job_id if attempt == 1 else f"{task.job_id}.{attempt}"
        body = orjson.dumps({**task.request, "job_id": task.worker_job_id})
        stream = _Stream(self, task, worker)
        try:
            response = await wire.post(f"{worker.url}/execute", body, self._tokens.headers(worker.worker_id),
                                       CONNECT_TIMEOUT_S)  # fmt: skip
            try:
                if response.status != 200:
                    return _refusal(response.status, await _error_body(response))
                self._metrics.dispatch_latency.observe(time.perf_counter() - task.admitted_at)
                task.worker_id = worker.worker_id
                task.status = "running"
                if task.cancel_requested:
                    asyncio.get_running_loop().create_task(self.cancel(worker, task.worker_job_id))
                return await stream.read(response)
            finally:
                response.close()
        except (wire.WireError, _Lost) as e:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if not stream.committed:
                return Retry(reason)
            return Finished(
                "failed",
                error_event("WORKER_LOST", f"worker {worker.worker_id} was lost mid-stream ({reason})", True),
                worker_lost=True,
            )


class _Stream:
    """Reads one worker response's SSE frames into the task, with the idle watchdog beside it."""

    def __init__(self, relay: Relay, task: Task, worker: Worker) -> None:
        self._relay = relay
        self._task = task
        self._worker = worker
        self._relayed = relay._metrics.tokens_relayed
        self._started: dict[str, Any] | None = None
        self._pending = b""  # the start of a frame whose end has not come yet
        self._outcome: Finished | None = None
        self.committed = False  # the task's events show this worker's stream: no retry elsewhere now
        self._last_read = time.monotonic()

    async def read(self, response: wire.StreamResponse) -> Finished:
        reader = asyncio.current_task()
        assert reader is not None
        lost = asyncio.Event()
        watchdog = asyncio.create_task(self._watch(reader, lost))
        try:
            await response.stream(self._feed)
        except asyncio.CancelledError:
            if not lost.is_set():
                raise
            reader.uncancel()
            raise _Lost(f"no frame for {IDLE_PROBE_S:.0f}s and no answer to /health") from None
        finally:
            watchdog.cancel()
        if self._outcome is None:
            raise _Lost("the stream ended without an end or error frame")
        return self._outcome

    async def _watch(self, reader: asyncio.Task[Any], lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(IDLE_PROBE_S / 2)
            if time.monotonic() - self._last_read < IDLE_PROBE_S:
                continue
            if await self._relay.health(self._worker) is None:
                lost.set()
                reader.cancel()
                return

    def _feed(self, chunk: bytes) -> bool:
        """Publish the chunk's whole frames, as the socket delivers it; True once the last (end or error) came.

        A task that ended meanwhile (its reader is being cancelled) takes no more events."""
        task = self._task
        if task.ended:
            return False
        self._last_read = time.monotonic()
        *blocks, self._pending = (self._pending + chunk).split(b"\n\n")
        relayed = 0
        for block in blocks:
            raw = _data(block)
            if raw is None:
                continue
            try:
                frame = orjson.loads(raw)
                kind = frame.get("type")
            except (orjson.JSONDecodeError, AttributeError):
                raise _Lost("the worker sent a malformed frame") from None
            if kind == "token":
                self._flush_started()
                task.publish(token_event(raw, str(frame.get("t", ""))))
                relayed += 1
            elif kind == "started":
                self._started = frame
            elif kind == "metrics":
                self._flush_started()
                task.publish(Event("metrics", raw, frame))
            elif kind in ("end", "error"):
                self._flush_started()
                self._outcome = _ending(frame, raw)
                break
        if relayed:
            task.tokens_out += relayed
            self._relayed[task.model] += relayed
        return self._outcome is not None

    def _flush_started(self) -> None:
        """Publish the held `started` frame as the task's, once, at the first frame after it."""
        if self.committed:
            return
        self.committed = True
        started = self._started or {}
        self._task.prompt_tokens = int(started.get("prompt_tokens", 0))
        self._task.publish(
            event(
                "started",
                {
                    "type": "started",
                    "job_id": self._task.job_id,
                    "model": self._task.model,
                    "worker_id": self._worker.worker_id,
                    "started_at": started.get("started_at"),
                    "prompt_tokens": self._task.prompt_tokens,
                },
            )
        )


def _data(block: bytes) -> bytes | None:
    """The `data` of one SSE event (None for a comment or an event without data)."""
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:]
    lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _ending(frame: dict[str, Any], raw: bytes) -> Finished:
    if frame["type"] == "error":
        return Finished("failed", Event("error", raw, frame))
    return Finished("cancelled" if frame.get("stop_reason") == "CANCELLED" else "completed", Event("end", raw, frame))


async def _error_body(response: wire.StreamResponse) -> dict[str, Any]:
    with contextlib.suppress(ValueError, wire.WireError):
        doc = orjson.loads(await response.read())
        if isinstance(doc, dict):
            return doc
    return {}


def _refusal(status: int, body: dict[str, Any]) -> Finished | Retry:
    """A worker's non-200 answer to /execute: the client's mistake (400) fails the task; a busy, loading or
    draining worker (503) is skipped for now; anything else is a fault of the worker."""
    code = str(body.get("code", ""))
    if status == 400:
        errors = body.get("errors") if isinstance(body.get("errors"), list) else []
        refused = error_event("INVALID_PARAMS", "the worker refused the request's parameters", False).data or {}
        return Finished("failed", event("error", {**refused, "errors": errors}))
    if status == 503 and code in _BUSY_STATES:
        return Retry(f"{code} (HTTP 503)", busy=True, worker_state=_BUSY_STATES[code])
    return Retry(f"{code or 'error'} (HTTP {status})")
