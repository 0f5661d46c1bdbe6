"""Transfer progress: a rich bar on stderr when it is a terminal, silent otherwise (CI, --quiet)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar

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
    """One file's bar on a rich display, with the tqdm surface huggingface_hub drives (see `hub_tqdm_class`).

    huggingface_hub's plain HTTP download calls `update`; its Xet reporters also read and set `n`/`total`,
    call `set_postfix_str`, `refresh`, `close` and read `format_dict["rate"]`; its thread pools use the
    `get_lock`/`set_lock` class methods. tqdm-only keyword arguments (unit, bar_format, position, ...) are
    accepted and ignored: the rich columns already show bytes, speed and time left.
    """

    _lock: ClassVar[threading.RLock] = threading.RLock()

    def __init__(
        self, display: Progress, description: str, total: float | None = None, initial: float = 0, **_tqdm: Any
    ) -> None:
        self._display = display
        self.desc = description
        self.n: float = initial
        self._total = total
        self.postfix = ""
        self._closed = False
        self._task = display.add_task(description, total=total, completed=initial)

    @property
    def total(self) -> float | None:
        return self._total

    @total.setter
    def total(self, value: float | None) -> None:
        self._total = value
        self._display.update(self._task, total=value)

    @property
    def format_dict(self) -> dict[str, Any]:
        """tqdm's format fields that callers read: n, total, elapsed, rate (bytes/s, None until known)."""
        task = next((task for task in self._display.tasks if task.id == self._task), None)
        rate = task.speed if task is not None else None
        elapsed = task.elapsed if task is not None else None
        return {"n": self.n, "total": self._total, "elapsed": elapsed or 0.0, "rate": rate, "postfix": self.postfix}

    def update(self, n: float | None = 1) -> None:
        """Advance by `n` bytes (negative rolls back, as huggingface_hub does when a server ignores Range)."""
        if n:
            self.n += n
            self._display.advance(self._task, n)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)
        if refresh:
            self.refresh()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""
        self._display.update(self._task, description=self.desc)
        if refresh:
            self.refresh()

    def refresh(self) -> None:
        if not self._closed:
            self._display.refresh()

    def close(self) -> None:
        """Remove the bar; a second close (hub reporters and context managers both close) does nothing."""
        if not self._closed:
            self._closed = True
            self._display.remove_task(self._task)

    @classmethod
    def get_lock(cls) -> threading.RLock:
        return cls._lock

    @classmethod
    def set_lock(cls, lock: threading.RLock) -> None:
        cls._lock = lock

    def __enter__(self) -> TransferBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def hub_tqdm_class(display: Progress, description: str) -> Callable[..., TransferBar]:
    """A `tqdm_class` for huggingface_hub: it is called with tqdm's keyword arguments (desc, total, initial,
    unit, ...) and gets a TransferBar on `display` labelled `description`."""

    def make(*_args: Any, total: float | None = None, initial: float = 0, **tqdm_kwargs: Any) -> TransferBar:
        tqdm_kwargs.pop("desc", None)  # the hub's labels are URLs or "…: reconstructing file"; ours is the file
        return TransferBar(display, description, total=total, initial=initial or 0, **tqdm_kwargs)

    return make
