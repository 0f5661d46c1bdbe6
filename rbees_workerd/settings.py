"""Configuration of `rbees-workerd serve`: command line, `WORKER_*` environment, JSON config file.

Precedence: command line, then environment, then the config file, then defaults. Every value is
checked here, before anything heavy starts, so a bad configuration fails at once with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class SettingsError(Exception):
    """A configuration value is missing or invalid; the message is the one line the operator sees."""


@dataclass(frozen=True)
class Settings:
    worker_id: str
    model: Path
    model_ref: str
    host: str
    port: int
    backend: str
    gpu: int
    slots: int
    context_length: int | None
    callback_url: str | None
    api_token: str | None
    log_level: str
    drain_timeout_s: float

    @property
    def url(self) -> str:
        """The URL this worker reports to its pool/orchestrator (a wildcard bind reports the host name)."""
        host = socket.getfqdn() if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like every other configuration error."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rbees-workerd", description="Serve one model over HTTP.")
    p.add_argument("--worker-id", help="this worker's id (as the pool knows it)")
    p.add_argument("--model", help="path of the GGUF model file")
    p.add_argument("--model-ref", help="the model name this worker reports (default: the file's stem)")
    p.add_argument("--port", type=int, help="TCP port to listen on")
    p.add_argument("--bind", help="ADDR or ADDR:PORT (env WORKER_BIND_ADDR; default 127.0.0.1:PORT)")
    p.add_argument("--backend", help="cpu or cuda (default cpu)")
    p.add_argument("--gpu", type=int, help="CUDA device index (env WORKER_GPU_DEVICE; default 0)")
    p.add_argument("--slots", type=int, help="concurrent sequences decoded together (default 4)")
    p.add_argument("--context-length", type=int, help="tokens per slot (default: the model's)")
    p.add_argument("--callback-url", help="POST the ready callback here once the model is loaded")
    p.add_argument("--api-token-file", help="file holding the bearer token (env WORKER_API_TOKEN_FILE)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (env WORKER_LOG_LEVEL)")
    p.add_argument("--drain-timeout", type=float, help="seconds SIGTERM lets jobs finish (default 30)")
    p.add_argument("--config", help="JSON file with any of the options above (snake_case keys)")
    return p


_CONFIG_KEYS = {
    "worker_id": str,
    "model": str,
    "model_ref": str,
    "port": int,
    "bind": str,
    "backend": str,
    "gpu": int,
    "slots": int,
    "context_length": int,
    "callback_url": str,
    "api_token_file": str,
    "log_level": str,
    "drain_timeout": (int, float),
}

_ENV = {
    "bind": "WORKER_BIND_ADDR",
    "gpu": "WORKER_GPU_DEVICE",
    "api_token_file": "WORKER_API_TOKEN_FILE",
    "log_level": "WORKER_LOG_LEVEL",
}


def _read_config(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise SettingsError(f"cannot read config file {path}: {e.strerror}") from e
    except ValueError as e:
        raise SettingsError(f"config file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a JSON object")
    for key, value in data.items():
        expected = _CONFIG_KEYS.get(key)
        if expected is None:
            raise SettingsError(f"config file {path}: unknown key {key!r}")
        if isinstance(value, bool) or not isinstance(value, expected):
            raise SettingsError(f"config file {path}: {key} has the wrong type")
    return data


def _env_value(key: str, env: dict[str, str]) -> Any:
    raw = env.get(_ENV[key], "").strip() if key in _ENV else ""
    if not raw:
        return None
    if key == "gpu":
        try:
            return int(raw)
        except ValueError as e:
            raise SettingsError(f"{_ENV[key]} must be an integer, got {raw!r}") from e
    return raw


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


def parse_settings(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    """Build validated settings; raises SettingsError with a one-line reason."""
    env = dict(os.environ) if env is None else env
    args = vars(_parser().parse_args(argv))
    config = _read_config(args["config"]) if args["config"] else {}

    def sources(key: str) -> tuple[Any, Any, Any]:
        """A setting's value from the command line, the environment and the config file (None: unset)."""
        return args.get(key), _env_value(key, env), config.get(key)

    def level(key: str) -> int:
        """Where a setting comes from: 0 command line, 1 environment, 2 config file, 3 nowhere."""
        return next((i for i, value in enumerate(sources(key)) if value is not None), 3)

    def get(key: str, default: Any = None) -> Any:
        return next((value for value in sources(key) if value is not None), default)

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
    host, bind_port = _split_bind(get("bind", "127.0.0.1"))
    if bind_port is not None and (port is None or level("bind") <= level("port")):
        port = bind_port  # --port beats a port in WORKER_BIND_ADDR; --bind ADDR:PORT beats --port
    if port is None:
        raise SettingsError("--port is required")
    backend = get("backend", "cpu")
    if backend not in ("cpu", "cuda"):
        raise SettingsError(f"--backend must be cpu or cuda, got {backend!r}")
    log_level = str(get("log_level", "INFO")).upper()
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
        slots=_check_range("--slots", get("slots", 4), 1, 256),
        context_length=context_length,
        callback_url=callback_url,
        api_token=_read_token(token_file) if token_file else None,
        log_level=log_level,
        drain_timeout_s=drain,
    )
