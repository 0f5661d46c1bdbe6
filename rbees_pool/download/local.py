"""file:// sources: copy the file next to its final place so the final step is a rename on one filesystem."""

from __future__ import annotations

from pathlib import Path

from catalog import FileSource
from rbees_pool.download.staging import Staging, copy_to_part
from rbees_pool.errors import DownloadFailed


def fetch_file(source: FileSource, staging: Staging) -> Path:
    """Copy the local file to the staging .part file."""
    src = Path(source.path)
    try:
        with src.open("rb") as reader:
            copy_to_part(reader, staging, src.name, src.stat().st_size)
    except OSError as exc:
        raise DownloadFailed(f"cannot read {src}: {exc.strerror or exc}") from exc
    return staging.part
