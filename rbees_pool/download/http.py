"""https:// (and http://) sources with httpx; a cut transfer keeps its .part and resumes with Range."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from catalog import HttpSource
from rbees_pool.download.progress import TransferBar
from rbees_pool.download.staging import Staging
from rbees_pool.errors import DownloadFailed

_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-\d+/(\d+|\*)$")


def fetch_http(source: HttpSource, staging: Staging) -> Path:
    """Download into the .part file, continuing from its current size when the server honours Range."""
    return stream_to_part(source.url, staging)


def stream_to_part(url: str, staging: Staging, headers: dict[str, str] | None = None) -> Path:
    """GET `url` (redirects followed; httpx drops Authorization on a cross-origin hop) into the .part file,
    sending `Range: bytes=<size>-` when a .part from an earlier run is there. Every byte received is kept,
    so a cut transfer raises DownloadFailed and the next run continues it."""
    part = staging.part
    offset = part.stat().st_size if part.exists() else 0
    request_headers = {**(headers or {}), **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        with httpx.stream("GET", url, headers=request_headers, follow_redirects=True, timeout=_TIMEOUT) as resp:
            if resp.status_code == 416 and offset:
                return part  # the .part already holds every byte; the checksum decides
            if resp.status_code not in (200, 206):
                raise DownloadFailed(f"{url}: HTTP {resp.status_code}")
            offset = _resume_offset(resp, offset)
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            with (
                part.open("ab" if offset else "wb") as writer,
                TransferBar(staging.display, Path(part.name).stem, total=total, initial=offset) as bar,
            ):
                for chunk in resp.iter_bytes():  # unbuffered: every byte received is kept for a resume
                    writer.write(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as exc:
        kept = part.stat().st_size if part.exists() else 0
        raise DownloadFailed(f"{url}: {exc or type(exc).__name__} ({kept} bytes kept; run again to resume)") from exc
    return part


def _resume_offset(resp: httpx.Response, offset: int) -> int:
    """Where the body starts: `offset` for a matching 206, 0 when the server sent the whole file."""
    if resp.status_code == 200:
        return 0
    match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if match is None or int(match[1]) != offset:
        raise DownloadFailed(f"{resp.url}: bad Content-Range {resp.headers.get('Content-Range')!r} for offset {offset}")
    return offset
