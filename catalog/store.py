"""catalog.json on disk: read without locking, mutate under a file lock, save by atomic replace."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from catalog.builtin import builtin_entries
from catalog.errors import CatalogCorrupt, ModelExists, ModelNotFound
from catalog.schema import SCHEMA_VERSION, ModelEntry, entry_from_json

CATALOG_FILE = "catalog.json"
_LOCK_TIMEOUT_S = 60.0


class Catalog:
    """An ordered id -> entry mapping; a pool without catalog.json has the built-in entries."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self._entries = {entry.id: entry for entry in entries}

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._entries

    def get(self, model_id: str) -> ModelEntry:
        try:
            return self._entries[model_id]
        except KeyError:
            raise ModelNotFound(f"no model {model_id!r} in the catalog") from None

    def add(self, entry: ModelEntry) -> None:
        if entry.id in self._entries:
            raise ModelExists(f"model {entry.id!r} is already registered")
        self._entries[entry.id] = entry

    def restore_builtins(self) -> dict[str, str]:
        """Put every built-in entry back as shipped; says per id whether it was `restored` (it was gone),
        `reset` (it had been changed or replaced) or `unchanged`. Other entries are left alone."""
        outcome = {}
        for entry in builtin_entries():
            current = self._entries.get(entry.id)
            outcome[entry.id] = "unchanged" if current == entry else "reset" if current else "restored"
            self._entries[entry.id] = entry  # a replaced entry keeps its place in the order
        return outcome

    def remove(self, model_id: str) -> ModelEntry:
        entry = self.get(model_id)
        del self._entries[model_id]
        return entry

    def to_json(self) -> dict[str, object]:
        return {"version": SCHEMA_VERSION, "models": [entry.to_json() for entry in self]}


def load(root: Path) -> Catalog:
    """Read the catalog; a missing file gives the built-ins, an unreadable one raises CatalogCorrupt."""
    path = root / CATALOG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Catalog(builtin_entries())
    except UnicodeDecodeError as exc:
        raise CatalogCorrupt(f"{path} is not UTF-8 text ({exc}); fix or move it away") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogCorrupt(f"{path} is not valid JSON ({exc}); fix or move it away") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise CatalogCorrupt(f"{path} has no 'models' list; fix or move it away")
    if doc.get("version") != SCHEMA_VERSION:
        raise CatalogCorrupt(f"{path} has schema version {doc.get('version')!r}, expected {SCHEMA_VERSION}")
    entries = [entry_from_json(item) for item in doc["models"]]
    ids = [entry.id for entry in entries]
    if len(set(ids)) != len(ids):
        raise CatalogCorrupt(f"{path} lists a model id twice")
    return Catalog(entries)


@contextmanager
def update(root: Path) -> Iterator[Catalog]:
    """Load under an exclusive lock, let the caller mutate, save atomically; nothing is saved on error."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{CATALOG_FILE}.lock"), timeout=_LOCK_TIMEOUT_S):
        catalog = load(root)
        yield catalog
        _save(root / CATALOG_FILE, catalog)


def _save(path: Path, catalog: Catalog) -> None:
    """Write a sibling temp file, fsync, os.replace: readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(catalog.to_json(), handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
