"""`rbees`: drive the pools of a fleet over SSH, and talk to its workers. Errors exit with the codes in
exitcodes.py (a remote rbees-pool's own code passes through)."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.markup import escape

from rbees import cli_hosts, cli_infer, cli_pool
from rbees.errors import RbeesError
from rbees_pool.output import err_console
from rbees_workerd import cli_run

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=cli_run.HELP_OPTIONS,
    help="Drive rbees pool hosts over SSH and stream answers from their workers.",
)
app.add_typer(cli_pool.app, name="pool")
app.add_typer(cli_hosts.app, name="hosts")
app.command("infer")(cli_infer.infer)


@app.callback()
def _root(
    _version: Annotated[
        bool, typer.Option(
            "--version", is_eager=True, callback=cli_run.version_callback("rbees"), help="Print the version."
        )
    ] = False,
) -> None:
    """Drive rbees pool hosts over SSH and stream answers from their workers."""


def main() -> None:
    """Run the CLI; an RbeesError prints `error: CODE: message` on stderr and exits with its code."""
    logging.getLogger("paramiko").addHandler(logging.NullHandler())  # its tracebacks are ours to summarise
    try:
        code = cli_run.run(app, "rbees", sys.argv[1:])
    except RbeesError as exc:
        err_console.print(f"error: {escape(str(exc))}")
        code = int(exc.exit_code)
    sys.exit(code)
