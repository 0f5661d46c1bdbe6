"""`.runtime/workers/<id>.json`: one record per spawned worker, and whether its process still lives."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import psutil

from rbees_pool.errors import WorkerNotFound
from rbees_pool.paths import PoolPaths


@dataclass(frozen=True)
class WorkerRecord:
    """What the pool knows of a worker; create_time tells our process from a later one reusing its pid."""

    worker_id: str
    pid: int
    backend: str
    model_id: str
    gpu: int | None
    port: int
    url: str
    started_at: str
    create_time: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def save(paths: PoolPaths, record: WorkerRecord) -> None:
    """Write the record through a temp file and rename, so a reader never sees half of it."""
    path = paths.worker_record(record.worker_id)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load(paths: PoolPaths, worker_id: str) -> WorkerRecord:
    path = paths.worker_record(worker_id)
    try:
        return WorkerRecord(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise WorkerNotFound(f"no worker {worker_id!r} on this pool (see `rbees-pool worker list`)") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise WorkerNotFound(f"worker record {path} is unreadable ({exc}); delete it") from exc


def load_all(paths: PoolPaths) -> list[WorkerRecord]:
    """Every readable record, by worker id; unreadable ones are skipped (they name no process)."""
    records = []
    for path in sorted(paths.workers.glob("*.json")) if paths.workers.is_dir() else []:
        try:
            records.append(load(paths, path.stem))
        except WorkerNotFound:
            continue
    return records


def delete(paths: PoolPaths, worker_id: str) -> None:
    paths.worker_record(worker_id).unlink(missing_ok=True)


def is_alive(record: WorkerRecord) -> bool:
    """The recorded process still runs (not a zombie, not a newer process with the same pid)."""
    try:
        process = psutil.Process(record.pid)
        return abs(process.create_time() - record.create_time) < 0.5 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reconcile(paths: PoolPaths) -> tuple[list[WorkerRecord], list[WorkerRecord]]:
    """Split records into live ones and stale ones (dead pids), deleting the stale records."""
    live, stale = [], []
    for record in load_all(paths):
        (live if is_alive(record) else stale).append(record)
    for record in stale:
        delete(paths, record.worker_id)
    return live, stale
