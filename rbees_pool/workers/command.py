"""The rbees-workerd command line a spawn runs, checked by the worker's own settings parser before anything
starts: a bad --slots, --callback-url, --context-length or token file is a usage error (exit 2) at once,
not a worker that dies after loading the model."""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from catalog import ModelEntry
from rbees_pool.errors import InvalidArgument, WorkerFailed
from rbees_pool.paths import PoolPaths
from rbees_pool.workers.ports import bindable


@dataclass(frozen=True)
class SpawnRequest:
    """What `worker spawn` was asked for; None means the worker's default."""

    backend: str
    gpu: int | None = None
    port: int | None = None
    slots: int | None = None
    callback_url: str | None = None
    bind: str = "127.0.0.1"
    api_token_file: Path | None = None
    threads: int | None = None
    context_length: int | None = None


def workerd_command() -> str:
    """The rbees-workerd beside this interpreter (same venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "rbees-workerd"
    found = str(beside) if beside.is_file() else shutil.which("rbees-workerd")
    if found is None:
        raise WorkerFailed("rbees-workerd is not installed beside rbees-pool nor on PATH")
    return found


def listen_address(bind: str | None) -> str:
    """--bind as an IP address this host can listen on (the port is --port's, or the one the pool picks).
    Without --bind: the address of WORKER_BIND_ADDR (the worker's own variable; its port, if any, yields to
    the pool's --port), else 127.0.0.1."""
    if bind is None:
        bind = _address_of(os.environ.get("WORKER_BIND_ADDR", "").strip()) or "127.0.0.1"
    try:
        address = ipaddress.ip_address(bind.strip("[]"))
    except ValueError:
        raise InvalidArgument(
            f"--bind {bind!r}: give an IP address of this host (e.g. 0.0.0.0 or 192.168.1.5); the port is --port"
        ) from None
    if not bindable(0, str(address)):
        raise InvalidArgument(f"--bind {bind}: this host has no such address to listen on")
    return str(address)


def _address_of(bind: str) -> str:
    """`ADDR`, `ADDR:PORT`, `[V6]` or `[V6]:PORT` -> ADDR (a bare IPv6 address is kept whole)."""
    if bind.startswith("["):
        return bind[1:].partition("]")[0]
    return bind.partition(":")[0] if bind.count(":") == 1 else bind


def local_url(address: str, port: int) -> str:
    """Where this host reaches the worker: a wildcard address is reached on loopback."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{port}"


def worker_argv(paths: PoolPaths, entry: ModelEntry, request: SpawnRequest, worker_id: str, port: int) -> list[str]:
    """rbees-workerd's arguments (program first), refused with INVALID_ARGUMENT when its parser would refuse them."""
    bind = f"[{request.bind}]" if ":" in request.bind else request.bind  # the worker's form of an IPv6 address
    args = [
        "--worker-id", worker_id, "--model", str(paths.model_file(entry)), "--port", str(port), "--bind", bind,
        "--backend", request.backend, "--model-ref", entry.id,
    ]  # fmt: skip
    if request.backend == "cuda":
        args += ["--gpu", str(request.gpu or 0)]
    options = {
        "--slots": request.slots, "--callback-url": request.callback_url, "--threads": request.threads,
        "--context-length": request.context_length,
        "--api-token-file": request.api_token_file and request.api_token_file.expanduser().resolve(),
    }  # fmt: skip
    for flag, value in options.items():
        if value is not None:
            args += [flag, str(value)]
    _check(args)
    return [workerd_command(), *args]


def _check(args: list[str]) -> None:
    """Run the worker's settings parser (same code, same environment) on the arguments."""
    from rbees_workerd.cli_serve import parse_settings
    from rbees_workerd.settings import SettingsError

    try:
        parse_settings(args)
    except SettingsError as exc:
        raise InvalidArgument(f"rbees-workerd would refuse this: {exc}") from None
