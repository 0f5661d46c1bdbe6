"""Catalog errors: each carries a stable `code` that CLIs map to exit codes and scripts match on."""

from __future__ import annotations


class CatalogError(Exception):
    """Base of every catalog failure."""

    code = "CATALOG_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class CatalogCorrupt(CatalogError):
    """catalog.json exists but cannot be parsed; it is reported, never silently replaced."""

    code = "CATALOG_CORRUPT"


class ModelNotFound(CatalogError):
    """No catalog entry has the requested id."""

    code = "MODEL_NOT_FOUND"


class ModelExists(CatalogError):
    """An entry with that id is already registered."""

    code = "MODEL_EXISTS"


class InvalidEntry(CatalogError):
    """A model id, source URI or checksum is malformed."""

    code = "INVALID_ENTRY"
