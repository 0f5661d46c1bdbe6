"""One POST to a worker, its answer read straight off the socket: the relay's hot path.

A worker's /execute answer is a long stream of small SSE chunks, one per decode step. An asyncio protocol
takes each chunk as the socket delivers it, runs httptools' parser (uvicorn's own) over it and hands the
body to the reader's callback in that same call: no stream buffer to copy through, and no future or task
to wake per chunk (an asyncio StreamReader costs both; httpx, before it, added its own layers on top). One
connection per request (`Connection: close`): a stream holds its connection for the whole answer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

Consumer = Callable[[bytes], bool]
"""Takes a piece of the body as it arrives; True once it wants no more."""


class WireError(Exception):
    """The connection failed, or the worker's answer is not HTTP."""


class StreamResponse(asyncio.Protocol):
    """A worker's answer: `status` once open, then its body, handed to a consumer as it arrives."""

    def __init__(self) -> None:
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._consumer: Consumer | None = None
        self._early: list[bytes] = []  # body that came before a consumer did
        self._complete = False  # the whole body is in
        self._satisfied = False  # the consumer wants no more
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.status = 0

    # asyncio's callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(WireError(f"the worker's answer is not HTTP: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        # (the parser holds this protocol: a cycle that would wait in the oldest generation for a full
        # collection, whose pauses hold up every stream; asyncio calls nothing here after this)
        self._parser = None
        if not (self._complete or self._satisfied):
            reason = f"the connection to the worker broke: {exc}" if exc else "the worker closed it mid-answer"
            self._fail(WireError(reason))

    # httptools' callbacks
    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self.status = self._parser.get_status_code()
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._consumer is None:
            self._early.append(body)
        else:
            self._consume(body)

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    # the reader's side
    async def open(self) -> None:
        """Return once the status and headers are in."""
        await self._until(lambda: self.status != 0)

    async def stream(self, consumer: Consumer) -> None:
        """Hand the body to `consumer` as it arrives; return once it is all in or the consumer wants no more."""
        self._consumer = consumer
        early, self._early = self._early, []
        for body in early:
            self._consume(body)
        await self._until(lambda: self._complete or self._satisfied)

    async def read(self) -> bytes:
        parts: list[bytes] = []

        def keep(body: bytes) -> bool:
            parts.append(body)
            return False

        await self.stream(keep)
        return b"".join(parts)

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def _consume(self, body: bytes) -> None:
        if self._satisfied or self._error is not None:
            return
        assert self._consumer is not None
        try:
            self._satisfied = self._consumer(body)
        except Exception as e:  # the consumer's verdict on what it read: the answer ends with it
            self._fail(e)
            return
        if self._satisfied:
            self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def post(url: str, body: bytes, headers: dict[str, str], connect_timeout_s: float) -> StreamResponse:
    """Send `body` (JSON) to `url` and wait for the answer's status and headers."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    loop = asyncio.get_running_loop()
    try:
        _, response = await asyncio.wait_for(
            loop.create_connection(StreamResponse, host, port, ssl=ssl.create_default_context() if secure else None),
            connect_timeout_s,
        )
    except (TimeoutError, OSError) as e:
        raise WireError(f"cannot connect to {host}:{port}: {str(e) or type(e).__name__}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"POST {target} HTTP/1.1", f"Host: {authority}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers.items())]  # fmt: skip
    try:
        response.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await response.open()
    except BaseException:  # WireError, a cancellation: the connection goes with it
        response.close()
        raise
    return response
