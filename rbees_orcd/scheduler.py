"""Admission, the per-model queues, placement and each task's attempts on workers.

Everything here runs on the event loop and `dispatch` never awaits, so placement decisions need no lock.
A task is admitted into its model's queue (interactive ahead of batch) and `dispatch` hands queued tasks
to the healthy worker with a free slot and the least load. An attempt that fails before the first token
puts the task back at the head of the queue (a busy worker is skipped until a slot frees there); after
MAX_FAILED_ATTEMPTS faults the task fails.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

from catalog import builtin_entries
from rbees_orcd.errors import (
    ModelNotFound,
    OrcdError,
    PoolUnavailable,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    TaskEnded,
    WorkerFailed,
)
from rbees_orcd.metrics import OrcdMetrics
from rbees_orcd.registry import Registry, State, Worker
from rbees_orcd.relay import Finished, Relay, Retry
from rbees_orcd.settings import Settings
from rbees_orcd.tasks import Event, Status, Task, TaskStore, end_event, error_event, event

log = logging.getLogger("rbees_orcd.scheduler")

MAX_FAILED_ATTEMPTS = 3
_BUILTIN_MODELS = frozenset(entry.id for entry in builtin_entries())


class _Queue:
    """One model's waiting tasks."""

    def __init__(self) -> None:
        self.interactive: deque[Task] = deque()
        self.batch: deque[Task] = deque()

    def __len__(self) -> int:
        return len(self.interactive) + len(self.batch)

    def lane(self, task: Task) -> deque[Task]:
        return self.batch if task.priority == "batch" else self.interactive

    def pop(self) -> Task:
        return (self.interactive or self.batch).popleft()

    def position(self, task: Task) -> int:
        """1-based place in line (0 when the task is not waiting)."""
        if task in self.interactive:
            return self.interactive.index(task) + 1
        if task in self.batch:
            return len(self.interactive) + self.batch.index(task) + 1
        return 0


