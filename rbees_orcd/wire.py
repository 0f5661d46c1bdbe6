"""One POST to a worker, its response read straight off the socket: the relay's hot path.

A worker's /execute answer is a long stream of small SSE chunks, one per decode step. httpx reads each
through several layers (a cancel scope and an h11 event per read), which cost more than the relay's own
work; here asyncio's stream reader and httptools' parser (uvicorn's own) do only what the relay needs.
One connection per request (`Connection: close`): a stream holds its connection for the whole answer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

_READ = 65536


class WireError(Exception):
    """The connection failed, or the worker's answer is not HTTP."""


class StreamResponse:
    """A worker's answer: `status` once open, then its body as it arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._headers_done = False
        self._complete = False
        self.status = 0

    # httptools' callbacks
    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True

    async def _read_more(self) -> None:
        try:
            data = await self._reader.read(_READ)
        except OSError as e:
            raise WireError(f"reading from the worker: {e}") from None
        if not data:
            if not self._complete:
                raise WireError("the worker closed the connection mid-answer")
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            raise WireError(f"the worker's answer is not HTTP: {e}") from None

    async def open(self) -> None:
        while not self._headers_done:
            await self._read_more()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, however the worker framed them (chunked or not)."""
        while True:
            if self._body:
                out = b"".join(self._body)
                self._body.clear()
                yield out
            if self._complete:
                return
            await self._read_more()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        self._writer.close()


async def post(url: str, body: bytes, headers: dict[str, str], connect_timeout_s: float) -> StreamResponse:
    """Send `body` (JSON) to `url` and wait for the answer's status and headers."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl.create_default_context() if secure else None),
            connect_timeout_s,
        )
    except (TimeoutError, OSError) as e:
        raise WireError(f"cannot connect to {host}:{port}: {str(e) or type(e).__name__}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"POST {target} HTTP/1.1", f"Host: {authority}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers.items())]  # fmt: skip
    response = StreamResponse(reader, writer)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        await response.open()
    except OSError as e:
        response.close()
        raise WireError(f"sending to the worker: {e}") from None
    except BaseException:  # WireError, a cancellation: the connection goes with it
        response.close()
        raise
    return response
