"""`rbees-pool`: the local pool CLI (catalog, downloads, workers). Errors exit with the codes in exitcodes.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from catalog.errors import CatalogError
from rbees_pool import cli_models, cli_status, cli_workers
from rbees_pool.exitcodes import ExitCode, exit_code_for
from rbees_pool.output import err_console
from rbees_pool.paths import PoolPaths, default_root
from rbees_workerd import cli_run

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=cli_run.HELP_OPTIONS,
    help="Manage this pool host: model catalog and downloads, worker daemons, host status.",
)
app.add_typer(cli_models.app, name="models")
app.add_typer(cli_workers.app, name="worker")
app.add_typer(cli_status.backends_app, name="backends")
app.command("status")(cli_status.status)


@app.callback()
def _root(
    ctx: typer.Context,
    root: Annotated[
        Path | None,
        typer.Option("--root", envvar="RBEES_HOME", help="Pool root (default ~/.rbees).", show_default=False),
    ] = None,
    _version: Annotated[
        bool, typer.Option(
            "--version", is_eager=True, callback=cli_run.version_callback("rbees-pool"), help="Print the version."
        )
    ] = False,
) -> None:
    ctx.obj = PoolPaths((root or default_root()).expanduser().resolve())


def main() -> None:
    """Run the CLI; a catalog or pool error prints `error: CODE: message` on stderr and exits with its code."""
    try:
        code = cli_run.run(app, "rbees-pool", sys.argv[1:])
    except CatalogError as exc:
        err_console.print(f"error: {escape(str(exc))}")
        code = int(exit_code_for(exc.code))
    except OSError as exc:  # unwritable root, full disk, catalog lock timeout: say so without a traceback
        err_console.print(f"error: OS_ERROR: {escape(str(exc))}")
        code = int(ExitCode.FAILURE)
    sys.exit(code)
