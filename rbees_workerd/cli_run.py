"""How the rbees daemons' CLIs run a typer app: `-h`, `--version`, one error line, stable exit codes.

Every failure is one line on stderr, `error: CODE: reason` (as `rbees` and `rbees-pool` print theirs), and a
usage error exits 2. typer ships its own copy of click (`typer._click`), so `click.ClickException` never
matches what it raises: `typer.TyperException` is the public base of its usage errors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import version

import typer

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
USAGE_EXIT = 2


def print_error(code: str, reason: str) -> None:
    """The one line a failed command leaves on stderr."""
    print(f"error: {code}: {' '.join(reason.split())}", file=sys.stderr)


def version_callback(prog: str) -> Callable[[bool], None]:
    """An eager `--version` option's callback: print `PROG VERSION` and exit 0."""

    def show(requested: bool) -> None:
        if requested:
            print(f"{prog} {version('rbees')}")
            raise typer.Exit()

    return show


def run(app: typer.Typer, prog: str, argv: list[str]) -> int:
    """Run `app` on `argv`; returns the exit code (a command may return its own). The caller handles the
    errors of its domain; usage errors (unknown option, missing or out-of-range value) are handled here."""
    try:
        result = app(args=argv, prog_name=prog, standalone_mode=False)
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a group without its command: typer printed its help
            return USAGE_EXIT
        ctx = getattr(e, "ctx", None)
        hint = f"; see '{ctx.command_path} -h'" if ctx is not None else ""
        print_error("INVALID_ARGUMENT", e.format_message().rstrip(".") + hint)
        return e.exit_code
    except typer.Abort:
        return 130
    return result if isinstance(result, int) else 0
