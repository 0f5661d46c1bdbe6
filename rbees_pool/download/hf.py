"""hf:// sources: huggingface_hub resolves the file (HF_ENDPOINT, HF_TOKEN, revision -> commit, size, etag)
and the bytes are streamed by the Range-resuming httpx code, so a run that is cut off is continued by the next.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from catalog import HfSource
from rbees_pool.download.http import stream_to_part
from rbees_pool.download.staging import Staging
from rbees_pool.errors import DownloadFailed

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

_TAG_SUFFIX = ".source"  # next to the .part: which hub object its bytes belong to


def fetch_hf(source: HfSource, staging: Staging) -> Path:
    """Resolve `source` on the hub, then download (or continue) the .part from the resolved commit.

    A .part left by an earlier run is only continued when it was fetched for the same commit and etag; one
    from another revision of the file is discarded, so bytes of two versions are never spliced together.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url  # slow import
    from huggingface_hub.utils import build_hf_headers

    uri = f"hf://{source.repo}/{source.path}"
    try:
        headers = {**build_hf_headers(), "Accept-Encoding": "identity"}  # identity: byte offsets are file offsets
        # One HEAD without retries: an unreachable hub falls back to the next source in seconds.
        meta = get_hf_file_metadata(hf_hub_url(source.repo, source.path, revision=source.revision), headers=headers)
    except Exception as exc:  # huggingface_hub raises HTTP, OS, offline and validation errors of many types
        raise DownloadFailed(f"{uri}: {type(exc).__name__}: {exc}") from exc
    revision = meta.commit_hash or source.revision  # pin the GET to what the HEAD resolved
    _discard_foreign_part(staging.part, _tag(meta, revision))
    try:
        part = stream_to_part(hf_hub_url(source.repo, source.path, revision=revision), staging, headers)
    except DownloadFailed as exc:
        raise DownloadFailed(f"{uri}: {exc.message}") from exc
    _tag_path(part).unlink(missing_ok=True)
    if meta.size is not None and (size := part.stat().st_size) != meta.size:
        part.unlink()
        raise DownloadFailed(f"{uri}: got {size} bytes, the hub says {meta.size}")
    return part


def _tag(meta: HfFileMetadata, revision: str | None) -> str:
    return f"{revision} {meta.etag} {meta.size}"


def _tag_path(part: Path) -> Path:
    return part.with_name(part.name + _TAG_SUFFIX)


def _discard_foreign_part(part: Path, tag: str) -> None:
    """Keep `part` only if it was started for `tag`; then record `tag` for the bytes about to be written."""
    tag_file = _tag_path(part)
    if part.exists() and (not tag_file.is_file() or tag_file.read_text() != tag):
        part.unlink()
    tag_file.write_text(tag)
