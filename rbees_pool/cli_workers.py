"""`rbees-pool worker ...`: spawn, list, stop and read the logs of worker daemons."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

import catalog
from rbees_pool.context import JsonOpt, pool_paths
from rbees_pool.errors import ModelNotDownloaded, WorkerNotFound
from rbees_pool.exitcodes import ExitCode
from rbees_pool.host import require_backend
from rbees_pool.modelfile import check_model_file
from rbees_pool.output import console, emit_json, err_console, table
from rbees_pool.paths import PoolPaths
from rbees_pool.workers import records
from rbees_pool.workers.command import SpawnRequest, listen_address
from rbees_pool.workers.health import fetch_health, tail_of
from rbees_pool.workers.lifecycle import spawn, stop, wait_ready
from rbees_pool.workers.logview import Lines, readable
from rbees_pool.workers.progress import ReadyProgress
from rbees_pool.workers.records import WorkerRecord

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
    bind: Annotated[
        str | None,
        typer.Option(
            "--bind", help="IP address to listen on (0.0.0.0: every interface; default 127.0.0.1 or the address in "
            "WORKER_BIND_ADDR); the port is --port.", show_default=False
        ),
    ] = None,
    slots: Annotated[int | None, typer.Option("--slots", min=1, help="Concurrent sequences (default 4).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads (default: all cores).")] = None,
    context_length: Annotated[
        int | None, typer.Option("--context-length", help="Tokens per slot (default: the model's).")
    ] = None,
    api_token_file: Annotated[
        Path | None, typer.Option("--api-token-file", help="File holding the bearer token the worker requires.")
    ] = None,
    callback_url: Annotated[str | None, typer.Option("--callback-url", help="Ready callback URL.")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once started, before Ready.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds to wait for Ready.")] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Start a detached worker for a downloaded model and print its URL once it is Ready (what it is doing
    meanwhile goes to stderr). Every option is checked before anything starts; Ctrl-C stops the worker."""
    paths = pool_paths(ctx)
    require_backend(backend, gpu)
    entry = catalog.load(paths.root).get(model)
    if not paths.model_file(entry).is_file():
        raise ModelNotDownloaded(f"model {model!r} is not downloaded; run `rbees-pool models download {model}`")
    check_model_file(paths.model_file(entry), None)  # an architecture the engine lacks: refused before a worker starts
    request = SpawnRequest(
        backend, gpu, port, slots, callback_url, listen_address(bind), api_token_file, threads, context_length
    )
    record, process = spawn(paths, entry, request)
    health = None if no_wait else _wait(paths, record, process, timeout, api_token_file)
    if as_json:
        emit_json({**record.to_json(), "state": health.get("state") if health else "Starting", "health": health})
    else:
        console.print(record.url)


def _wait(
    paths: PoolPaths, record: WorkerRecord, process: subprocess.Popen, timeout: float, token_file: Path | None
) -> dict:
    """wait_ready with progress on stderr; Ctrl-C stops the worker this spawn started and exits 130."""
    token = token_file.expanduser().read_text().strip() if token_file else None  # readable: checked before spawn
    start = time.monotonic()
    with ReadyProgress(record.worker_id, err_console) as progress:
        try:
            health = wait_ready(paths, record, process, timeout, token, on_progress=progress.update)
        except KeyboardInterrupt:
            progress.say(f"interrupted: stopping {record.worker_id} (it was still loading)")
            outcome = stop(paths, record, grace_s=10.0)
            err_console.print(f"{record.worker_id}: {outcome}", markup=False, highlight=False)
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        progress.say(f"{record.worker_id}: Ready after {time.monotonic() - start:.1f}s")
    return health


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
    as_json: Annotated[bool, typer.Option("--json", help="The worker's raw JSON lines.")] = False,
) -> None:
    """Print a worker's log (every run of that worker id): `time level message fields` lines, or --json."""
    paths = pool_paths(ctx)
    log = paths.worker_log(worker_id)
    if not log.is_file():
        raise WorkerNotFound(f"no log for worker {worker_id!r} in {paths.workers}")
    show = _raw if as_json else readable
    with log.open("rb") as handle:  # one handle: following starts exactly where the tail ended
        text = tail_of(handle, lines)
        _write([show(line) for line in text.splitlines()])
        if follow:
            _follow(handle, paths, worker_id, show)


def _raw(line: str) -> str:
    return line


def _write(lines: list[str]) -> None:
    if lines:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()


def _follow(log: BinaryIO, paths: PoolPaths, worker_id: str, show: Callable[[str], str]) -> None:
    """Stream what the worker appends to its log, line by line, until its process is gone."""
    pending = Lines()
    while True:
        chunk = log.read()
        if chunk:
            _write([show(line) for line in pending.feed(chunk)])
            continue
        if not _running(paths, worker_id):
            _write([show(line) for line in pending.rest()])
            return
        time.sleep(0.5)


def _running(paths: PoolPaths, worker_id: str) -> bool:
    try:
        return records.is_alive(records.load(paths, worker_id))
    except WorkerNotFound:
        return False


def _slots(health: dict | None) -> str:
    return f"{health.get('slots_free')}/{health.get('slots_total')}" if health else "-"
