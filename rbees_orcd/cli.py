"""`rbees-orcd`: the orchestrator daemon. A bad option exits 2 at once with one line `error: CODE: reason`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from rbees_orcd import logs
from rbees_orcd.settings import Settings, SettingsError, WorkerTokens, read_api_token, read_worker_tokens, split_bind
from rbees_workerd import cli_run

PROG = "rbees-orcd"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, context_settings=cli_run.HELP_OPTIONS)


@app.command()
def serve(
    bind: Annotated[str, typer.Option("--bind", help="ADDR:PORT to listen on.")] = "0.0.0.0:8080",
    db: Annotated[Path, typer.Option("--db", help="Worker registry (SQLite, WAL).")] = Path("rbees-orcd.sqlite"),
    api_token_file: Annotated[
        Path | None, typer.Option("--api-token-file", help="Clients must present this file's token.")
    ] = None,
    worker_token_file: Annotated[
        Path | None,
        typer.Option("--worker-token-file", help="Tokens for the workers: lines of TOKEN or WORKER_ID TOKEN."),
    ] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Tasks waiting per model before 429.")] = 64,
    health_interval: Annotated[
        float, typer.Option("--health-interval", min=0.1, help="Seconds between polls of each worker's /health.")
    ] = 5.0,
    drop_after: Annotated[
        float, typer.Option("--drop-after", min=0, help="Seconds a worker may fail its polls before removal.")
    ] = 60.0,
    queue_timeout: Annotated[
        float, typer.Option("--queue-timeout", min=0.1, help="Seconds a task may wait for a worker.")
    ] = 120.0,
    resume_window: Annotated[
        float, typer.Option("--resume-window", min=0.1, help="Seconds a task survives without an event reader.")
    ] = 15.0,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    _version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=cli_run.version_callback(PROG), help="Print the version."),
    ] = False,
) -> None:
    """Route requests to rbees workers, queue them, relay their streams; speak the OpenAI API."""
    from rbees_orcd.server import serve as run
    from rbees_workerd.listener import bind_socket

    try:
        host, port = split_bind(bind)
        level = log_level.upper()
        if level not in LOG_LEVELS:
            raise SettingsError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        settings = Settings(
            host=host, port=port, db=db.expanduser(),
            api_token=read_api_token(api_token_file) if api_token_file else None,
            worker_tokens=read_worker_tokens(worker_token_file) if worker_token_file else WorkerTokens(),
            max_queue=max_queue, health_interval_s=health_interval, drop_after_s=drop_after,
            queue_timeout_s=queue_timeout, resume_window_s=resume_window, log_level=level,
        )  # fmt: skip
    except SettingsError as e:
        cli_run.print_error("INVALID_ARGUMENT", str(e))
        raise typer.Exit(cli_run.USAGE_EXIT) from None
    logs.configure(settings.log_level)
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as e:
        cli_run.print_error("PORT_UNAVAILABLE", f"cannot listen on {bind}: {e.strerror}")
        raise typer.Exit(1) from None
    raise typer.Exit(run(settings, sock))


def main() -> None:
    sys.exit(cli_run.run(app, PROG, sys.argv[1:]))


if __name__ == "__main__":
    main()
