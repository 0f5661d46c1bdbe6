"""Transfer progress: a rich bar on stderr when it is a terminal, silent otherwise (CI, --quiet)."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def transfer_display(quiet: bool) -> Progress:
    """A progress display that is disabled when quiet or when stderr is not a TTY."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console, disable=quiet or not sys.stderr.isatty(),
    )  # fmt: skip


class TransferBar:
    """One file's bar; also huggingface_hub's `tqdm_class` (same kwargs, `update`, context manager)."""

    def __init__(self, display: Progress, description: str, total: int | None = None, initial: int = 0) -> None:
        self._display = display
        self._task = display.add_task(description, total=total, completed=initial)

    def update(self, n: int = 1) -> None:
        self._display.advance(self._task, n)

    def close(self) -> None:
        self._display.remove_task(self._task)

    def __enter__(self) -> TransferBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
