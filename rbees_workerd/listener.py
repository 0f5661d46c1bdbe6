"""The daemons' listening socket: bound before anything else starts, then served by uvicorn with every
pending connection accepted at once (rbees-workerd and rbees-orcd).

uvloop (libuv) accepts one connection per event-loop iteration while the loop has other work ready: with 256
requests arriving together while the first streams' frames go out, a worker took its last connections one an
iteration, 5-10 ms apart, up to 250 ms after their clients had connected (H100, 0.5B shape), and every stream
decoding beside the late ones waited for them. `Server` watches the listening socket itself and, each time it
is readable, accepts every connection pending and hands each to uvicorn's protocol, as asyncio's own loop does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import uvicorn

log = logging.getLogger("rbees_workerd.listener")

_RETRY_S = 1.0  # out of descriptors or memory: accepting resumes after this long (asyncio's own pause)
_SPENT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def bind_socket(host: str, port: int) -> socket.socket:
    """The daemon's listening socket, bound before anything else starts, so that a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Server(uvicorn.Server):
    """uvicorn on the given bound sockets, accepting each socket's pending connections all at once."""

    _listening: list[socket.socket]

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the lifespan and the server's state, without a listener of its own
        self._listening = list(sockets or [])
        for sock in self._listening:
            sock.listen(self.config.backlog)
            sock.setblocking(False)
            self._watch(sock)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        listening, self._listening = self._listening, []
        loop = asyncio.get_running_loop()
        for sock in listening:
            loop.remove_reader(sock.fileno())
        await super().shutdown(sockets)

    def _watch(self, sock: socket.socket) -> None:
        if sock in self._listening:  # (not once shut down)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        """Every connection pending on `sock`, each handed to uvicorn's HTTP protocol."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client went away while it waited
            except OSError as e:
                if e.errno not in _SPENT:
                    raise
                log.error(
                    f"cannot accept connections ({e.strerror}); trying again in {_RETRY_S:.0f} s",
                    extra={"fields": {"errno": e.errno}},
                )
                loop.remove_reader(sock.fileno())
                loop.call_later(_RETRY_S, self._watch, sock)
                return
            conn.setblocking(False)
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (each SSE frame goes out at once)
            loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol, conn)
        except OSError:
            conn.close()  # reset before its transport was set up: nothing was read from it

    def _protocol(self) -> asyncio.Protocol:
        """uvicorn's protocol for one connection, as its own listener makes it."""
        config = self.config
        return config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=self.server_state, app_state=self.lifespan.state
        )
