"""The SSE response of one job: it writes the job's outbox (frames built by output.py) as it fills.

Its start (status and headers) goes through the app's middlewares like any response: the correlation id's
header is added there, and Starlette's and FastAPI's error middlewares note that the response has started. Its
body goes straight to the ASGI server's `send`, which `with_server_send` leaves in the scope: no middleware of
this app looks at a body message. Through StreamingResponse (its loop and its anyio task group) and four wrappers
of `send` (the route's and ExceptionMiddleware's exception handling, CorrelationMiddleware, ServerErrorMiddleware),
a body write a stream and a step took some 8% of the event loop's samples at 256 streams (py-spy).
"""

from __future__ import annotations

import asyncio
import logging

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from rbees_workerd.runtime import Job, WorkerRuntime

log = logging.getLogger("rbees_workerd.jobs")

SERVER_SEND = "rbees.server_send"
"""The scope key of the ASGI server's own `send`, kept there before the app's middlewares wrap it (rbees-orcd's
event streams write their body to it too)."""


def with_server_send(app: ASGIApp) -> ASGIApp:
    """`app` as served: it leaves the server's `send` in each request's scope for JobStream's body."""

    async def served(scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await app(scope, receive, send)

    return served


class JobStream(Response):
    """The SSE response of one job: one write per wake-up, carrying every frame queued since the last
    one (each token still its own `data:` event). However the response ends before the job does (a
    client gone mid-stream, or before the first frame was even written), the job is cancelled so its
    slot frees at the engine's next step."""

    media_type = "text/event-stream"

    def __init__(self, runtime: WorkerRuntime, job: Job) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._runtime, self._job = runtime, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        job = self._job
        body = scope.get(SERVER_SEND, send)
        listener = asyncio.create_task(_hang_up_on_disconnect(receive, job))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in job.chunks():
                await body({"type": "http.response.body", "body": data, "more_body": True})
            await body({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            listener.cancel()
            if not job.ended:
                log.info(f"job {job.job_id}: client disconnected, cancelling", extra={"fields": {"job_id": job.job_id}})
                self._runtime.abandon_job(job)


async def _hang_up_on_disconnect(receive: Receive, job: Job) -> None:
    await until_disconnected(receive)
    job.hang_up()


async def until_disconnected(receive: Receive) -> None:
    """Return when the client hangs up (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
