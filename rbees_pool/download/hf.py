"""hf:// sources through huggingface_hub (honours HF_ENDPOINT, HF_TOKEN; revision pinning)."""

from __future__ import annotations

import os
from pathlib import Path

from catalog import HfSource
from rbees_pool.download.progress import TransferBar
from rbees_pool.download.staging import Staging
from rbees_pool.errors import DownloadFailed


def fetch_hf(source: HfSource, staging: Staging) -> Path:
    """hf_hub_download into the scratch folder, then move the file to the .part name.

    huggingface_hub resumes a transfer cut mid-body (Range) within the run; a run that is killed starts the
    file again, since its temporary file is private to the process.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url  # slow import

    def bar(**kwargs: object) -> TransferBar:
        return TransferBar(staging.display, Path(source.path).name, kwargs.get("total"), kwargs.get("initial") or 0)  # type: ignore[arg-type]

    try:
        # One HEAD without retries first: an unreachable hub then falls back to the next source in
        # seconds instead of after huggingface_hub's ~25 s of backoff.
        get_hf_file_metadata(hf_hub_url(source.repo, source.path, revision=source.revision))
        path = hf_hub_download(
            source.repo,
            source.path,
            revision=source.revision,
            local_dir=staging.scratch,
            tqdm_class=bar,  # type: ignore[arg-type]
        )
    except Exception as exc:  # huggingface_hub raises HTTP, OS, offline and validation errors of many types
        raise DownloadFailed(f"hf://{source.repo}/{source.path}: {type(exc).__name__}: {exc}") from exc
    os.replace(path, staging.part)
    return staging.part
