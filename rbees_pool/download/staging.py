"""Where a fetcher writes: `<file>.part` and a scratch folder inside the model's folder (one filesystem)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rich.progress import Progress

from rbees_pool.download.progress import TransferBar

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Staging:
    """The .part file a fetcher must leave complete, a scratch folder it may use, and the progress display."""

    part: Path
    scratch: Path
    display: Progress


def copy_to_part(reader: BinaryIO, staging: Staging, description: str, total: int | None) -> None:
    """Copy a stream into the .part file in 1 MiB chunks, advancing a progress bar."""
    with staging.part.open("wb") as writer, TransferBar(staging.display, description, total=total) as bar:
        while chunk := reader.read(_CHUNK):
            writer.write(chunk)
            bar.update(len(chunk))
