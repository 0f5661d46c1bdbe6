"""The catalog entry and its JSON form (catalog.json `models` values)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from catalog.errors import CatalogCorrupt, InvalidEntry
from catalog.sources import parse_source, source_filename

SCHEMA_VERSION = 1
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_QUANT = re.compile(r"^[A-Z0-9_]{2,16}$")


@dataclass(frozen=True)
class ModelEntry:
    """One model: where to fetch it (sources, tried in order) and how to check it."""

    id: str
    name: str
    sources: tuple[str, ...]
    filename: str
    architecture: str | None = None
    sha256: str | None = None
    builtin: bool = False
    quant: str | None = None  # llama.cpp's file type: "Q4_1", "Q4_K_M"... (catalog.quants)
    file_size: int | None = None  # bytes, as the source publishes the file (shown before it is downloaded)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["sources"] = list(self.sources)
        doc.update(doc.pop("extra"))
        return doc


def new_entry(
    model_id: str,
    name: str,
    sources: list[str],
    architecture: str | None = None,
    sha256: str | None = None,
    *,
    quant: str | None = None,
    file_size: int | None = None,
) -> ModelEntry:
    """Build a validated entry; every source must parse and name the same file."""
    if not _ID.match(model_id):
        raise InvalidEntry(
            f"model id {model_id!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit"
        )
    if not sources:
        raise InvalidEntry(f"model {model_id!r} has no source")
    filenames = {source_filename(parse_source(uri)) for uri in sources}
    if len(filenames) != 1:
        raise InvalidEntry(f"model {model_id!r}: sources name different files {sorted(filenames)}")
    if sha256 is not None and not _SHA256.match(sha256.lower()):
        raise InvalidEntry(f"sha256 {sha256!r} is not 64 hex digits")
    if quant is not None and not _QUANT.match(quant):
        raise InvalidEntry(f"quant {quant!r}: a llama.cpp file type such as Q4_K_M, Q8_0 or F16")
    if file_size is not None and file_size <= 0:
        raise InvalidEntry(f"file size {file_size} is not a positive number of bytes")
    return ModelEntry(
        id=model_id, name=name, sources=tuple(sources), filename=filenames.pop(), architecture=architecture,
        sha256=sha256.lower() if sha256 else None, quant=quant, file_size=file_size,
    )  # fmt: skip


def entry_from_json(doc: Any) -> ModelEntry:
    """Rebuild an entry from catalog.json; anything malformed means the file is corrupt."""
    known = {"id", "name", "sources", "filename", "architecture", "sha256", "builtin", "quant", "file_size"}
    try:
        return ModelEntry(
            id=str(doc["id"]), name=str(doc["name"]), sources=tuple(str(s) for s in doc["sources"]),
            filename=str(doc["filename"]), architecture=doc.get("architecture"), sha256=doc.get("sha256"),
            builtin=bool(doc.get("builtin", False)), quant=doc.get("quant"),
            file_size=None if doc.get("file_size") is None else int(doc["file_size"]),
            extra={k: v for k, v in doc.items() if k not in known},
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CatalogCorrupt(f"malformed catalog entry {doc!r:.200}: {exc!r}") from exc
