"""Shared helpers for the rbees-pool tests: run the installed CLI, a pool root that leaves no process behind,
and a real loopback HTTP server. (No tests here; the test_pool_* modules import it.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from gguf import GGUFWriter

POOL = Path(sys.executable).parent / "rbees-pool"


def run_pool(
    root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `rbees-pool --root ROOT ARGS` as a user would; stdout/stderr captured as text."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(POOL), "--root", str(root), *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def run_json(root: Path, *args: str, env: dict[str, str] | None = None) -> object:
    """Run a --json command that must succeed and return its one JSON document."""
    done = run_pool(root, *args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def kill_processes_mentioning(text: str) -> list[int]:
    """SIGKILL every process whose command line mentions `text` (workers name their model under the root)."""
    killed = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid != os.getpid() and any(text in part for part in process.info["cmdline"] or []):
            try:
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process.pid)
            except ProcessLookupError:
                continue
    return killed


def assert_nothing_left_running(text: str) -> None:
    """Teardown check: kill whatever still mentions `text`, then fail if there was anything to kill (a test
    that spawns a worker must stop it through the CLI)."""
    killed = kill_processes_mentioning(text)
    assert killed == [], f"processes left running under {text} had to be SIGKILLed: {killed}"


def gguf_bytes(architecture: str = "llama") -> bytes:
    """A GGUF header as gguf-py (like llama.cpp) writes it: no tensors, general.architecture and a name. What
    register and download read; test files append their own bytes to it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "header.gguf"
        writer = GGUFWriter(str(path), architecture)
        writer.add_name("rbees test file")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        return path.read_bytes()


@pytest.fixture
def pool_root(tmp_path: Path) -> Iterator[Path]:
    """A fresh pool root; a process still running under it at the end is killed and fails the test."""
    root = tmp_path / "pool"
    yield root
    assert_nothing_left_running(str(root))


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on a free loopback port in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def parse_range(header: str | None, size: int) -> int:
    """Start offset of a `Range: bytes=N-` header (0 when absent)."""
    if not header:
        return 0
    assert header.startswith("bytes=") and header.endswith("-"), header
    start = int(header[len("bytes=") : -1])
    assert 0 <= start < size, header
    return start
