"""`rbees infer`: a prompt in, the answer streamed to the terminal, tokens/s at the end."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

import catalog
from rbees import infer as client
from rbees.errors import InvalidArgument
from rbees.targets import interrupts
from rbees_pool.output import err_console


def infer(
    prompt: Annotated[str, typer.Argument(help="The prompt ('-' reads it from stdin).", show_default=False)],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Catalog id (orchestrator default: the catalog's default; with --worker, checked against it).",
        ),
    ] = None,
    orcd: Annotated[str | None, typer.Option("--orcd", envvar="RBEES_ORCD", help="Orchestrator URL.")] = None,
    worker: Annotated[str | None, typer.Option("--worker", help="A worker's URL (bypasses the orchestrator).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float | None, typer.Option("--temperature", min=0, help="0: greedy.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0, max=1)] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=0)] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0)] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop sequence; repeatable.")] = None,
    priority: Annotated[str, typer.Option("--priority", help="interactive or batch (orchestrator).")] = "interactive",
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", envvar="RBEES_API_TOKEN_FILE", help="API token file (or set RBEES_API_TOKEN)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="No streaming: one JSON line at the end.")] = False,
) -> None:
    """Generate from PROMPT on the orchestrator (--orcd URL) or a worker (--worker URL), streaming the answer."""
    if (orcd is None) == (worker is None):
        raise InvalidArgument("give --orcd URL or --worker URL (one of them)")
    if priority not in ("interactive", "batch"):
        raise InvalidArgument(f"--priority {priority!r}: choose interactive or batch")
    text = sys.stdin.read() if prompt == "-" else prompt
    request = client.Request(text, max_tokens, model, temperature, top_p, top_k, seed, tuple(stop or ()))
    token = _token(token_file)
    on_token = (lambda _: None) if as_json else _write
    with interrupts():
        if worker is not None:
            result = client.run_worker(worker, request, token, on_token)
        else:
            request = replace(request, model=model or catalog.DEFAULT_MODEL)
            result = client.run_orcd(orcd or "", request, token, priority, on_token, _queued(as_json))
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
        return
    _write("\n")
    rate = f"{result.tokens_per_sec:.1f} tokens/s" if result.tokens_per_sec is not None else "rate unknown"
    err_console.print(f"{result.tokens_out} tokens, {rate}, {result.elapsed_s:.2f} s ({result.stop_reason})")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _queued(quiet: bool) -> client.OnQueued:
    def report(position: int | None) -> None:
        if not quiet and position:
            err_console.print(f"queued (position {position})")

    return report


def _token(token_file: Path | None) -> str | None:
    """The bearer token: from --token-file, else RBEES_API_TOKEN; never from the command line."""
    if token_file is None:
        return os.environ.get("RBEES_API_TOKEN") or None
    try:
        return token_file.expanduser().read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise InvalidArgument(f"--token-file {token_file}: {exc.strerror or exc}") from None
