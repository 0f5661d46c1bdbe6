"""The orchestrator's configuration, checked before anything starts, and the token files it reads.

Tokens only ever come from files (never the command line, which `ps` shows to every user).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class SettingsError(Exception):
    """A configuration value is invalid; the message is the one line the operator sees."""


@dataclass(frozen=True)
class WorkerTokens:
    """Bearer tokens for the workers this orchestrator calls: one default and/or one per worker id."""

    default: str | None = None
    by_worker: dict[str, str] = field(default_factory=dict)

    def for_worker(self, worker_id: str) -> str | None:
        return self.by_worker.get(worker_id, self.default)

    def headers(self, worker_id: str) -> dict[str, str]:
        token = self.for_worker(worker_id)
        return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8080
    db: Path = Path("rbees-orcd.sqlite")
    api_token: str | None = None
    worker_tokens: WorkerTokens = field(default_factory=WorkerTokens)
    max_queue: int = 64
    health_interval_s: float = 5.0
    drop_after_s: float = 60.0
    queue_timeout_s: float = 120.0
    resume_window_s: float = 15.0
    retention_s: float = 300.0
    log_level: str = "INFO"


def split_bind(bind: str) -> tuple[str, int]:
    """`ADDR:PORT` or `[V6]:PORT`."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", bind)
    if not m:
        raise SettingsError(f"invalid --bind {bind!r} (expected ADDR:PORT)")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 1 <= int(port) <= 65535:
        raise SettingsError(f"invalid --bind {bind!r}: the port must be 1-65535")
    return host, int(port)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise SettingsError(f"cannot read {what} {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise SettingsError(f"{what} {path} is not UTF-8 text") from e


def read_api_token(path: Path) -> str:
    token = _read(path, "API token file").strip()
    if not token or any(c.isspace() for c in token):
        raise SettingsError(f"API token file {path} must hold one token")
    return token


def read_worker_tokens(path: Path) -> WorkerTokens:
    """Lines of `TOKEN` (every worker's) or `WORKER_ID TOKEN`; blank lines and `#` comments are skipped."""
    default: str | None = None
    by_worker: dict[str, str] = {}
    for number, line in enumerate(_read(path, "worker token file").splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) == 1 and default is None:
            default = words[0]
        elif len(words) == 2 and _WORKER_ID.match(words[0]) and words[0] not in by_worker:
            by_worker[words[0]] = words[1]
        else:
            raise SettingsError(f"worker token file {path}, line {number}: expected TOKEN or WORKER_ID TOKEN, once")
    if default is None and not by_worker:
        raise SettingsError(f"worker token file {path} holds no token")
    return WorkerTokens(default, by_worker)
