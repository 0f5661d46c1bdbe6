"""Which machine a host name means: hosts.toml entries, ssh-config aliases, or `user@host[:port]`.

Resolution follows OpenSSH, so a host the operator already reaches with `ssh NAME` is reached the same way:
hosts.toml maps a name to an ssh destination plus where rbees lives there; the destination goes through the
ssh config (HostName, User, Port, IdentityFile, IdentitiesOnly, ProxyJump, UserKnownHostsFile, ConnectTimeout).
"""

from __future__ import annotations

import getpass
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import paramiko

from rbees.errors import InvalidArgument, InvalidHostsFile

_HOST_KEYS = {"ssh", "rbees_pool", "home", "repo"}
_DESTINATION = re.compile(
    r"^(?:ssh://)?(?:(?P<user>[\w.$-]+)@)?(?P<host>\[[0-9A-Fa-f:.%\w]+\]|[\w.-]+)(?::(?P<port>\d{1,5}))?$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_HOPS = 8
_DEFAULT_CONNECT_TIMEOUT_S = 15.0


def hosts_file() -> Path:
    """RBEES_HOSTS_FILE, else ~/.config/rbees/hosts.toml (XDG_CONFIG_HOME honoured)."""
    if explicit := os.environ.get("RBEES_HOSTS_FILE"):
        return Path(explicit).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "rbees" / "hosts.toml"


def ssh_config_file() -> Path:
    """RBEES_SSH_CONFIG, else ~/.ssh/config."""
    return Path(os.environ.get("RBEES_SSH_CONFIG") or Path.home() / ".ssh" / "config").expanduser()


@dataclass(frozen=True)
class Endpoint:
    """One SSH server to connect to, fully resolved; `jump` are the ProxyJump hops reached first, in order."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    identities_only: bool
    known_hosts: tuple[str, ...]  # user known_hosts files; accepted keys are recorded in the first
    connect_timeout: float
    jump: tuple[Endpoint, ...] = ()

    @property
    def address(self) -> str:
        """user@host:port, as people write it."""
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{self.user}@{host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts files use for this server: `host`, or `[host]:port` off port 22."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


@dataclass(frozen=True)
class Host:
    """A pool host: how to reach it and where rbees lives on it."""

    name: str
    source: str  # "hosts.toml", "ssh-config" or "address"
    endpoint: Endpoint
    rbees_pool: str  # the remote command (a shell word list written by the operator; `~` expands remotely)
    home: str | None  # RBEES_HOME on the host (passed as --root); None: the host's own default
    repo: str | None  # the checkout `rbees pool git|setup` manage


@dataclass(frozen=True)
class _Entry:
    ssh: str
    rbees_pool: str | None
    home: str | None
    repo: str | None


class Inventory:
    """The hosts file and the ssh config, read once per command."""

    def __init__(self, hosts_path: Path | None = None, ssh_config_path: Path | None = None) -> None:
        self.hosts_path = hosts_path or hosts_file()
        self.ssh_config_path = ssh_config_path or ssh_config_file()
        self._entries = _read_hosts_file(self.hosts_path)
        self._ssh_config = _read_ssh_config(self.ssh_config_path)

    def names(self) -> list[str]:
        """The hosts of the hosts file, in file order (what `--all` means)."""
        return list(self._entries)

    def aliases(self) -> list[str]:
        """Concrete `Host` names of the ssh config (patterns left out), sorted."""
        return sorted(h for h in self._ssh_config.get_hostnames() if not set(h) & set("*?!"))

    def resolve(self, name: str) -> Host:
        """A hosts-file name, an ssh-config alias or `[user@]host[:port]`."""
        entry = self._entries.get(name)
        if entry is not None:
            source, destination = "hosts.toml", entry.ssh
        else:
            source = "ssh-config" if name in self.aliases() else "address"
            destination, entry = name, _Entry(name, None, None, None)
        endpoint = self.endpoint(destination)
        rbees_pool = entry.rbees_pool or (f"{entry.repo.rstrip('/')}/.venv/bin/rbees-pool" if entry.repo else None)
        return Host(name, source, endpoint, rbees_pool or "rbees-pool", entry.home, entry.repo)

    def endpoint(self, destination: str, depth: int = 0) -> Endpoint:
        """Resolve an ssh destination through the ssh config, hops included (as `ssh DESTINATION` would)."""
        if depth > _MAX_HOPS:
            raise InvalidArgument(f"ProxyJump chain longer than {_MAX_HOPS} hops at {destination!r} (a loop?)")
        user, host, port = parse_destination(destination)
        config = self._ssh_config.lookup(host)
        if "proxycommand" in config and config["proxycommand"].lower() != "none":
            raise InvalidArgument(f"{host}: ProxyCommand is not supported by rbees; use ProxyJump")
        jumps = config.get("proxyjump", "none")
        hops = () if jumps.lower() == "none" else tuple(self.endpoint(hop, depth + 1) for hop in jumps.split(","))
        known = config.get("userknownhostsfile", "~/.ssh/known_hosts ~/.ssh/known_hosts2").split()
        return Endpoint(
            hostname=config.get("hostname", host),
            port=port or int(config.get("port", 22)),
            user=user or config.get("user") or getpass.getuser(),
            identity_files=tuple(config.get("identityfile", [])),
            identities_only=config.get("identitiesonly", "no").lower() == "yes",
            known_hosts=tuple(os.path.expanduser(path) for path in known),
            connect_timeout=float(config.get("connecttimeout", _DEFAULT_CONNECT_TIMEOUT_S)),
            jump=hops,
        )


def parse_destination(destination: str) -> tuple[str | None, str, int | None]:
    """`[ssh://][user@]host[:port]` (IPv6 in brackets) -> (user, host, port)."""
    match = _DESTINATION.match(destination)
    port = int(match["port"]) if match and match["port"] else None
    if match is None or (port is not None and not 0 < port < 65536):
        raise InvalidArgument(f"{destination!r} is not a host name, an alias or user@host[:port]")
    return match["user"], match["host"].strip("[]"), port


def _read_hosts_file(path: Path) -> dict[str, _Entry]:
    """Parse hosts.toml (absent: no hosts); every mistake is reported with the file's name."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidHostsFile(f"{path}: {exc}") from exc
    hosts = doc.get("hosts", {})
    if set(doc) - {"hosts"} or not isinstance(hosts, dict):
        raise InvalidHostsFile(f"{path}: expected only [hosts.NAME] tables")
    entries = {}
    for name, table in hosts.items():
        if not _NAME.match(name):
            raise InvalidHostsFile(f"{path}: host name {name!r} must be letters, digits, '.', '_' or '-'")
        if not isinstance(table, dict) or set(table) - _HOST_KEYS:
            raise InvalidHostsFile(f"{path}: [hosts.{name}] may only set {', '.join(sorted(_HOST_KEYS))}")
        if any(not isinstance(value, str) or not value for value in table.values()):
            raise InvalidHostsFile(f"{path}: [hosts.{name}] values must be non-empty strings")
        entries[name] = _Entry(table.get("ssh", name), table.get("rbees_pool"), table.get("home"), table.get("repo"))
    return entries


def _read_ssh_config(path: Path) -> paramiko.SSHConfig:
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except FileNotFoundError:
        return paramiko.SSHConfig()
    except (OSError, UnicodeDecodeError, paramiko.ssh_exception.ConfigParseError) as exc:
        raise InvalidHostsFile(f"{path}: {exc}") from exc
