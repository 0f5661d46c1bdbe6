"""Tasks: one client request from admission to its last event, and the log of events its readers replay.

Every event a task publishes keeps its index, which is its SSE `id:`; a reader that reconnects with
`Last-Event-ID: N` replays from N+1, so it sees every event once, in order. Publishing wakes the readers
waiting on the task; a reader that wakes late takes every event published meanwhile in one write.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import orjson

Priority = Literal["interactive", "batch"]
Status = Literal["queued", "running", "completed", "failed", "cancelled"]
ENDED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class Event(NamedTuple):
    """One published frame: its type, its JSON document's bytes (as sent) and that document parsed. A token is
    logged as a plain tuple of the same fields instead (see token_event), its text in the last one."""

    type: str
    raw: bytes
    data: dict[str, Any] | None = None
    text: str = ""


Entry = tuple[str, bytes, dict[str, Any] | None, str]
"""One entry of a task's log: an Event, or a token as a plain tuple of the same fields (see token_event)."""


def event(type: str, data: dict[str, Any]) -> Event:
    return Event(type, orjson.dumps(data), data)


def token_event(raw: bytes, text: str) -> Entry:
    """A token, the bulk of every log, as an exact tuple of atomic values: the garbage collector stops tracking
    such a tuple at its first collection, but tracks a NamedTuple (a subclass) for good, and a full collection
    would walk every token the retained tasks hold, a pause that grows with them. The log is read by position."""
    return ("token", raw, None, text)


class Task:
    """A request for one model: its worker-bound body, its state, and its event log."""

    def __init__(self, model: str, request: dict[str, Any], priority: Priority = "interactive") -> None:
        self.job_id = f"job-{uuid.uuid4().hex[:20]}"
        self.model = model
        self.request = request  # the /execute body, less job_id
        self.priority = priority
        self.created_at = time.time()
        self.admitted_at = time.perf_counter()
        self.status: Status = "queued"
        self.events: list[Entry] = []
        self.worker_id: str | None = None
        self.worker_job_id: str | None = None
        self.attempts = 0  # on workers, each with its own worker-side job id
        self.failed_attempts = 0  # attempts that failed through a fault of the worker
        self.tokens_out = 0
        self.prompt_tokens = 0
        self.readers = 0
        self.cancel_requested = False
        self.error: Event | None = None
        self.end: Event | None = None
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self._waiters: list[asyncio.Future[None]] = []  # one per reader: a reader's cancel is its own

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def publish(self, entry: Entry) -> None:
        self.events.append(entry)
        self._wake()

    def finish(self, status: Status, event: Event) -> None:
        """Publish the last event (end or error) and settle the status; later calls change nothing."""
        if self.ended:
            return
        self.status = status
        if event.type == "error":
            self.error = event
        else:
            self.end = event
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        self.publish(event)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def next_publish(self) -> asyncio.Future[None]:
        """A future done at the next event; its owner may also end its wait by setting it (or cancelling it)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def wait_beyond(self, count: int) -> None:
        """Return once more than `count` events exist or the task has ended."""
        while len(self.events) <= count and not self.ended:
            await self.next_publish()

    async def wait_ended(self) -> None:
        while not self.ended:
            await self.wait_beyond(len(self.events))

    def set_timer(self, name: str, delay_s: float, callback: Callable[[], None]) -> None:
        self.clear_timer(name)
        self.timers[name] = asyncio.get_running_loop().call_later(delay_s, callback)

    def clear_timer(self, name: str) -> None:
        handle = self.timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def summary(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model": self.model,
            "status": self.status,
            "priority": self.priority,
            "worker_id": self.worker_id,
            "tokens_out": self.tokens_out,
            "events": len(self.events),
            "created_at": self.created_at,
        }


def sse_frames(task: Task, start: int) -> bytes:
    """The task's events from index `start` as SSE, each with its `id:` and the worker's document as it came."""
    return b"".join([b"id: %d\ndata: %s\n\n" % (i, raw) for i, (_, raw, _, _) in enumerate(task.events[start:], start)])


def end_event(stop_reason: str, tokens_out: int = 0) -> Event:
    return event("end", {"type": "end", "tokens_out": tokens_out, "decode_time_ms": 0.0, "stop_reason": stop_reason})


def error_event(code: str, message: str, retriable: bool) -> Event:
    return event("error", {"type": "error", "code": code, "message": message, "retriable": retriable})


class TaskStore:
    """The live and recently ended tasks by id; an ended task is kept `retention_s` for late readers."""

    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s
        self._tasks: dict[str, Task] = {}

    def add(self, task: Task) -> None:
        self._tasks[task.job_id] = task

    def get(self, job_id: str) -> Task | None:
        return self._tasks.get(job_id)

    def retire(self, task: Task) -> None:
        """Drop the ended task after the retention time."""
        asyncio.get_running_loop().call_later(self.retention_s, self._tasks.pop, task.job_id, None)

    def live(self) -> list[Task]:
        return [t for t in self._tasks.values() if not t.ended]
