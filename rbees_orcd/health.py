"""Health polling: every --health-interval, each registered worker's /health sets its state.

A worker that misses MISSED_POLLS polls in a row is marked unhealthy (no placement; one slow answer on a
busy host is no failure); one still silent --drop-after seconds after it began failing is removed from
the registry. The relay marks a worker unhealthy at once when a stream to it breaks. A worker that
answers again is used again. One that answers for another model than it registered with (its port
reused by another worker) is unhealthy too.
"""

from __future__ import annotations

import asyncio
import logging
import time

from rbees_orcd.registry import State, Worker
from rbees_orcd.scheduler import Scheduler

log = logging.getLogger("rbees_orcd.health")

MISSED_POLLS = 2
_STATES: dict[str, State] = {"ok": "healthy", "loading": "loading", "draining": "draining", "stopped": "draining"}


class HealthPoller:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._registry = scheduler.registry
        self._settings = scheduler.settings

    async def run(self) -> None:
        while True:
            await self.poll_all()
            await asyncio.sleep(self._settings.health_interval_s)

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(w) for w in self._registry.all()))

    async def poll(self, worker: Worker) -> None:
        doc = await self._scheduler.relay.health(worker)
        if self._registry.get(worker.worker_id) is not worker:
            return  # removed or replaced meanwhile
        if doc is None:
            self._failing(worker, "no answer to /health")
            return
        if doc.get("model") != worker.model:
            self._failing(worker, f"it serves {doc.get('model')!r}, not {worker.model!r}")
            return
        worker.last_seen = time.time()
        worker.missed_polls = 0
        state = _STATES.get(str(doc.get("status")), "unhealthy")
        if isinstance(doc.get("slots_total"), int) and doc["slots_total"] > 0:
            worker.slots_total = doc["slots_total"]
        if isinstance(doc.get("slots_free"), int) and doc["slots_free"] > 0:
            worker.saturated = False
        self._scheduler.mark(worker, state, f"/health says {doc.get('status')}")
        if state == "healthy":
            self._scheduler.dispatch(worker.model)  # slots it reports free may have been waited for

    def _failing(self, worker: Worker, reason: str) -> None:
        worker.missed_polls += 1
        if worker.missed_polls < MISSED_POLLS and worker.state != "unhealthy":
            return
        self._scheduler.mark(worker, "unhealthy", reason)
        since = worker.failing_since or time.time()
        if time.time() - since >= self._settings.drop_after_s:
            self._registry.remove(worker.worker_id)
            log.warning(
                f"worker {worker.worker_id} removed: unreachable for {time.time() - since:.0f}s ({reason})",
                extra={"fields": {"worker_id": worker.worker_id}},
            )