class Scheduler:
    def __init__(self, settings: Settings, registry: Registry, relay: Relay, metrics: OrcdMetrics) -> None:
        self.settings = settings
        self.registry = registry
        self.relay = relay
        self.metrics = metrics
        self.tasks = TaskStore(settings.retention_s)
        self._queues: dict[str, _Queue] = {}
        self._attempts: dict[str, asyncio.Task[None]] = {}
        self._task_seconds = 1.0  # moving average of a task's time on a worker, for Retry-After
        self.closing = False

    # ---- admission
    def admit(self, task: Task) -> None:
        """Queue the task (and place it at once if a slot is free), or raise why it cannot be taken."""
        try:
            self._check_admission(task.model)
        except OrcdError as e:
            self.metrics.rejections.labels(task.model, e.code).inc()
            raise
        queue = self._queues.setdefault(task.model, _Queue())
        queue.lane(task).append(task)
        self.tasks.add(task)
        self.metrics.admissions.labels(task.model).inc()
        task.set_timer("queue", self.settings.queue_timeout_s, lambda: self._expire(task))
        self.dispatch(task.model)
        position = queue.position(task)
        task.publish(event("queued", {"type": "queued", "job_id": task.job_id, "queue_position": position}))

    def _check_admission(self, model: str) -> None:
        if self.closing:
            raise ShuttingDown("the orchestrator is shutting down", retry_after_s=5)
        workers = self.registry.serving(model)
        if not workers and not (self.registry.knows(model) or model in _BUILTIN_MODELS):
            raise ModelNotFound(f"no worker serves model {model!r} and the catalog does not know it")
        healthy = [w for w in workers if w.state == "healthy"]
        if not healthy:
            retry = math.ceil(self.settings.health_interval_s)
            raise PoolUnavailable(f"no healthy worker serves model {model!r}", retry_after_s=retry)
        if len(self._queues.get(model, ())) >= self.settings.max_queue and not any(w.free_slots for w in healthy):
            slots = sum(w.slots_total for w in healthy)
            waiting = len(self._queues[model]) + 1
            retry = min(60, max(1, math.ceil(self._task_seconds * waiting / slots)))
            raise QueueFull(f"the queue of model {model!r} is full ({self.settings.max_queue})", retry_after_s=retry)

    def queue_position(self, task: Task) -> int:
        queue = self._queues.get(task.model)
        return queue.position(task) if queue is not None else 0

    def queue_depths(self) -> dict[str, int]:
        return {model: len(q) for model, q in self._queues.items()}

    # ---- placement
    def dispatch(self, model: str) -> None:
        """Start queued tasks of the model on free slots, least loaded worker first."""
        queue = self._queues.get(model)
        while queue:
            candidates = [w for w in self.registry.serving(model) if w.free_slots > 0]
            if not candidates:
                return
            worker = min(candidates, key=lambda w: (w.load, -w.free_slots, w.worker_id))
            task = queue.pop()
            task.clear_timer("queue")
            worker.active += 1
            self._attempts[task.job_id] = asyncio.get_running_loop().create_task(self._attempt(task, worker))

    async def _attempt(self, task: Task, worker: Worker) -> None:
        started = time.perf_counter()
        task.attempts += 1
        try:
            outcome = await self.relay.run(task, worker, task.attempts)
        except asyncio.CancelledError:
            self._release(task, worker, freed=True)
            raise
        except Exception:  # noqa: BLE001 - a bug must end the task, not leave its readers waiting forever
            log.exception(f"task {task.job_id}: relay failed", extra={"fields": {"job_id": task.job_id}})
            outcome = Finished("failed", error_event("INTERNAL", "internal error in the relay", True))
        self._release(task, worker, freed=isinstance(outcome, Finished))
        if isinstance(outcome, Finished):
            self._task_seconds = 0.8 * self._task_seconds + 0.2 * (time.perf_counter() - started)
            if outcome.worker_lost:
                self.mark(worker, "unhealthy", str((outcome.event.data or {}).get("message")))
            self.finish(task, outcome.status, outcome.event)  # type: ignore[arg-type]
        else:
            self._retry(task, worker, outcome)
        self.dispatch(task.model)

    def _release(self, task: Task, worker: Worker, *, freed: bool) -> None:
        """The attempt's slot on the worker is ours no more; `freed`: the worker has one more free now."""
        self._attempts.pop(task.job_id, None)
        worker.active = max(0, worker.active - 1)
        if freed:
            worker.saturated = False
            self.dispatch(task.model)

    def _retry(self, task: Task, worker: Worker, retry: Retry) -> None:
        self.metrics.retries.inc()
        if retry.busy:
            worker.saturated = retry.worker_state is None
        else:
            task.failed_attempts += 1
        if retry.worker_state is not None:
            self.mark(worker, retry.worker_state, retry.reason)
        log.info(
            f"task {task.job_id} left worker {worker.worker_id} before its first token: {retry.reason}",
            extra={"fields": {"job_id": task.job_id, "worker_id": worker.worker_id}},
        )
        if task.cancel_requested:
            self.finish(task, "cancelled", end_event("CANCELLED"))
        elif task.failed_attempts >= MAX_FAILED_ATTEMPTS:
            error = WorkerFailed(f"{task.failed_attempts} workers failed before the first token ({retry.reason})")
            self.finish(task, "failed", error_event(error.code, error.message, error.retriable))
        else:
            task.status = "queued"
            self._queues.setdefault(task.model, _Queue()).lane(task).appendleft(task)
            task.set_timer("queue", self.settings.queue_timeout_s, lambda: self._expire(task))

    def _expire(self, task: Task) -> None:
        if self._unqueue(task):
            error = QueueTimeout(f"no worker took the task within {self.settings.queue_timeout_s:g}s")
            self.finish(task, "failed", error_event(error.code, error.message, error.retriable))

    def _unqueue(self, task: Task) -> bool:
        queue = self._queues.get(task.model)
        if queue is None or task not in queue.lane(task):
            return False
        queue.lane(task).remove(task)
        return True

    # ---- workers
    def mark(self, worker: Worker, state: State, reason: str) -> None:
        """Set a worker's state (stored); a worker back to healthy takes queued tasks at once."""
        if worker.state == state:
            return
        previous, worker.state = worker.state, state
        worker.failing_since = time.time() if state == "unhealthy" else None
        if state == "unhealthy":
            self.metrics.worker_failures.labels(worker.worker_id).inc()
        self.registry.save(worker)
        level = logging.WARNING if state == "unhealthy" else logging.INFO
        log.log(
            level,
            f"worker {worker.worker_id}: {previous} -> {state} ({reason})",
            extra={"fields": {"worker_id": worker.worker_id, "state": state}},
        )
        if state == "healthy":
            self.dispatch(worker.model)

    # ---- ending tasks
    def cancel(self, task: Task) -> None:
        """End a task: a queued one at once; a running one through its worker (its stream ends CANCELLED)."""
        if task.ended:
            raise TaskEnded(f"task {task.job_id} has already ended ({task.status})")
        task.cancel_requested = True
        if self._unqueue(task):
            self.finish(task, "cancelled", end_event("CANCELLED"))
            return
        attempt = self._attempts.get(task.job_id)
        worker = self.registry.get(task.worker_id) if task.worker_id else None
        if attempt is not None and worker is not None and task.worker_job_id is not None and task.status == "running":
            asyncio.get_running_loop().create_task(self._cancel_on_worker(task, worker, task.worker_job_id, attempt))
        elif attempt is not None:  # still connecting: hanging up is what cancels it on the worker
            attempt.cancel()
            self.finish(task, "cancelled", end_event("CANCELLED", task.tokens_out))

    async def _cancel_on_worker(self, task: Task, worker: Worker, worker_job_id: str, attempt: asyncio.Task) -> None:
        if not await self.relay.cancel(worker, worker_job_id) and not task.ended:
            attempt.cancel()  # the worker cancels a job whose client hung up
            self.finish(task, "cancelled", end_event("CANCELLED", task.tokens_out))

    def finish(self, task: Task, status: Status, event: Event) -> None:
        if task.ended:
            return
        task.finish(status, event)
        self.tasks.retire(task)
        self.metrics.tasks_ended.labels(task.model, status).inc()
        fields = {"job_id": task.job_id, "model": task.model, "status": status, "tokens_out": task.tokens_out}
        if task.worker_id:
            fields["worker_id"] = task.worker_id
        if task.error is not None:
            fields["code"] = (task.error.data or {}).get("code")
        log.info(f"task {task.job_id} {status} with {task.tokens_out} tokens", extra={"fields": fields})

    async def shutdown(self) -> None:
        """Refuse new tasks and end the queued and running ones (hanging up cancels them on their workers)."""
        self.closing = True
        for task in self.tasks.live():
            if self._unqueue(task) or task.job_id in self._attempts:
                attempt = self._attempts.get(task.job_id)
                if attempt is not None:
                    attempt.cancel()
                error = ShuttingDown("the orchestrator is shutting down")
                self.finish(task, "failed", error_event(error.code, error.message, error.retriable))
        await asyncio.gather(*self._attempts.values(), return_exceptions=True)
