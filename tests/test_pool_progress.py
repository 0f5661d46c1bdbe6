"""The download progress bar: drawn on a terminal, absent with --quiet and when output is piped."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path

import test_pool_download_sources as sources
import test_pool_support as support
from test_pool_support import POOL, run_pool, serve

pool_root = support.pool_root
BAR = re.compile(r"\d+(\.\d+)?/3\.1 MB")  # rich's DownloadColumn for the 3.1 MB test file


def _download_on_a_terminal(root: Path, *extra: str) -> tuple[int, str]:
    """`rbees-pool models download m` with a pseudo-terminal as its stdin, stdout and stderr."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(POOL), "--root", str(root), "models", "download", "m", *extra],
        stdin=follower, stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "120"},
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
