"""Pool errors; like catalog errors each has a stable `code` (mapped to exit codes in exitcodes.py)."""

from __future__ import annotations

from catalog.errors import CatalogError


class PoolError(CatalogError):
    """Base of pool failures (shares CatalogError's shape so the CLI handles both alike)."""

    code = "POOL_ERROR"


class InvalidArgument(PoolError):
    code = "INVALID_ARGUMENT"


class WorkerNotFound(PoolError):
    code = "WORKER_NOT_FOUND"


class PortUnavailable(PoolError):
    code = "PORT_UNAVAILABLE"


class ModelNotDownloaded(PoolError):
    code = "MODEL_NOT_DOWNLOADED"


class DownloadFailed(PoolError):
    code = "DOWNLOAD_FAILED"


class ChecksumMismatch(PoolError):
    code = "CHECKSUM_MISMATCH"


class BackendUnavailable(PoolError):
    code = "BACKEND_UNAVAILABLE"


class WorkerFailed(PoolError):
    code = "WORKER_FAILED"


class WorkerTimeout(PoolError):
    code = "WORKER_TIMEOUT"


class ModelInUse(PoolError):
    code = "MODEL_IN_USE"


class NotGguf(PoolError):
    """The file is not a GGUF model (wrong magic, unknown version, truncated header)."""

    code = "NOT_GGUF"


class UnsupportedArchitecture(PoolError):
    """The model's architecture is one rbees-workerd's engine does not run."""

    code = "UNSUPPORTED_ARCHITECTURE"


class ArchitectureMismatch(PoolError):
    """--architecture (or the catalog entry) names another architecture than the file's header."""

    code = "ARCHITECTURE_MISMATCH"
