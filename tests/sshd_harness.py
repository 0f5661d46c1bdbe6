"""A real OpenSSH sshd on loopback for the `rbees` tests, and the client-side files that reach it.

Everything lives under a temporary folder: the server's host key and sshd_config (our own port, key-only
login for the user running the tests, sessions given the test's environment through SetEnv), a client key
pair, an ssh config with aliases, a hosts.toml and a known_hosts. Nothing reads or writes the real ~/.ssh:
`rbees` runs with HOME pointing into the folder. The one system path touched is sshd's privilege-separation
directory (/run/sshd), created when the tests run as root and it is missing, as the ssh service would.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RBEES = Path(sys.executable).parent / "rbees"
POOL = Path(sys.executable).parent / "rbees-pool"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
USER = getpass.getuser()
# What the remote sessions need from the test's own environment (how rbees-pool and its workers import and
# cache); RBEES_HOME is the host's default pool, set per server.
_PASSED_ENV = ("PYTHONPATH", "NUMBA_CACHE_DIR", "RBEES_TEST_MODEL")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def keygen(path: Path, comment: str) -> Path:
    """A fresh ed25519 key pair at `path` (and `path.pub`); returns the public key's path."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True, timeout=30
    )
    return path.with_suffix(".pub")


def ssh_fingerprint(public_key: Path) -> str:
    """`ssh-keygen -lf`'s SHA256 fingerprint: what rbees must name when it refuses the key."""
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


@dataclass
class Sshd:
    """A running sshd and the files of a client that may log in to it."""

    folder: Path
    port: int
    host_public_key: Path
    client_key: Path
    default_home: Path  # the pool a session gets when no `home` is configured (RBEES_HOME of the session)

    @property
    def known_hosts_line(self) -> str:
        kind, blob = self.host_public_key.read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"


@contextlib.contextmanager
def run_sshd(folder: Path) -> Iterator[Sshd]:
    """Start sshd on a free loopback port; stopped (and its sessions with it) on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    host_public = keygen(folder / "ssh_host_ed25519_key", "rbees-test-host")
    client_public = keygen(folder / "client_key", "rbees-test-client")
    (folder / "authorized_keys").write_text(client_public.read_text())
    default_home = folder / "pool-default"
    env = {name: os.environ[name] for name in _PASSED_ENV if os.environ.get(name)}
    env["RBEES_HOME"] = str(default_home)
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(
        "\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'ssh_host_ed25519_key'}",
            f"AuthorizedKeysFile {folder / 'authorized_keys'}", f"PidFile {folder / 'sshd.pid'}",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "AllowTcpForwarding yes",
            "MaxStartups 64", "MaxSessions 64", "LogLevel VERBOSE",
            "SetEnv " + " ".join(f'{name}="{value}"' for name, value in env.items()),
        ]) + "\n"
    )  # fmt: skip
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = (folder / "sshd.log").open("wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, proc, folder / "sshd.log")
        yield Sshd(folder, port, host_public, folder / "client_key", default_home)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise AssertionError(f"sshd did not listen on {port}: {log.read_text()}")


@dataclass
class Client:
    """The operator's side: HOME, ssh config, hosts.toml and known_hosts in one folder, and `rbees` to run."""

    home: Path
    sshd: Sshd

    @property
    def ssh_config(self) -> Path:
        return self.home / "ssh_config"

    @property
    def hosts_file(self) -> Path:
        return self.home / "hosts.toml"

    @property
    def known_hosts(self) -> Path:
        return self.home / "known_hosts"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RBEES_", "SSH_"))}
        env.update(HOME=str(self.home), RBEES_SSH_CONFIG=str(self.ssh_config), RBEES_HOSTS_FILE=str(self.hosts_file))
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        """`rbees ARGS` as the operator runs it; stdout and stderr captured as text."""
        return subprocess.run(
            [str(RBEES), *args], capture_output=True, text=True, env=self.env(**env), timeout=timeout, cwd=self.home
        )

    def run_json(self, *args: str, **env: str) -> object:
        done = self.run(*args, "--json", **env)
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
        return json.loads(done.stdout)

    def popen(self, *args: str, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.Popen:
        """`rbees ARGS` left running (the caller reads its output and waits for it)."""
        return subprocess.Popen([str(RBEES), *args], env=self.env(**(env or {})), cwd=self.home, **kwargs)  # type: ignore[call-overload]


def make_client(
    home: Path, sshd: Sshd, hosts_toml: str, extra_ssh_config: str = "", identity: Path | None = None
) -> Client:
    """A client whose ssh config has the aliases `a` and `b` for the server (two "hosts" on one sshd), and
    `down` for a closed port; known_hosts already trusts the server; hosts.toml is `hosts_toml`; it logs in
    with `identity` (default: the key the server authorizes)."""
    home.mkdir(parents=True, exist_ok=True)
    client = Client(home, sshd)
    client.ssh_config.write_text(
        "".join(f"Host {alias}\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {USER}\n" for alias in ("a", "b"))
        + f"Host down\n  HostName 127.0.0.1\n  Port {free_port()}\n  User {USER}\n"
        + extra_ssh_config
        + f"Host *\n  IdentityFile {identity or sshd.client_key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {client.known_hosts}\n  ConnectTimeout 10\n"
    )
    client.hosts_file.write_text(hosts_toml)
    client.known_hosts.write_text(sshd.known_hosts_line)
    return client


def run_in_terminal(
    client: Client, *args: str, env: dict[str, str] | None = None, interrupt_after: bytes | None = None
) -> tuple[int, str]:
    """Run `rbees ARGS` with a terminal as its stdout and stderr, as a person would; with `interrupt_after`,
    press Ctrl-C (SIGINT) once that text has been shown. Returns the exit code and everything shown."""
    controller, terminal = pty.openpty()
    proc = client.popen(*args, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 120)
        try:
            chunk = os.read(controller, 65536) if ready else b""
        except OSError:  # EIO: every writer of the terminal has gone
            chunk = b""
        if not chunk:
            break
        shown += chunk
        if interrupt_after is not None and interrupt_after in shown:
            proc.send_signal(signal.SIGINT)
            interrupt_after = None
    os.close(controller)
    return proc.wait(60), shown.decode(errors="replace")
