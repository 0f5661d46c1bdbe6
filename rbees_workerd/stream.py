"""The SSE response of one job: it writes the job's outbox (frames built by output.py) as it fills."""

from __future__ import annotations

import logging

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rbees_workerd.runtime import Job, WorkerRuntime

log = logging.getLogger("rbees_workerd.jobs")


class JobStream(StreamingResponse):
    """The SSE response of one job: one write per wake-up, carrying every frame queued since the last
    one (each token still its own `data:` event). However the response ends before the job does (a
    client gone mid-stream, or before the first frame was even written), the job is cancelled so its
    slot frees at the engine's next step."""

    def __init__(self, runtime: WorkerRuntime, job: Job) -> None:
        super().__init__(
            job.chunks(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._runtime, self._job = runtime, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._job.ended:
                log.info(
                    f"job {self._job.job_id}: client disconnected, cancelling",
                    extra={"fields": {"job_id": self._job.job_id}},
                )
                self._runtime.abandon_job(self._job)
