"""Start detached rbees-workerd processes, wait for them to be Ready (reporting what they do meanwhile), and
stop them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psutil
from filelock import FileLock

from catalog import ModelEntry
from rbees_pool.errors import WorkerFailed, WorkerTimeout
from rbees_pool.paths import PoolPaths
from rbees_pool.workers import records
from rbees_pool.workers.command import SpawnRequest, local_url, worker_argv
from rbees_pool.workers.health import fetch_health, fetch_ready, tail
from rbees_pool.workers.ports import choose_port
from rbees_pool.workers.records import WorkerRecord

_POLL_S = 0.25
OnProgress = Callable[[float, dict], None]  # (seconds since the start, the worker's /ready or /health document)


def spawn(paths: PoolPaths, entry: ModelEntry, request: SpawnRequest) -> tuple[WorkerRecord, subprocess.Popen]:
    """Start the worker in its own session (it outlives this CLI), appending to .runtime/workers/<id>.log."""
    paths.workers.mkdir(parents=True, exist_ok=True)
    with FileLock(str(paths.workers / ".spawn.lock")):  # two spawns never pick the same port
        live, _ = records.reconcile(paths)
        port = choose_port(request.port, {record.port for record in live}, request.bind)
        worker_id = f"w-{entry.id}-{port}"
        cmd = worker_argv(paths, entry, request, worker_id, port)  # refused here, before anything starts
        with paths.worker_log(worker_id).open("ab") as log:  # a respawn keeps the earlier runs' lines
            log.write(_spawn_line(worker_id, cmd))
            log.flush()
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        record = WorkerRecord(
            worker_id=worker_id, pid=process.pid, backend=request.backend, model_id=entry.id,
            gpu=(request.gpu or 0) if request.backend == "cuda" else None, port=port,
            url=local_url(request.bind, port), started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            create_time=psutil.Process(process.pid).create_time(),
        )  # fmt: skip
        records.save(paths, record)
    return record, process


def _spawn_line(worker_id: str, cmd: list[str]) -> bytes:
    """A log line in the worker's own JSON shape, marking where this run starts."""
    now = datetime.now(UTC)
    entry = {
        "ts": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z", "level": "INFO",
        "logger": "rbees-pool", "worker_id": worker_id, "human": "spawned by rbees-pool: " + " ".join(cmd[1:]),
    }  # fmt: skip
    return (json.dumps(entry) + "\n").encode()


def wait_ready(
    paths: PoolPaths,
    record: WorkerRecord,
    process: subprocess.Popen,
    timeout_s: float,
    token: str | None = None,
    on_progress: OnProgress | None = None,
) -> dict:
    """Poll /ready until Ready, passing each answer to `on_progress`; a worker that exits meanwhile, or is too
    slow (it is stopped), is an error. Returns the worker's /health document."""
    start = time.monotonic()
    while True:
        status = process.poll()
        if status is not None:
            records.delete(paths, record.worker_id)
            log = paths.worker_log(record.worker_id)
            raise WorkerFailed(
                f"worker {record.worker_id} exited with status {status} while loading; last lines of {log}:\n"
                + tail(str(log))
            )
        doc = fetch_ready(record.url, token, timeout_s=1.0) or fetch_health(record.url, timeout_s=1.0)
        if doc is not None and on_progress is not None:
            on_progress(time.monotonic() - start, doc)
        if doc is not None and doc.get("state") == "Ready":
            return fetch_health(record.url, timeout_s=5.0) or doc
        if time.monotonic() - start > timeout_s:
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
