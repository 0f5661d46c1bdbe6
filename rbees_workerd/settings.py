"""The validated configuration of `rbees-workerd serve`, and the JSON config file's keys.

The CLI (cli_serve.py) gathers the values: command line, then `WORKER_*` environment, then the config
file, then defaults. Every value is checked here, before anything heavy starts, so a bad configuration
fails at once with one line.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rbees_pool.exitcodes import ExitCode
from rbees_workerd.errors import RbeesError

if TYPE_CHECKING:
    from rbees_workerd.engine.engine import Engine
    from rbees_workerd.engine.types import LoadPhase

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class SettingsError(RbeesError):
    """A configuration value is missing or invalid; the message is the one line the operator sees."""

    code = "INVALID_ARGUMENT"
    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class Settings:
    worker_id: str
    model: Path
    model_ref: str
    host: str
    port: int
    backend: str
    gpu: int
    threads: int | None
    slots: int
    context_length: int | None
    step_tokens: int | None
    callback_url: str | None
    api_token: str | None
    log_level: str
    drain_timeout_s: float
    # Not an option: what the engine process calls in place of Engine.load (bench/serving_path.py's timed
    # engine). It is pickled to that process: a module-level function of a module it imports, or a partial of one.
    engine_factory: Callable[[Settings, Callable[[LoadPhase, float], None]], Engine] | None = None

    @property
    def url(self) -> str:
        """The URL this worker reports to its pool/orchestrator (a wildcard bind reports the host name)."""
        host = socket.getfqdn() if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


# The keys a config file may hold: the options of `serve`, snake_case, with their JSON types.
CONFIG_KEYS = {
    "worker_id": str,
    "model": str,
    "model_ref": str,
    "port": int,
    "bind": str,
    "backend": str,
    "gpu": int,
    "threads": int,
    "slots": int,
    "context_length": int,
    "step_tokens": int,
    "callback_url": str,
    "api_token_file": str,
    "log_level": str,
    "drain_timeout": (int, float),
}


def read_config(path: str) -> dict[str, Any]:
    """The config file's settings, their keys and JSON types checked."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise SettingsError(f"cannot read config file {path}: {e.strerror}") from e
    except ValueError as e:
        raise SettingsError(f"config file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a JSON object")
    for key, value in data.items():
        expected = CONFIG_KEYS.get(key)
        if expected is None:
            raise SettingsError(f"config file {path}: unknown key {key!r}")
        if isinstance(value, bool) or not isinstance(value, expected):
            raise SettingsError(f"config file {path}: {key} has the wrong type")
    return data


def _split_bind(bind: str) -> tuple[str, int | None]:
    """`ADDR`, `ADDR:PORT`, `[V6]` or `[V6]:PORT`."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\s]+)(?::(\d+))?|([0-9A-Fa-f:]+)", bind)
    if not m:
        raise SettingsError(f"invalid bind address {bind!r} (expected ADDR or ADDR:PORT)")
    host = m.group(1) or m.group(3) or m.group(5)
    port = m.group(2) or m.group(4)
    return host, int(port) if port else None


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise SettingsError(f"cannot read API token file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise SettingsError(f"API token file {path} is not text") from e
    if not token:
        raise SettingsError(f"API token file {path} is empty")
    return token


def _check_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
    return value


def build_settings(values: Mapping[str, Any], bind_port_wins: bool) -> Settings:
    """Validated settings from the options' values (None: unset); raises SettingsError with a one-line reason.

    `bind_port_wins`: a port in the bind address beats `port`, because it was given at least as specifically
    (`--bind ADDR:PORT` beats `--port`; `--port` beats a port in WORKER_BIND_ADDR).
    """

    def get(key: str, default: Any = None) -> Any:
        value = values.get(key)
        return default if value is None else value

    worker_id = get("worker_id")
    if not worker_id:
        raise SettingsError("--worker-id is required")
    if not _WORKER_ID.match(worker_id):
        raise SettingsError(f"invalid worker id {worker_id!r} (letters, digits, . _ : -; at most 128)")
    model_arg = get("model")
    if not model_arg:
        raise SettingsError("--model is required")
    model = Path(model_arg).expanduser()
    if not model.is_file() or not os.access(model, os.R_OK):
        raise SettingsError(f"model file {model} does not exist or is not readable")

    port = get("port")
    host, bind_port = _split_bind(str(get("bind", "127.0.0.1")).strip())
    if bind_port is not None and (port is None or bind_port_wins):
        port = bind_port
    if port is None:
        raise SettingsError("--port is required")
    backend = get("backend", "cpu")
    if backend not in ("cpu", "cuda"):
        raise SettingsError(f"--backend must be cpu or cuda, got {backend!r}")
    log_level = str(get("log_level", "INFO")).strip().upper()
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    callback_url = get("callback_url")
    if callback_url is not None:
        parts = urlsplit(callback_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(f"--callback-url must be an http(s) URL, got {callback_url!r}")
    context_length = get("context_length")
    if context_length is not None:
        _check_range("--context-length", context_length, 16, 1 << 20)
    slots = _check_range("--slots", get("slots", 4), 1, 256)
    step = get("step_tokens")
    if step is not None:
        _check_range("--step-tokens", step, max(16, slots), 1 << 16)  # (a decode token for every slot)
    threads = get("threads")
    if threads is not None:
        _check_range("--threads", threads, 1, 4096)
    drain = float(get("drain_timeout", 30.0))
    if not 0 <= drain <= 3600:
        raise SettingsError(f"--drain-timeout must be between 0 and 3600 seconds, got {drain}")
    token_file = get("api_token_file")
    return Settings(
        worker_id=worker_id,
        model=model,
        model_ref=get("model_ref") or model.stem,
        host=host,
        port=_check_range("port", port, 1, 65535),
        backend=backend,
        gpu=_check_range("--gpu", get("gpu", 0), 0, 1023),
        threads=threads,
        slots=slots,
        context_length=context_length,
        step_tokens=step,
        callback_url=callback_url,
        api_token=_read_token(str(token_file).strip()) if token_file else None,
        log_level=log_level,
        drain_timeout_s=drain,
    )
