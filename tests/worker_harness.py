"""Shared helpers of the worker daemon tests: run the real `rbees-workerd` as a subprocess, read SSE.

Every daemon started here is stopped (SIGTERM, then SIGKILL) when its context exits, so no test
leaves a process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("RBEES_TEST_MODEL", REPO / "models-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
LOAD_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_command(*args: str) -> list[str]:
    """How operators and rbees-pool start the daemon: the console script, without a subcommand."""
    return [str(Path(sys.executable).parent / "rbees-workerd"), *args]


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba-cache"))
    env.update(extra)
    return env


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def logs(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far (every line must be one JSON object)."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def wait_state(self, state: str, timeout: float = LOAD_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(f"{self.url}/health", timeout=5).json()
                if health["state"] == state:
                    return health
            time.sleep(0.1)
        raise AssertionError(f"daemon did not reach {state}: {self.log_path.read_text()[-2000:]}")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def failing_engine(after_steps: int, settings: Any, on_progress: Any) -> Any:
    """Settings.engine_factory of a real engine whose steps raise CudaError from the step after `after_steps`:
    a GPU fault in the middle of serving, which no CPU run can produce."""
    from rbees_workerd.engine.engine import Engine
    from rbees_workerd.errors import CudaError

    engine = Engine.load(settings.model, slots=settings.slots, context_length=settings.context_length,
                         on_progress=on_progress)  # fmt: skip
    step, done = engine.step, [0]

    def failing_step() -> Any:
        done[0] += 1
        if done[0] > after_steps:
            raise CudaError("CUDA failed while running a step: an illegal memory access was encountered")
        return step()

    engine.step = failing_step
    return engine


# `python -c` this with the daemon's arguments: rbees-workerd whose engine process loads failing_engine
_FAILING_MAIN = """import sys
from dataclasses import replace
from functools import partial
from rbees_workerd.cli_serve import parse_settings
from rbees_workerd.server import run
from worker_harness import failing_engine
sys.exit(run(replace(parse_settings(sys.argv[2:]), engine_factory=partial(failing_engine, int(sys.argv[1])))))
"""


@contextlib.contextmanager
def run_daemon(
    tmp: Path, *args: str, wait_ready: bool = True, failing_after: int | None = None, **env: str
) -> Iterator[Daemon]:
    """Start `rbees-workerd` on a free port with the test model (with `failing_after`: its engine is
    failing_engine's); always stopped on exit."""
    port = free_port()
    log_path = tmp / f"worker-{port}.log"
    cmd = daemon_command("--worker-id", "w-test", "--model", str(MODEL), "--port", str(port), *args)
    if failing_after is not None:
        cmd = [sys.executable, "-c", _FAILING_MAIN, str(failing_after), *cmd[1:]]
        env.setdefault("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=daemon_env(**env), cwd=REPO)
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        if wait_ready:
            daemon.wait_state("Ready")
        yield daemon
    finally:
        daemon.terminate()


def execute_body(job_id: str, prompt: str = "The capital of France is", **fields: Any) -> dict[str, Any]:
    return {"job_id": job_id, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, **fields}


def read_frames(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The `data: {json}` frames of an SSE response, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])
        else:
            assert line == "", f"unexpected SSE line {line!r}"


def stream_job(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run one job to its end; returns every frame."""
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{url}/execute", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(read_frames(r))


class CallbackServer:
    """A real HTTP server on loopback that answers the ready callback with scripted status codes."""

    def __init__(self, statuses: list[int], port: int = 0) -> None:
        self.statuses = list(statuses)
        self.received: list[dict[str, Any]] = []
        self.got = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.received.append(json.loads(body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
                if status < 300:
                    outer.got.set()

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v2/workers/ready"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> CallbackServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()
