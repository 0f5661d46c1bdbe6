"""Run the orchestrator: bind the socket first (a taken port fails at once), then serve with uvicorn.

uvicorn handles SIGTERM/SIGINT: it stops accepting, the app's lifespan ends the tasks still running (their
workers see the connection close and cancel them) and the process exits 0.

Once started, what start-up built (the app, its routes and schemas, the modules: some 80,000 objects that
live as long as the process) is frozen out of the garbage collector's sight: a full collection would walk
it all, a pause of tens of ms in every stream being relayed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from rbees_orcd.app import create_app
from rbees_orcd.settings import Settings
from rbees_workerd.listener import Server
from rbees_workerd.stream import with_server_send

log = logging.getLogger("rbees_orcd.server")


class _Server(Server):
    """uvicorn, but a SIGTERM/SIGINT ends it with exit 0 (uvicorn re-raises a captured signal at the end), and
    the heap start-up leaves is frozen."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        gc.collect()
        gc.freeze()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(settings: Settings, sock: socket.socket) -> int:
    config = uvicorn.Config(
        with_server_send(create_app(settings)),  # (the event streams' body goes straight to uvicorn: sse.py)
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    log.info(
        f"listening on {settings.host}:{settings.port}, registry {settings.db}",
        extra={"fields": {"bind": f"{settings.host}:{settings.port}", "db": str(settings.db)}},
    )
    server.run(sockets=[sock])
    return 0 if server.started else 1
