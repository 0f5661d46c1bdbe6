"""Port choice for new workers: the first port from 8001 that no recorded worker uses and that binds."""

from __future__ import annotations

import ipaddress
import socket

from rbees_pool.errors import PortUnavailable

FIRST_PORT = 8001
_LAST_PORT = 65535


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind the port on `host` (an IP address) right now."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(requested: int | None, taken: set[int], host: str = "127.0.0.1") -> int:
    """The requested port if it is free on `host`, else the first free port from FIRST_PORT."""
    if requested is not None:
        if requested in taken or not bindable(requested, host):
            raise PortUnavailable(f"port {requested} is in use; omit --port to pick a free one")
        return requested
    for port in range(FIRST_PORT, _LAST_PORT + 1):
        if port not in taken and bindable(port, host):
            return port
    raise PortUnavailable(f"no free port from {FIRST_PORT}")
