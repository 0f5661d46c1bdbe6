"""Terminal output: rich tables for people, tab-separated rows for pipes, one JSON document on stdout for
scripts, errors on stderr."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)  # piped lines are never cut at 80 columns
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(doc: object) -> None:
    """Print exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal; piped, a header line and one tab-separated line per row, never cut short
    (`cut -f1`, `awk -F'\\t'` and `while IFS=$'\\t' read` get whole ids and URLs)."""
    if not sys.stdout.isatty():
        lines = [columns, *rows]
        sys.stdout.write("".join("\t".join(_cell(v) for v in line) + "\n" for line in lines))
        sys.stdout.flush()
        return
    if not rows:
        console.print(f"{title}: none")
        return
    view = Table(title=title, title_justify="left")
    for column in columns:
        view.add_column(column)
    for row in rows:
        view.add_row(*row)
    console.print(view)


def _cell(value: str) -> str:
    """A value that cannot break the row: tabs and newlines become spaces."""
    return " ".join(str(value).split("\t")).replace("\n", " ")


def human_size(size: int | None) -> str:
    """1536 -> '1.5 KiB'; None -> '-'."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
