"""Layout of a pool root: catalog.json, models/<id>/, .runtime/workers/<worker-id>.{json,log}."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from catalog import ModelEntry

DOWNLOAD_LOCK = ".download.lock"  # in models/<id>/: held while the model's files change


def default_root() -> Path:
    """RBEES_HOME, else ~/.rbees."""
    return Path(os.environ.get("RBEES_HOME") or Path.home() / ".rbees").expanduser()


@dataclass(frozen=True)
class PoolPaths:
    """Every path the pool uses, derived from its root."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def workers(self) -> Path:
        return self.root / ".runtime" / "workers"

    def model_dir(self, model_id: str) -> Path:
        return self.models / model_id

    def model_file(self, entry: ModelEntry) -> Path:
        """Where the complete, verified file lives; it exists only after the final rename."""
        return self.model_dir(entry.id) / entry.filename

    def worker_record(self, worker_id: str) -> Path:
        return self.workers / f"{worker_id}.json"

    def worker_log(self, worker_id: str) -> Path:
        return self.workers / f"{worker_id}.log"
