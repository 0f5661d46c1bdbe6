"""A `text/event-stream` response that tells its owner when it ends, however it ends.

Starlette cancels a streaming response whose client hangs up; the generator may then never be resumed
to run its own `finally`, so the clean-up (a reader leaving, a job to cancel) runs here instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rbees_orcd.tasks import Task


class SseStream(StreamingResponse):
    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def until_disconnected(receive: Receive) -> None:
    """Return when the client hangs up (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, waiting: Any) -> bool:
    """Await `waiting` (a coroutine); False, with it cancelled, if the client hangs up first."""
    work = asyncio.ensure_future(waiting)
    gone = asyncio.ensure_future(until_disconnected(receive))
    done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    for future in (work, gone):
        future.cancel()
    return work in done


async def past_queued(task: Task) -> None:
    """Return once the task has an event after its `queued` one (its start, or how it ended)."""
    await task.wait_beyond(1)
