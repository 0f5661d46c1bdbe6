"""The model catalog shared by the CLIs and daemons: entries, source URIs, and catalog.json on disk."""

from catalog.builtin import DEFAULT_MODEL, builtin_entries
from catalog.errors import CatalogCorrupt, CatalogError, InvalidEntry, ModelExists, ModelNotFound
from catalog.schema import ModelEntry, new_entry
from catalog.sources import FileSource, HfSource, HttpSource, PypiSource, Source, hf_uri, parse_source
from catalog.store import CATALOG_FILE, Catalog, load, update

__all__ = [
    "CATALOG_FILE", "DEFAULT_MODEL", "Catalog", "CatalogCorrupt", "CatalogError", "FileSource", "HfSource",
    "HttpSource", "InvalidEntry", "ModelEntry", "ModelExists", "ModelNotFound", "PypiSource", "Source",
    "builtin_entries", "hf_uri", "load", "new_entry", "parse_source", "update",
]  # fmt: skip
