"""Start detached rbees-workerd processes, wait for them to be Ready, and stop them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from filelock import FileLock

from catalog import ModelEntry
from rbees_pool.errors import WorkerFailed, WorkerTimeout
from rbees_pool.paths import PoolPaths
from rbees_pool.workers import records
from rbees_pool.workers.health import fetch_health, tail
from rbees_pool.workers.ports import choose_port
from rbees_pool.workers.records import WorkerRecord

_POLL_S = 0.25


@dataclass(frozen=True)
class SpawnRequest:
    backend: str
    gpu: int | None
    port: int | None
    slots: int | None
    callback_url: str | None


def workerd_command() -> str:
    """The rbees-workerd beside this interpreter (same venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "rbees-workerd"
    found = str(beside) if beside.is_file() else shutil.which("rbees-workerd")
    if found is None:
        raise WorkerFailed("rbees-workerd is not installed beside rbees-pool nor on PATH")
    return found


def spawn(paths: PoolPaths, entry: ModelEntry, request: SpawnRequest) -> tuple[WorkerRecord, subprocess.Popen]:
    """Start the worker in its own session (it outlives this CLI), logging to .runtime/workers/<id>.log."""
    paths.workers.mkdir(parents=True, exist_ok=True)
    with FileLock(str(paths.workers / ".spawn.lock")):  # two spawns never pick the same port
        live, _ = records.reconcile(paths)
        port = choose_port(request.port, {record.port for record in live})
        worker_id = f"w-{entry.id}-{port}"
        url = f"http://127.0.0.1:{port}"
        cmd = [
            workerd_command(), "--worker-id", worker_id, "--model", str(paths.model_file(entry)),
            "--port", str(port), "--backend", request.backend, "--model-ref", entry.id,
        ]  # fmt: skip
        if request.backend == "cuda":
            cmd += ["--gpu", str(request.gpu or 0)]
        if request.slots is not None:
            cmd += ["--slots", str(request.slots)]
        if request.callback_url:
            cmd += ["--callback-url", request.callback_url]
        with paths.worker_log(worker_id).open("wb") as log:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        record = WorkerRecord(
            worker_id=worker_id, pid=process.pid, backend=request.backend, model_id=entry.id,
            gpu=(request.gpu or 0) if request.backend == "cuda" else None, port=port, url=url,
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            create_time=psutil.Process(process.pid).create_time(),
        )  # fmt: skip
        records.save(paths, record)
    return record, process


def wait_ready(paths: PoolPaths, record: WorkerRecord, process: subprocess.Popen, timeout_s: float) -> dict:
    """Poll /health until Ready; a worker that exits meanwhile, or is too slow (stopped), is an error."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = process.poll()
        if status is not None:
            records.delete(paths, record.worker_id)
            log = paths.worker_log(record.worker_id)
            raise WorkerFailed(
                f"worker {record.worker_id} exited with status {status} while loading; last lines of {log}:\n"
                + tail(str(log))
            )
        health = fetch_health(record.url, timeout_s=1.0)
        if health is not None and health.get("state") == "Ready":
            return health
        if time.monotonic() > deadline:
            stop(paths, record, grace_s=10.0)
            raise WorkerTimeout(f"worker {record.worker_id} was not ready after {timeout_s:g}s; it was stopped")
        time.sleep(_POLL_S)


def stop(paths: PoolPaths, record: WorkerRecord, grace_s: float) -> str:
    """SIGTERM the worker's process group, SIGKILL it after grace_s; returns stopped, killed or gone."""
    outcome = "gone"
    if records.is_alive(record):
        outcome = "stopped"
        _signal_group(record.pid, signal.SIGTERM)
        if not _wait_gone(record, grace_s):
            outcome = "killed"
            _signal_group(record.pid, signal.SIGKILL)
            _wait_gone(record, 10.0)
    records.delete(paths, record.worker_id)
    return outcome


def _signal_group(pid: int, signum: signal.Signals) -> None:
    """Signal the worker's session (it leads its own group) so helper processes go with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def _wait_gone(record: WorkerRecord, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while records.is_alive(record):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
