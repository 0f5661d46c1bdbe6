"""The worker registry: every worker the orchestrator routes to, in SQLite (WAL) so it survives a restart.

The rows are loaded once at start and mirrored in memory, where placement reads them without a query;
each change of a worker (registration, state, removal) is written through at once. A worker's load (the
jobs this orchestrator runs on it) is runtime state and is not stored. The models table remembers every
model a worker ever served, so a request for it while no worker is up is 503, not 404.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

State = Literal["healthy", "unhealthy", "loading", "draining"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    model TEXT NOT NULL,
    backend TEXT NOT NULL,
    device TEXT,
    vram_bytes INTEGER NOT NULL,
    slots_total INTEGER NOT NULL,
    state TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL,
    failing_since REAL
);
CREATE TABLE IF NOT EXISTS models (model TEXT PRIMARY KEY, first_seen REAL NOT NULL);
"""
_COLUMNS = (
    "worker_id", "url", "model", "backend", "device", "vram_bytes", "slots_total", "state", "registered_at",
    "last_seen", "failing_since",
)  # fmt: skip


@dataclass
class Worker:
    """A registered worker. `active` and `saturated` are this process's view of its load, never stored."""

    worker_id: str
    url: str
    model: str
    backend: str
    device: str | None
    vram_bytes: int
    slots_total: int
    state: State = "healthy"
    registered_at: float = field(default_factory=time.time)
    last_seen: float | None = None
    failing_since: float | None = None
    active: int = 0
    saturated: bool = False  # it answered ALL_SLOTS_BUSY: no placement until a slot frees here or a poll
    missed_polls: int = 0  # consecutive polls it did not answer

    @property
    def free_slots(self) -> int:
        if self.state != "healthy" or self.saturated:
            return 0
        return max(0, self.slots_total - self.active)

    @property
    def load(self) -> float:
        return self.active / max(1, self.slots_total)

    def to_json(self) -> dict[str, Any]:
        doc = {name: getattr(self, name) for name in _COLUMNS}
        doc["active_jobs"] = self.active
        return doc


class Registry:
    """Workers by id, in memory and in the SQLite file at `path`."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: each write is its own transaction
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM workers").fetchall()
        self._workers = {row[0]: Worker(**dict(zip(_COLUMNS, row, strict=True))) for row in rows}
        self._models = {row[0] for row in self._db.execute("SELECT model FROM models")}

    def close(self) -> None:
        self._db.close()

    # ---- reads (memory only)
    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def all(self) -> list[Worker]:
        return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def serving(self, model: str) -> list[Worker]:
        return [w for w in self._workers.values() if w.model == model]

    def knows(self, model: str) -> bool:
        return model in self._models

    def models(self) -> set[str]:
        """Models that at least one healthy worker serves."""
        return {w.model for w in self._workers.values() if w.state == "healthy"}

    # ---- writes (memory and file)
    def register(self, worker: Worker) -> Worker:
        """Add or replace a worker (a worker re-registering keeps its load)."""
        previous = self._workers.get(worker.worker_id)
        if previous is not None:
            worker.active = previous.active
        self._workers[worker.worker_id] = worker
        self.save(worker)
        if worker.model not in self._models:
            self._db.execute("INSERT OR IGNORE INTO models VALUES (?, ?)", (worker.model, time.time()))
            self._models.add(worker.model)
        return worker

    def save(self, worker: Worker) -> None:
        values = tuple(getattr(worker, name) for name in _COLUMNS)
        placeholders = ", ".join("?" * len(_COLUMNS))
        self._db.execute(f"INSERT OR REPLACE INTO workers ({', '.join(_COLUMNS)}) VALUES ({placeholders})", values)

    def remove(self, worker_id: str) -> Worker | None:
        worker = self._workers.pop(worker_id, None)
        self._db.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))
        return worker
