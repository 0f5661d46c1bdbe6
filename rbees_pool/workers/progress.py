"""What a starting worker is doing, from its /ready document, shown on stderr while `worker spawn` waits:
a live line with the elapsed time on a terminal, one plain line per change of state or phase otherwise."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.markup import escape


def describe(doc: dict) -> str:
    """`Loading 40%, compiling kernels` from `state`, `load_progress` and (when the worker sends it) `phase`."""
    state = str(doc.get("state", "?"))
    progress = doc.get("load_progress")
    text = f"{state} {progress:.0%}" if state == "Loading" and isinstance(progress, int | float) else state
    phase = doc.get("phase")
    return f"{text}, {phase}" if phase and state != "Ready" else text


class ReadyProgress:
    """Reports a worker's way to Ready on `console` (stderr)."""

    def __init__(self, worker_id: str, console: Console) -> None:
        self._worker_id = worker_id
        self._console = console
        self._status = console.status(escape(f"{worker_id}: starting")) if console.is_terminal else None
        self._last: tuple[object, object] | None = None

    def __enter__(self) -> ReadyProgress:
        if self._status is not None:
            self._status.start()
        return self

    def update(self, elapsed_s: float, doc: dict) -> None:
        """A new /ready answer: redraw the live line, or print a line when state or phase changed."""
        if doc.get("state") == "Ready":
            return
        text = f"{self._worker_id}: {describe(doc)}"
        if self._status is not None:
            self._status.update(escape(f"{text} ({elapsed_s:.0f}s)"))
        elif (key := (doc.get("state"), doc.get("phase"))) != self._last:
            self._last = key
            self._console.print(f"{text} ({elapsed_s:.1f}s)", markup=False, highlight=False)

    def say(self, line: str) -> None:
        """A final line (Ready after N s, stopped, ...), printed once the live line is gone."""
        self.close()
        self._console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
