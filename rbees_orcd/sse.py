"""A task's events as a `text/event-stream` response, written as they are published: the relay's hot path.

Every token wakes the response's own loop once, and that loop writes everything published since in one body
message, straight to the server's `send` (kept in the scope by `with_server_send`, as served), past the middlewares:
they only look at a response's start message, which still goes through them (the correlation id header). A
StreamingResponse would add, for each frame, an async generator step and a coroutine per middleware, and a
task group to watch for the client hanging up; here a watcher that waits for that sets a flag and wakes the
loop. The clean-up (a reader leaving, a job to cancel) runs however the response ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from rbees_orcd.tasks import Task
from rbees_workerd.stream import SERVER_SEND, until_disconnected

Render = Callable[[Task, int], bytes]
"""The task's events from an index on, as the body to write."""


class SseStream(Response):
    def __init__(self, task: Task, start: int, render: Render, on_close: Callable[[], None]) -> None:
        self.status_code = 200
        self.media_type = "text/event-stream"  # not the class's: the routes' documented errors are JSON
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._task = task
        self._start = start
        self._render = render
        self._on_close = on_close
        self._gone = False  # the client hung up
        self._waiter: asyncio.Future[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.get_running_loop().create_task(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await self._stream(scope.get(SERVER_SEND, send))  # (as rbees_workerd.stream.JobStream)
        finally:
            watcher.cancel()
            self._on_close()

    async def _stream(self, send: Send) -> None:
        task, position = self._task, self._start
        while not self._gone:
            published = len(task.events)
            if position < published:
                body = self._render(task, position)
                position = published
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            elif task.ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            else:
                self._waiter = task.next_publish()
                await self._waiter

    async def _watch(self, receive: Receive) -> None:
        await until_disconnected(receive)
        self._gone = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


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
