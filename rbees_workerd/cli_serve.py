"""`rbees-workerd serve`: its options, from the command line, `WORKER_*` environment or `--config FILE.json`.

typer (click) resolves each option in the SPEC's order: command line, then environment variable, then the
config file (click's `default_map`), then the default; settings.py checks the values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rbees_workerd.settings import Settings, SettingsError, build_settings, read_config

# Where an option's value came from, most specific first (click's ParameterSource names).
_SOURCES = ("COMMANDLINE", "ENVIRONMENT", "DEFAULT_MAP")


def _apply_config(ctx: typer.Context, path: Path | None) -> Path | None:
    """Eager, so the file's values are in `default_map` before any other option is resolved."""
    if path is not None:
        ctx.default_map = {**(ctx.default_map or {}), **read_config(str(path))}
    return path


def serve(
    ctx: typer.Context,
    worker_id: Annotated[
        str | None, typer.Option("--worker-id", help="This worker's id (as the pool knows it).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Path of the GGUF model file.")] = None,
    model_ref: Annotated[
        str | None, typer.Option("--model-ref", help="The model name this worker reports (default: the file's stem).")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="TCP port to listen on.")] = None,
    bind: Annotated[
        str | None, typer.Option("--bind", envvar="WORKER_BIND_ADDR", help="ADDR or ADDR:PORT (default 127.0.0.1).")
    ] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="cpu or cuda (default cpu).")] = None,
    gpu: Annotated[
        int | None, typer.Option("--gpu", envvar="WORKER_GPU_DEVICE", help="CUDA device index (default 0).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (default: all cores).")] = None,
    slots: Annotated[
        int | None, typer.Option("--slots", help="Concurrent sequences decoded together (default 4).")
    ] = None,
    context_length: Annotated[
        int | None, typer.Option("--context-length", help="Tokens per slot (default: the model's, at most 4096).")
    ] = None,
    step_tokens: Annotated[
        int | None,
        typer.Option("--step-tokens", help="Tokens one engine step takes at most (default: 8 a slot, 256 to 2048)."),
    ] = None,
    callback_url: Annotated[
        str | None, typer.Option("--callback-url", help="POST the ready callback here once the model is loaded.")
    ] = None,
    api_token_file: Annotated[
        str | None,
        typer.Option("--api-token-file", envvar="WORKER_API_TOKEN_FILE", help="File holding the bearer token."),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", envvar="WORKER_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR (default INFO)."),
    ] = None,
    drain_timeout: Annotated[
        float | None, typer.Option("--drain-timeout", help="Seconds SIGTERM lets jobs finish (default 30).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            is_eager=True,
            callback=_apply_config,
            help="JSON object with any of these options (snake_case keys); the command line and environment win.",
        ),
    ] = None,
) -> int:
    """Serve one model over HTTP (the default command: `rbees-workerd --worker-id ID --model PATH --port N`)."""
    settings = settings_from(ctx)
    if settings.backend == "cuda":
        from rbees_workerd.kernels.cuda.probe import require_cuda

        require_cuda()
    from rbees_workerd.server import run

    return run(settings)


def settings_from(ctx: typer.Context) -> Settings:
    """The validated settings of a parsed `serve` command line."""

    def level(name: str) -> int:
        source = ctx.get_parameter_source(name)
        return _SOURCES.index(source.name) if source is not None and source.name in _SOURCES else len(_SOURCES)

    values: dict[str, Any] = dict(ctx.params)
    return build_settings(values, bind_port_wins=level("bind") <= level("port"))


def parse_settings(argv: list[str]) -> Settings:
    """The settings `serve` would run with for `argv` (and this environment); raises SettingsError."""
    app = typer.Typer()
    app.command()(serve)
    command = typer.main.get_command(app)
    try:
        with command.make_context("rbees-workerd serve", list(argv)) as ctx:
            return settings_from(ctx)
    except typer.TyperException as e:
        raise SettingsError(e.format_message()) from None
