"""`models prune`: reclaim disk from files no catalog entry owns (unregistered models, strays) and from
folders that failed downloads left empty; never under a download in progress or a running worker."""

from __future__ import annotations

import shutil
from pathlib import Path

from filelock import FileLock, Timeout

import catalog
from rbees_pool.paths import DOWNLOAD_LOCK, PoolPaths
from rbees_pool.workers import records


def prune_models(paths: PoolPaths, dry_run: bool = False) -> list[Path]:
    """Delete (or with dry_run only list) what no entry owns under models/; returns the paths, folders whole.

    An entry owns its file and, for resuming, its `.part` and `.part.source`. A model folder a live worker
    serves, or one whose download lock is held, is left alone."""
    if not paths.models.is_dir():
        return []
    entries = {entry.id: entry for entry in catalog.load(paths.root)}
    served = {record.model_id for record in records.reconcile(paths)[0]}
    removed: list[Path] = []
    for item in sorted(paths.models.iterdir()):
        if not item.is_dir() or item.is_symlink():
            removed.append(item)
            if not dry_run:
                item.unlink()
        elif item.name not in served:
            removed += _prune_folder(item, entries.get(item.name), dry_run)
    return removed


def _prune_folder(folder: Path, entry: catalog.ModelEntry | None, dry_run: bool) -> list[Path]:
    owned = {entry.filename, f"{entry.filename}.part", f"{entry.filename}.part.source"} if entry else set()
    try:
        with FileLock(str(folder / DOWNLOAD_LOCK), timeout=0):
            children = [child for child in folder.iterdir() if child.name != DOWNLOAD_LOCK]
            unowned = [child for child in children if child.name not in owned]
            whole = len(unowned) == len(children)  # nothing owned is left: the folder goes, lock and all
            targets = [folder] if whole else sorted(unowned)
            if not dry_run:
                for target in targets:
                    _delete(target)
            return targets
    except Timeout:
        return []  # a download is writing here


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
