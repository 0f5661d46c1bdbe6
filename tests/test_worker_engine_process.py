"""The worker's engine in a process of its own (engine_process.py), with real processes: the engine's refusals
reach HTTP as before, an engine that dies ends every stream with an error and the worker with it, a worker that
dies takes its engine with it, and the worker's tokenizer is the engine's."""

from __future__ import annotations

import pickle
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from worker_harness import Daemon, execute_body, read_frames, run_daemon

from rbees_workerd.cli_serve import parse_settings
from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.tokenizer import Tokenizer
from rbees_workerd.errors import (
    AllSlotsBusy,
    CudaError,
    FieldInvalid,
    Internal,
    InvalidParams,
    ModelLoadError,
    NotReady,
    RbeesError,
    VramOOM,
)
from rbees_workerd.runtime import WorkerRuntime
from rbees_workerd.settings import SettingsError

LONG = "The capital of France is"  # greedy, it runs to max_tokens=200 (see test_worker_http's busy slots)


@pytest.mark.parametrize(
    "error",
    [
        AllSlotsBusy("all 2 slots are generating"),
        InvalidParams("the prompt encodes to no tokens"),
        FieldInvalid("prompt", "engine", "the prompt encodes to no tokens"),
        NotReady("the model is loading"),
        ModelLoadError("bad magic"),
        VramOOM("the model needs 9 GiB"),
        CudaError("launching a kernel"),
        Internal("a bug"),
        SettingsError("--slots must be between 1 and 256, got 0"),
        RbeesError("the engine has stopped"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_pickle_as_the_same_class_code_and_message(error: RbeesError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and vars(back) == vars(error)
    assert (back.code, back.message, str(back)) == (error.code, error.message, str(error))
    assert back.to_dict() == error.to_dict()


def _engine_pid(daemon: Daemon) -> int:
    """The engine process's id, from the worker's `loaded` log line; it is the worker's child."""
    pid = next(e["engine_pid"] for e in daemon.logs() if "engine_pid" in e)
    assert psutil.Process(pid).ppid() == daemon.proc.pid
    return pid


def _engine_children(pid: int) -> list[psutil.Process]:
    """The worker's engine process while it loads (before its pid is logged)."""
    return [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]


def _error_lines(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.logs() if e["level"] == "ERROR"]


def test_the_engine_s_refusals_keep_their_status_and_code(tmp_path: Path) -> None:
    """ALL_SLOTS_BUSY and a prompt the engine refuses are raised in the engine process, answered here."""
    with (
        run_daemon(tmp_path, "--slots", "1", "--context-length", "256") as daemon,
        httpx.Client(base_url=daemon.url, timeout=60) as client,
    ):
        no_tokens = client.post("/execute", json=execute_body("no-tokens", prompt="\u0006"))
        assert no_tokens.status_code == 400
        assert no_tokens.json() == {
            "errors": [{"field": "prompt", "constraint": "engine", "message": "the prompt encodes to no tokens"}]
        }
        with client.stream("POST", "/execute", json=execute_body("busy-1", prompt=LONG, max_tokens=200)) as r:
            frames = read_frames(r)
            assert next(frames)["type"] == "started"
            busy = client.post("/execute", json=execute_body("busy-2"))
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json() == {
                "code": "ALL_SLOTS_BUSY",
                "message": "all 1 slots are generating",
                "retriable": True,
                "retry_after_ms": 1000,
            }
            assert client.post("/cancel", json={"job_id": "busy-1"}).status_code == 202
            assert list(frames)[-1]["stop_reason"] == "CANCELLED"
        metrics = client.get("/metrics").text
        assert 'rbees_worker_jobs_rejected_total{code="ALL_SLOTS_BUSY"} 1.0' in metrics
        engine_rss = next(line for line in metrics.splitlines() if line.startswith("rbees_engine_process_resident"))
        assert float(engine_rss.split()[1]) > float(
            next(line for line in metrics.splitlines() if line.startswith("rbees_worker_model_bytes")).split()[1]
        )


def test_a_killed_engine_ends_every_stream_with_an_error_and_the_worker_exits(tmp_path: Path) -> None:
    """SIGKILL of the engine process mid-stream: every running job's stream ends with its metrics and an
    INTERNAL error frame at once, the failure is logged, and the worker exits 1 (as on any engine failure)."""
    with (
        run_daemon(tmp_path, "--slots", "2", "--context-length", "256") as daemon,
        httpx.Client(base_url=daemon.url, timeout=30) as a,
        httpx.Client(base_url=daemon.url, timeout=30) as b,
        a.stream("POST", "/execute", json=execute_body("doomed-1", prompt=LONG, max_tokens=200)) as r1,
        b.stream("POST", "/execute", json=execute_body("doomed-2", prompt=LONG, max_tokens=200)) as r2,
    ):
        streams = [read_frames(r1), read_frames(r2)]
        for frames in streams:
            assert [next(frames)["type"], next(frames)["type"]] == ["started", "token"]
        psutil.Process(_engine_pid(daemon)).kill()
        t0 = time.monotonic()
        ends = [list(frames)[-2:] for frames in streams]
        assert time.monotonic() - t0 < 5.0
        for metrics, error in ends:
            assert metrics["type"] == "metrics"
            assert error == {
                "type": "error",
                "code": "INTERNAL",
                "message": "the engine process exited with code -9",
                "retriable": True,
            }
        assert daemon.proc.wait(30) == 1
    errors = _error_lines(daemon)
    assert any(e["code"] == "INTERNAL" and e.get("exit_code") == -9 for e in errors), errors
    assert {e["job_id"] for e in errors if e.get("stop_reason") == "ERROR"} == {"doomed-1", "doomed-2"}


def test_an_engine_that_raises_in_a_step_ends_every_stream_with_its_error_and_the_worker_exits(
    tmp_path: Path,
) -> None:
    """A step that raises in the engine process (CudaError, as a GPU fault would): every running job's stream
    ends with that error's code and message, the engine's traceback is logged, and the worker exits 1."""
    with (
        run_daemon(tmp_path, "--slots", "2", "--context-length", "256", failing_after=12) as daemon,
        httpx.Client(base_url=daemon.url, timeout=30) as a,
        httpx.Client(base_url=daemon.url, timeout=30) as b,
        a.stream("POST", "/execute", json=execute_body("faulted-1", prompt=LONG, max_tokens=200)) as r1,
        b.stream("POST", "/execute", json=execute_body("faulted-2", prompt=LONG, max_tokens=200)) as r2,
    ):
        ends = [list(read_frames(r))[-2:] for r in (r1, r2)]
        for metrics, error in ends:
            assert metrics["type"] == "metrics" and 0 < metrics["tokens_out"] < 200, metrics
            assert error["type"] == "error" and error["code"] == "CUDA_ERROR", error
            assert "illegal memory access" in error["message"]
        assert daemon.proc.wait(30) == 1
    errors = _error_lines(daemon)
    assert any(e["code"] == "CUDA_ERROR" and "illegal memory access" in e.get("exc", "") for e in errors), errors
    assert {e["job_id"] for e in errors if e.get("stop_reason") == "ERROR"} == {"faulted-1", "faulted-2"}


def test_an_engine_killed_while_loading_fails_the_load(tmp_path: Path) -> None:
    with run_daemon(tmp_path, "--slots", "1", "--context-length", "256", wait_ready=False) as daemon:
        deadline = time.monotonic() + 60
        while not (engines := _engine_children(daemon.proc.pid)):
            assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.log_path.read_text()
            time.sleep(0.01)
        engines[0].kill()
        assert daemon.proc.wait(30) == 1
    failed = [e for e in _error_lines(daemon) if e.get("code") == "MODEL_LOAD_FAILED"]
    assert failed and "the engine process exited with code -9 while loading" in failed[0]["human"], daemon.logs()


def test_the_engine_dies_with_a_killed_worker(tmp_path: Path) -> None:
    """The worker SIGKILLed (no chance to stop anything): its engine process, and every other child, exits."""
    with run_daemon(tmp_path, "--slots", "1", "--context-length", "256") as daemon:
        engine = psutil.Process(_engine_pid(daemon))
        children = psutil.Process(daemon.proc.pid).children(recursive=True)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive and not engine.is_running()
        assert time.monotonic() - t0 < 5.0


def test_the_worker_s_tokenizer_is_the_engine_s(model_path: Path, tokenizer: Tokenizer) -> None:
    """The runtime's tokenizer (built from the file's metadata, in the worker) gives the ids the engine's own
    tokenizer gives, and the runtime knows the loaded engine as Engine.load made it; stop() ends the process."""
    argv = ["--worker-id", "w-tok", "--model", str(model_path), "--port", "1"]
    runtime = WorkerRuntime(parse_settings([*argv, "--slots", "2", "--context-length", "128"]))
    failures: list[BaseException] = []
    try:
        runtime.load(failures.append)
        info = runtime.info
        assert info is not None and runtime.tokenizer is not None
        engine_process = psutil.Process(info.pid)
        in_process = Engine.load(model_path, slots=2, context_length=128)
        texts = ["The capital of France is", " leading space", "<|im_start|>user\nhé 🐝<|im_end|>", "a\u0006b", ""]
        for text in texts:
            assert runtime.tokenizer.encode(text) == in_process.tokenizer.encode(text) == tokenizer.encode(text)
        chat = [{"role": "user", "content": "Hi"}]
        assert runtime.tokenizer.apply_chat_template(chat) == in_process.tokenizer.apply_chat_template(chat)
        assert runtime.tokenizer.eos_ids == in_process.tokenizer.eos_ids
        assert (info.backend, info.device, info.slots, info.context_length) == (
            in_process.backend.name,
            in_process.backend.device,
            in_process.slots,
            in_process.context_length,
        )
        assert (info.weight_bytes, info.kv_cache_bytes, info.vram_bytes) == (
            in_process.model.weight_bytes,
            in_process.model.kv_cache_bytes,
            0,
        )
    finally:
        runtime.stop()
    assert not engine_process.is_running() and not failures
