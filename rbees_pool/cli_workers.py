"""`rbees-pool worker ...`: spawn, list, stop and read the logs of worker daemons."""

from __future__ import annotations

import sys
import time
from typing import Annotated, BinaryIO

import typer

import catalog
from rbees_pool.context import JsonOpt, pool_paths
from rbees_pool.errors import ModelNotDownloaded, WorkerNotFound
from rbees_pool.host import require_backend
from rbees_pool.output import console, emit_json, err_console, table
from rbees_pool.paths import PoolPaths
from rbees_pool.workers import records
from rbees_pool.workers.health import fetch_health, tail_of
from rbees_pool.workers.lifecycle import SpawnRequest, spawn, stop, wait_ready

app = typer.Typer(no_args_is_help=True, help="Worker daemons on this host.")
WorkerArg = Annotated[str, typer.Argument(help="Worker id (see `worker list`).", show_default=False)]
GraceOpt = Annotated[
    float, typer.Option("--timeout", min=0, help="Seconds to wait after SIGTERM before SIGKILL (workers drain ≤30 s).")
]


@app.command("spawn")
def spawn_cmd(
    ctx: typer.Context,
    backend: Annotated[str, typer.Argument(help="cpu or cuda.", show_default=False)],
    model: Annotated[str, typer.Option("--model", help="Catalog id of a downloaded model.")],
    gpu: Annotated[int | None, typer.Option("--gpu", min=0, help="CUDA device index (cuda only).")] = None,
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535, help="Default: first free from 8001.")] = None,
    slots: Annotated[int | None, typer.Option("--slots", min=1, help="Concurrent sequences.")] = None,
    callback_url: Annotated[str | None, typer.Option("--callback-url", help="Ready callback URL.")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once started, before Ready.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds to wait for Ready.")] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Start a detached worker for a downloaded model and print its URL once it is Ready."""
    paths = pool_paths(ctx)
    require_backend(backend, gpu)
    entry = catalog.load(paths.root).get(model)
    if not paths.model_file(entry).is_file():
        raise ModelNotDownloaded(f"model {model!r} is not downloaded; run `rbees-pool models download {model}`")
    record, process = spawn(paths, entry, SpawnRequest(backend, gpu, port, slots, callback_url))
    health = None if no_wait else wait_ready(paths, record, process, timeout)
    if as_json:
        emit_json({**record.to_json(), "state": health.get("state") if health else "Starting", "health": health})
    else:
        console.print(record.url)


@app.command("list")
def list_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Recorded workers with their health; records of dead processes are removed."""
    live, stale = records.reconcile(pool_paths(ctx))
    docs = [{**r.to_json(), "health": fetch_health(r.url)} for r in live]
    for doc in docs:
        doc["state"] = doc["health"].get("state") if doc["health"] else "Unreachable"
    if as_json:
        emit_json({"workers": docs, "removed_stale": [r.worker_id for r in stale]})
        return
    for record in stale:
        err_console.print(f"removed stale record of {record.worker_id} (pid {record.pid} is gone)")
    table("Workers", ["id", "pid", "backend", "model", "url", "state", "slots free"], [
        [d["worker_id"], str(d["pid"]), d["backend"], d["model_id"], d["url"], d["state"], _slots(d["health"])]
        for d in docs
    ])  # fmt: skip


@app.command("stop")
def stop_cmd(ctx: typer.Context, worker_id: WorkerArg, timeout: GraceOpt = 40.0) -> None:
    """SIGTERM the worker (it drains), SIGKILL it if it is still there after --timeout."""
    paths = pool_paths(ctx)
    outcome = stop(paths, records.load(paths, worker_id), timeout)
    console.print(f"{worker_id}: {outcome}")


@app.command("stop-all")
def stop_all_cmd(ctx: typer.Context, timeout: GraceOpt = 40.0) -> None:
    """Stop every recorded worker."""
    paths = pool_paths(ctx)
    for record in records.load_all(paths):
        console.print(f"{record.worker_id}: {stop(paths, record, timeout)}")


@app.command("logs")
def logs_cmd(
    ctx: typer.Context,
    worker_id: WorkerArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the worker exits.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="Lines to show first.")] = 200,
) -> None:
    """Print a worker's log (its stdout and stderr)."""
    paths = pool_paths(ctx)
    log = paths.worker_log(worker_id)
    if not log.is_file():
        raise WorkerNotFound(f"no log for worker {worker_id!r} in {paths.workers}")
    with log.open("rb") as handle:  # one handle: following starts exactly where the tail ended
        text = tail_of(handle, lines)
        sys.stdout.write(text + ("\n" if text else ""))
        sys.stdout.flush()
        if follow:
            _follow(handle, paths, worker_id)


def _follow(log: BinaryIO, paths: PoolPaths, worker_id: str) -> None:
    """Stream what the worker appends to its log until its process is gone."""
    while True:
        chunk = log.read()
        if chunk:
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
            continue
        if not _running(paths, worker_id):
            return
        time.sleep(0.5)


def _running(paths: PoolPaths, worker_id: str) -> bool:
    try:
        return records.is_alive(records.load(paths, worker_id))
    except WorkerNotFound:
        return False


def _slots(health: dict | None) -> str:
    return f"{health.get('slots_free')}/{health.get('slots_total')}" if health else "-"
