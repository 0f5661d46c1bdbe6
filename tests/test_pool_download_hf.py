"""hf:// downloads through huggingface_hub against a real loopback server speaking the hub's resolve protocol."""

from __future__ import annotations

import hashlib
import logging
import os
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
import test_pool_support as support
from rich.progress import Progress
from test_pool_support import gguf_bytes, parse_range, run_json, run_pool, serve

from rbees_pool.download.progress import TransferBar, hub_tqdm_class
from rbees_pool.exitcodes import ExitCode

pool_root = support.pool_root

REPO = "rbees-test/Tiny-GGUF"
FILENAME = "tiny.Q4_1.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Larger than huggingface_hub's 10 MiB read chunk, so a transfer cut at CUT_AT has whole chunks to keep.
CONTENT = gguf_bytes() + os.urandom(12 * 1024 * 1024 + 123)
CUT_AT = 11 * 1024 * 1024
SHA = hashlib.sha256(CONTENT).hexdigest()
TOKEN = "hf_test_token_not_a_secret"


class HubHandler(BaseHTTPRequestHandler):
    """`HEAD|GET /{repo}/resolve/{revision}/{file}` with the headers hf_hub_download reads: X-Repo-Commit,
    X-Linked-Etag (the LFS sha256), X-Linked-Size, ETag, Content-Length; Range answered with 206."""

    cut_first_get = False  # when set, the first GET sends CUT_AT bytes and drops the connection
    requests: list[tuple[str, str, str | None, str | None]] = []

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = unquote(self.path.split("?")[0])
        type(self).requests.append((self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
        prefix = f"/{REPO}/resolve/"
        revision, _, filename = path.removeprefix(prefix).partition("/")
        if not path.startswith(prefix) or filename != FILENAME or revision not in ("main", COMMIT):
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = parse_range(self.headers.get("Range"), len(CONTENT)) if body else 0
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{SHA}"')
        self.send_header("X-Linked-Etag", f'"{SHA}"')
        self.send_header("X-Linked-Size", str(len(CONTENT)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(CONTENT) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}")
        self.end_headers()
        if not body:
            return
        payload = CONTENT[start:]
        if type(self).cut_first_get:
            type(self).cut_first_get = False
            self.wfile.write(payload[:CUT_AT])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def hub(tmp_path: Path):  # noqa: ANN201
    HubHandler.requests = []
    HubHandler.cut_first_get = False
    with serve(HubHandler) as url:
        yield {"HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip


def _register(root: Path, source: str, sha: str | None = SHA) -> None:
    args = ["models", "register", "tiny", "--name", "Tiny", "--source", source]
    done = run_pool(root, *args, *(["--sha256", sha] if sha else []))
    assert done.returncode == 0, done.stderr


def test_hub_download_sends_token_and_lands_verified(pool_root: Path, hub: dict[str, str]) -> None:
    _register(pool_root, f"hf://{REPO}/{FILENAME}")
    doc = run_json(pool_root, "models", "download", "tiny", env=hub)
    path = Path(doc["path"])
    assert path.read_bytes() == CONTENT and path == pool_root / "models" / "tiny" / FILENAME
    assert sorted(p.name for p in path.parent.iterdir()) == [".download.lock", FILENAME]  # no scratch left
    methods = [(method, auth) for method, _, _, auth in HubHandler.requests]
    assert ("HEAD", f"Bearer {TOKEN}") in methods and ("GET", f"Bearer {TOKEN}") in methods


def test_revision_is_pinned(pool_root: Path, hub: dict[str, str]) -> None:
    _register(pool_root, f"hf://{REPO}@{COMMIT}/{FILENAME}")
    run_json(pool_root, "models", "download", "tiny", env=hub)
    assert all(f"/resolve/{COMMIT}/" in path for _, path, _, _ in HubHandler.requests)


def test_cut_transfer_resumes_on_the_next_run(pool_root: Path, hub: dict[str, str]) -> None:
    HubHandler.cut_first_get = True
    _register(pool_root, f"hf://{REPO}/{FILENAME}")
    first = run_pool(pool_root, "models", "download", "tiny", env=hub)
    assert first.returncode == ExitCode.DOWNLOAD_FAILED and "resume" in first.stderr, first.stderr
    assert "Traceback" not in first.stderr
    folder = pool_root / "models" / "tiny"
    assert (folder / f"{FILENAME}.part").stat().st_size == CUT_AT and not (folder / FILENAME).exists()
    assert run_json(pool_root, "models", "list") == []  # a half file is never listed as downloaded
    doc = run_json(pool_root, "models", "download", "tiny", env=hub)
    assert Path(doc["path"]).read_bytes() == CONTENT
    assert sorted(p.name for p in folder.iterdir()) == [".download.lock", FILENAME]  # no .part nor tag left
    gets = [(path, rng, auth) for method, path, rng, auth in HubHandler.requests if method == "GET"]
    assert [rng for _, rng, _ in gets] == [None, f"bytes={CUT_AT}-"], gets  # the second run continued
    assert all(f"/resolve/{COMMIT}/" in path and auth == f"Bearer {TOKEN}" for path, _, auth in gets)


def test_part_from_another_revision_is_not_continued(pool_root: Path, hub: dict[str, str]) -> None:
    """A .part whose tag names another commit is dropped: bytes of two versions are never spliced."""
    _register(pool_root, f"hf://{REPO}/{FILENAME}")
    folder = pool_root / "models" / "tiny"
    folder.mkdir(parents=True)
    (folder / f"{FILENAME}.part").write_bytes(b"x" * 1000)
    (folder / f"{FILENAME}.part.source").write_text(f"{'9' * 40} {SHA} {len(CONTENT)}")
    assert Path(run_json(pool_root, "models", "download", "tiny", env=hub)["path"]).read_bytes() == CONTENT
    assert [rng for method, _, rng, _ in HubHandler.requests if method == "GET"] == [None]


def test_wrong_checksum_is_refused(pool_root: Path, hub: dict[str, str]) -> None:
    _register(pool_root, f"hf://{REPO}/{FILENAME}", sha="f" * 64)
    done = run_pool(pool_root, "models", "download", "tiny", env=hub)
    assert done.returncode == ExitCode.CHECKSUM_MISMATCH and SHA in done.stderr, done.stderr
    assert not list((pool_root / "models" / "tiny").glob("*.gguf*"))
    assert run_json(pool_root, "models", "list") == []


def test_missing_file_on_the_hub_fails_cleanly(pool_root: Path, hub: dict[str, str]) -> None:
    _register(pool_root, f"hf://{REPO}/other.gguf", sha=None)
    done = run_pool(pool_root, "models", "download", "tiny", env=hub)
    assert done.returncode == ExitCode.DOWNLOAD_FAILED and "other.gguf" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def _display() -> Progress:
    return Progress(disable=True)  # a real rich display, just not drawn


def test_hub_plain_http_download_drives_our_bar(hub: dict[str, str], tmp_path: Path) -> None:
    """huggingface_hub's own `http_get` with our bar as its tqdm_class, against the loopback hub."""
    from huggingface_hub.file_download import http_get

    display = _display()
    target = tmp_path / "out.bin"
    with target.open("wb") as writer:
        http_get(f"{hub['HF_ENDPOINT']}/{REPO}/resolve/main/{FILENAME}", writer,
                 tqdm_class=hub_tqdm_class(display, FILENAME))  # type: ignore[arg-type]  # fmt: skip
    assert target.read_bytes() == CONTENT
    assert display.tasks == []  # the hub closed the bar it opened


def test_hub_xet_reporter_drives_our_bar() -> None:
    """huggingface_hub's XetDownloadProgressReporter (used when hf_xet is installed) with our bar: it sets
    totals, postfixes and refreshes on both of its bars; every call must land and the counts add up."""
    from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter

    display = _display()
    size = 1000
    with XetDownloadProgressReporter(
        reconstruction_desc="x: reconstructing file", transfer_desc="x: downloading bytes", total=size,
        log_level=logging.INFO, name="huggingface_hub.xet_get", tqdm_class=hub_tqdm_class(display, FILENAME),
    ) as reporter:  # fmt: skip
        bars = [reporter.reconstruction_bar, reporter.transfer_bar]
        assert all(isinstance(bar, TransferBar) for bar in bars) and len(display.tasks) == 2
        for done, sent in ((0, 400), (300, 900), (size, 1200)):  # transfer runs ahead of reconstruction
            report = SimpleNamespace(
                total_bytes=size, total_bytes_completed=done, total_bytes_completion_rate=123.0,
                total_transfer_bytes_completed=sent, total_transfer_bytes_completion_rate=None,
            )  # fmt: skip
            reporter.update_progress(report, {})
        reconstruction, transfer = bars
        assert reconstruction.n == size and reconstruction.total == size and "B/s" in reconstruction.postfix
        assert transfer.n == 1200 and transfer.total is not None and transfer.total >= 1200
        assert "???" in transfer.postfix  # no rate known yet: the hub's placeholder, not a crash
        assert reconstruction.format_dict["n"] == size
    assert transfer.total == 1200  # snapped to 100 % on close
    assert display.tasks == []
