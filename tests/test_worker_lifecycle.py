"""Daemon lifecycle with real processes: ready callback, bearer auth, SIGTERM drain, startup failures."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from worker_harness import (
    MODEL,
    CallbackServer,
    Daemon,
    daemon_command,
    daemon_env,
    execute_body,
    free_port,
    read_frames,
    run_daemon,
)

TOKEN = "s3cret-token-for-tests"


def test_auth_callback_and_sigterm_drain(tmp_path: Path) -> None:
    """One daemon: the callback retried past two 503s, auth on every route but /health and /metrics,
    then SIGTERM while a job streams: new jobs get 503, the running one finishes, exit 0."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with (
        CallbackServer([503, 503]) as callback,
        run_daemon(
            tmp_path,
            "--api-token-file",
            str(token_file),
            "--callback-url",
            callback.url,
            "--model-ref",
            "smollm2-135m",
            "--slots",
            "1",
            "--context-length",
            "128",
            "--drain-timeout",
            "120",
        ) as daemon,
    ):
        assert callback.got.wait(60), daemon.log_path.read_text()
        health = httpx.get(f"{daemon.url}/health").json()
        assert len(callback.received) == 3
        assert callback.received[-1] == {
            "worker_id": "w-test",
            "url": daemon.url,
            "model_ref": "smollm2-135m",
            "backend": "cpu",
            "device": health["device"],
            "vram_bytes": 0,
            "slots_total": 1,
        }
        assert health["model"] == "smollm2-135m"

        auth = {"Authorization": f"Bearer {TOKEN}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            r = httpx.post(f"{daemon.url}/execute", json=execute_body("a1"), headers=headers)
            assert r.status_code == 401
            assert r.json() == {
                "code": "AUTH_FAILED",
                "message": "missing or wrong bearer token",
                "retriable": False,
            }
            assert httpx.get(f"{daemon.url}/ready", headers=headers).status_code == 401
            assert httpx.post(f"{daemon.url}/cancel", json={"job_id": "x"}, headers=headers).status_code == 401
            assert httpx.get(f"{daemon.url}/openapi.json", headers=headers).status_code == 401
        assert httpx.get(f"{daemon.url}/metrics").status_code == 200
        assert httpx.get(f"{daemon.url}/ready", headers=auth).status_code == 200
        spec = httpx.get(f"{daemon.url}/openapi.json", headers=auth).json()
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert spec["paths"]["/execute"]["post"]["security"] == [{"HTTPBearer": []}]

        frames: list[dict[str, Any]] = []
        first_token = threading.Event()

        def run_job() -> None:
            with (
                httpx.Client(timeout=120) as c,
                c.stream(
                    "POST", f"{daemon.url}/execute", headers=auth, json=execute_body("drained", max_tokens=40)
                ) as r,
            ):
                for f in read_frames(r):
                    frames.append(f)
                    first_token.set()

        thread = threading.Thread(target=run_job)
        thread.start()
        try:
            assert first_token.wait(120)
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.wait_state("Draining", timeout=60)
            refused = httpx.post(f"{daemon.url}/execute", json=execute_body("late"), headers=auth)
            assert refused.status_code == 503 and refused.json()["code"] == "WORKER_DRAINING"
            assert refused.headers["retry-after"]
            assert daemon.proc.wait(120) == 0
        finally:
            thread.join(120)
        assert frames[-1]["type"] == "end"
        assert frames[-1]["stop_reason"] in ("MAX_TOKENS", "EOS")
        assert frames[-1]["tokens_out"] == 40 or frames[-1]["stop_reason"] == "EOS"
        assert TOKEN not in daemon.log_path.read_text()


def test_answers_while_loading_then_exits_non_zero_when_the_callback_is_refused(tmp_path: Path) -> None:
    """The socket listens before the model loads (reading it and compiling the kernels takes seconds):
    /health answers at once, /execute is refused as not ready. Then a 4xx callback ends the daemon."""
    with (
        CallbackServer([404]) as callback,
        run_daemon(
            tmp_path,
            "--callback-url",
            callback.url,
            "--slots",
            "1",
            "--context-length",
            "64",
            wait_ready=False,
        ) as daemon,
    ):
        health = _first_health(daemon)
        assert health["state"] in ("Starting", "Loading") and health["status"] == "loading"
        assert health["slots_free"] == 0 and health["device"] is None
        refused = httpx.post(f"{daemon.url}/execute", json=execute_body("early"))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["code"] == "WORKER_NOT_READY" and refused.json()["retriable"] is True
        ready = httpx.get(f"{daemon.url}/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert 0.0 <= ready.json()["load_progress"] <= 1.0
        assert daemon.proc.wait(240) == 1
    assert len(callback.received) == 1
    refused = [e for e in daemon.logs() if "refused with HTTP 404" in e["human"]]
    assert refused and refused[0]["level"] == "ERROR"


def test_drain_timeout_cancels_jobs_still_running(tmp_path: Path) -> None:
    with run_daemon(tmp_path, "--slots", "1", "--context-length", "128", "--drain-timeout", "0") as daemon:
        with (
            httpx.Client(timeout=120) as c,
            c.stream("POST", f"{daemon.url}/execute", json=execute_body("too-long", max_tokens=120)) as r,
        ):
            frames = read_frames(r)
            assert next(frames)["type"] == "started"
            assert next(frames)["type"] == "token"
            daemon.proc.send_signal(signal.SIGTERM)
            end = list(frames)[-1]
        assert end["type"] == "end" and end["stop_reason"] == "CANCELLED"
        assert daemon.proc.wait(60) == 0


def _first_health(daemon: Daemon) -> dict[str, Any]:
    for _ in range(1200):
        try:
            return httpx.get(f"{daemon.url}/health", timeout=5).json()
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("the daemon never answered /health")


def test_corrupt_model_exits_non_zero_with_model_load_failed(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    port = free_port()
    done = subprocess.run(
        daemon_command("--worker-id", "w-bad", "--model", str(bad), "--port", str(port)),
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=120,
    )
    assert done.returncode == 1
    assert "MODEL_LOAD_FAILED" in done.stderr


MODEL_ARGS = ["--worker-id", "w1", "--model", str(MODEL)]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--port", "8000"], "--worker-id is required"),
        ([*MODEL_ARGS, "--port", "8000", "--api-token-file", "/nonexistent/token"], "cannot read API token file"),
        ([*MODEL_ARGS, "--port", "8000", "--bogus"], "No such option: --bogus"),
        (["serve", "--port", "8000"], "--worker-id is required"),
    ],
    ids=["no worker id", "token file missing", "unknown option", "serve subcommand"],
)
def test_invalid_configuration_exits_at_once_with_one_line(args: list[str], expected: str) -> None:
    done = subprocess.run(daemon_command(*args), capture_output=True, text=True, env=daemon_env(), timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: INVALID_ARGUMENT: ") and expected in lines[0], done.stderr


def test_port_in_use_exits_non_zero_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            daemon_command("--worker-id", "w1", "--model", str(MODEL), "--port", str(port)),
            capture_output=True,
            text=True,
            env=daemon_env(),
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: PORT_UNAVAILABLE: cannot listen")
