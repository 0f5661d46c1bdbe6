"""Port choice for new workers: the first port from 8001 that no recorded worker uses and that binds."""

from __future__ import annotations

import socket

from rbees_pool.errors import PortUnavailable

FIRST_PORT = 8001
_LAST_PORT = 65535


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind the port right now (the worker listens on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(requested: int | None, taken: set[int]) -> int:
    """The requested port if it is free, else the first free port from FIRST_PORT."""
    if requested is not None:
        if requested in taken or not bindable(requested):
            raise PortUnavailable(f"port {requested} is in use; omit --port to pick a free one")
        return requested
    for port in range(FIRST_PORT, _LAST_PORT + 1):
        if port not in taken and bindable(port):
            return port
    raise PortUnavailable(f"no free port from {FIRST_PORT}")
