"""hf:// downloads through huggingface_hub against a real loopback server speaking the hub's resolve protocol."""

from __future__ import annotations

import hashlib
import os
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote

import pytest
import test_pool_support as support
from test_pool_support import parse_range, run_json, run_pool, serve

from rbees_pool.exitcodes import ExitCode

pool_root = support.pool_root

REPO = "rbees-test/Tiny-GGUF"
FILENAME = "tiny.Q4_1.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Larger than huggingface_hub's 10 MiB read chunk, so a transfer cut at CUT_AT has whole chunks to keep.
CONTENT = os.urandom(12 * 1024 * 1024 + 123)
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


def test_cut_transfer_resumes_with_range(pool_root: Path, hub: dict[str, str]) -> None:
    HubHandler.cut_first_get = True
    _register(pool_root, f"hf://{REPO}/{FILENAME}")
    doc = run_json(pool_root, "models", "download", "tiny", env=hub)
    assert Path(doc["path"]).read_bytes() == CONTENT
    ranges = [rng for method, _, rng, _ in HubHandler.requests if method == "GET"]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    assert 0 < parse_range(ranges[1], len(CONTENT)) <= CUT_AT  # the second GET continued, it did not restart


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
