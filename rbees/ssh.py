"""Fabric connections with OpenSSH's host-key rules: unknown keys refused unless the operator opts in, changed
keys always refused; every connection failure becomes one RbeesError naming the host (and the hop)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
from fabric import Config, Connection

from rbees.errors import AuthFailed, HostKeyChanged, HostKeyUnknown, RbeesError, UnknownHost, Unreachable
from rbees.hosts import Endpoint, Host

_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
_KEEPALIVE_S = 15


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint (what `ssh-keygen -lf` prints), so the operator can compare them."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class KnownHosts:
    """The host-key decisions of one run, shared by its connections (a multi-host run's threads included):
    with `accept_new`, an unknown key is appended to the endpoint's first known_hosts file, once."""

    def __init__(self, accept_new: bool) -> None:
        self.accept_new = accept_new
        self._lock = threading.Lock()
        self._recorded: dict[str, paramiko.PKey] = {}

    def guard(self, client: paramiko.SSHClient, endpoint: Endpoint, where: str) -> None:
        """Load the endpoint's known_hosts files into `client` and make it consult us for unknown keys."""
        for path in (*endpoint.known_hosts, *_GLOBAL_KNOWN_HOSTS):
            if os.path.isfile(path):
                client.load_system_host_keys(path)
        client.set_missing_host_key_policy(_Policy(self, endpoint, where))

    def unknown(self, endpoint: Endpoint, where: str, key: paramiko.PKey) -> None:
        """Refuse an unknown key, or record it when the operator opted in."""
        name = endpoint.known_hosts_name
        if not self.accept_new:
            raise HostKeyUnknown(
                f"{where}: {name} offered {key.get_name()} key {fingerprint(key)}, which is in none of "
                f"{', '.join(endpoint.known_hosts)}; check it on the host (ssh-keygen -lf /etc/ssh/ssh_host_*.pub), "
                "then rerun with --accept-new-host-key to record it"
            )
        with self._lock:
            earlier = self._recorded.get(name)
            if earlier is not None and earlier != key:
                raise _changed(where, name, key, earlier)
            if earlier is None:
                _append_known_host(Path(endpoint.known_hosts[0]), name, key)
                self._recorded[name] = key


class _Policy(paramiko.MissingHostKeyPolicy):
    def __init__(self, known: KnownHosts, endpoint: Endpoint, where: str) -> None:
        self._known, self._endpoint, self._where = known, endpoint, where

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self._known.unknown(self._endpoint, self._where, key)


def _append_known_host(path: Path, name: str, key: paramiko.PKey) -> None:
    """One OpenSSH known_hosts line; the file (and its folder) readable by the owner only when created here."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="ascii") as handle:
        handle.write(f"{name} {key.get_name()} {key.get_base64()}\n")


def _changed(where: str, name: str, key: paramiko.PKey, expected: paramiko.PKey) -> HostKeyChanged:
    return HostKeyChanged(
        f"{where}: {name} offered {key.get_name()} key {fingerprint(key)} but known_hosts has "
        f"{expected.get_name()} {fingerprint(expected)}; someone may be intercepting the connection. If the host "
        f"was reinstalled, remove the old key (ssh-keygen -R '{name}') and connect again"
    )


@contextlib.contextmanager
def connect(host: Host, known: KnownHosts) -> Iterator[Connection]:
    """An open Fabric connection to `host` (through its ProxyJump hops); closed, hops included, on exit."""
    opened: list[Connection] = []
    try:
        yield _open(host, host.endpoint, known, opened, gateway=None)
    finally:
        for connection in reversed(opened):
            connection.close()


def _open(
    host: Host, endpoint: Endpoint, known: KnownHosts, opened: list[Connection], gateway: Connection | None
) -> Connection:
    """Open `endpoint`; like `ssh -J a,b`, hop a is reached by its own config's hops, each later hop through
    the one before it."""
    if gateway is None and endpoint.jump:
        first, *rest = endpoint.jump
        gateway = _open(host, first, known, opened, gateway=None)
        for hop in rest:
            gateway = _open(host, hop, known, opened, gateway)
    is_hop = endpoint is not host.endpoint
    where = f"{host.name}: jump host {endpoint.address}" if is_hop else f"{host.name} ({endpoint.address})"
    connection = Connection(
        endpoint.hostname,
        user=endpoint.user,
        port=endpoint.port,
        config=Config(lazy=True),  # no Fabric/invoke config files: the resolved endpoint says everything
        gateway=gateway,
        connect_timeout=endpoint.connect_timeout,
        connect_kwargs={
            "key_filename": [path for path in endpoint.identity_files if os.path.isfile(path)],
            "look_for_keys": not endpoint.identities_only,
            "allow_agent": not endpoint.identities_only,
            "banner_timeout": endpoint.connect_timeout,
            "auth_timeout": endpoint.connect_timeout,
        },
    )
    known.guard(connection.client, endpoint, where)
    opened.append(connection)
    with _translated(host, endpoint, where):
        connection.open()
    connection.transport.set_keepalive(_KEEPALIVE_S)
    return connection


@contextlib.contextmanager
def _translated(host: Host, endpoint: Endpoint, where: str) -> Iterator[None]:
    """paramiko's and the socket layer's exceptions -> one RbeesError each, with its stable code."""
    try:
        yield
    except RbeesError:
        raise
    except paramiko.BadHostKeyException as exc:
        raise _changed(where, endpoint.known_hosts_name, exc.key, exc.expected_key) from None
    except paramiko.AuthenticationException as exc:
        keys = ", ".join(endpoint.identity_files) or "the default keys and the agent"
        raise AuthFailed(f"{where}: the server refused {endpoint.user!r} with {keys} ({exc})") from None
    except socket.gaierror:
        why = "" if host.source != "address" else " (it is neither in the hosts file nor an ssh-config alias)"
        raise UnknownHost(f"{where}: cannot resolve {endpoint.hostname!r}{why}") from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:  # every address of the host failed
        reasons = sorted({(error.strerror or str(error)).lower() for error in exc.errors.values()})
        raise Unreachable(f"{where}: {', '.join(reasons)}") from None
    except TimeoutError:
        raise Unreachable(f"{where}: no answer within {endpoint.connect_timeout:g} s") from None
    except paramiko.ChannelException as exc:
        raise Unreachable(f"{where}: the jump host could not open a tunnel to it ({exc})") from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise Unreachable(f"{where}: {exc or type(exc).__name__}") from None
