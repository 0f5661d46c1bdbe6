"""Run the orchestrator: bind the socket first (a taken port fails at once), then serve with uvicorn.

uvicorn handles SIGTERM/SIGINT: it stops accepting, the app's lifespan ends the tasks still running (their
workers see the connection close and cancel them) and the process exits 0.
"""

from __future__ import annotations

import logging
import socket

import uvicorn

from rbees_orcd.app import create_app
from rbees_orcd.settings import Settings

log = logging.getLogger("rbees_orcd.server")


def bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(settings: Settings, sock: socket.socket) -> int:
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    log.info(
        f"listening on {settings.host}:{settings.port}, registry {settings.db}",
        extra={"fields": {"bind": f"{settings.host}:{settings.port}", "db": str(settings.db)}},
    )
    server.run(sockets=[sock])
    return 0 if server.started else 1
