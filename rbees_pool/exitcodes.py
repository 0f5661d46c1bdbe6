"""Stable exit codes of `rbees-pool` (documented in docs/pool.md); scripts in CI rely on them."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit status; never renumber, only append."""

    OK = 0
    FAILURE = 1  # unexpected failure (a bug, an OS error)
    USAGE = 2  # bad arguments or option values (also what typer/click use)
    NOT_FOUND = 3  # unknown model or worker id
    CONFLICT = 4  # duplicate model id, port taken, model in use
    NOT_DOWNLOADED = 5  # the model must be downloaded first
    CATALOG_CORRUPT = 6  # catalog.json cannot be read; it was left untouched
    DOWNLOAD_FAILED = 7  # every source failed (network, HTTP error, missing file)
    CHECKSUM_MISMATCH = 8  # the file's sha256 differs from the catalog's
    BACKEND_UNAVAILABLE = 9  # e.g. cuda on a host without an NVIDIA GPU
    WORKER_FAILED = 10  # the worker exited while loading
    TIMEOUT = 11  # the worker was not ready in time (it was stopped)
    # 12-19 are rbees's own (rbees/exitcodes.py): a pool code passes through `rbees pool` unchanged.
    UNSUPPORTED_ARCHITECTURE = 20  # the model's architecture is not one rbees-workerd runs (register, download, spawn)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention); `worker spawn` stopped its worker first


# Error code (the stable string in messages) -> exit code.
EXIT_CODES: dict[str, ExitCode] = {
    "INVALID_ENTRY": ExitCode.USAGE,
    "INVALID_ARGUMENT": ExitCode.USAGE,
    "NOT_GGUF": ExitCode.USAGE,  # a source that is not a model: fix the registration
    "UNSUPPORTED_ARCHITECTURE": ExitCode.UNSUPPORTED_ARCHITECTURE,
    "ARCHITECTURE_MISMATCH": ExitCode.USAGE,
    "MODEL_NOT_FOUND": ExitCode.NOT_FOUND,
    "WORKER_NOT_FOUND": ExitCode.NOT_FOUND,
    "MODEL_EXISTS": ExitCode.CONFLICT,
    "PORT_UNAVAILABLE": ExitCode.CONFLICT,
    "MODEL_IN_USE": ExitCode.CONFLICT,
    "MODEL_NOT_DOWNLOADED": ExitCode.NOT_DOWNLOADED,
    "CATALOG_CORRUPT": ExitCode.CATALOG_CORRUPT,
    "DOWNLOAD_FAILED": ExitCode.DOWNLOAD_FAILED,
    "CHECKSUM_MISMATCH": ExitCode.CHECKSUM_MISMATCH,
    "BACKEND_UNAVAILABLE": ExitCode.BACKEND_UNAVAILABLE,
    "WORKER_FAILED": ExitCode.WORKER_FAILED,
    "WORKER_TIMEOUT": ExitCode.TIMEOUT,
}


def exit_code_for(error_code: str) -> ExitCode:
    """The exit code for an error code; unknown codes are plain failures."""
    return EXIT_CODES.get(error_code, ExitCode.FAILURE)
