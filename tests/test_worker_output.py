"""The serving side of a step (output.py) with the real model's tokenizer, the error tree, and the one
WorkerState enum as /health, /ready and /metrics report it (a real app on an unloaded runtime)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from rbees_workerd.cli_serve import parse_settings
from rbees_workerd.engine.tokenizer import Tokenizer
from rbees_workerd.engine.types import FinishEvent, StopReason
from rbees_workerd.errors import (
    AllSlotsBusy,
    AuthFailed,
    Draining,
    FieldInvalid,
    InvalidParams,
    JobNotFound,
    ModelLoadError,
    NotReady,
    RbeesError,
    Unavailable,
    lookup,
)
from rbees_workerd.output import TextStream, frame, token_frame
from rbees_workerd.runtime import Job, WorkerRuntime
from rbees_workerd.scheduler import JobOutput, StepOutput
from rbees_workerd.schemas import Health, WorkerState
from rbees_workerd.server import create_app


@pytest.fixture
def runtime(model_path: Path) -> WorkerRuntime:
    return WorkerRuntime(parse_settings(["--worker-id", "w-out", "--model", str(model_path), "--port", "1"]))


def _job(runtime: WorkerRuntime, tokenizer: Tokenizer, job_id: str, stop: tuple[str, ...] = ()) -> Job:
    job = Job(job_id, TextStream(tokenizer.stream_decoder(continuation=True), stop))
    job.admitted_at = job.accepted_at
    runtime.jobs[job_id] = job
    return job


def _finish(job_id: str, reason: StopReason) -> FinishEvent:
    return FinishEvent(job_id, reason, tokens_out=0, prompt_tokens=0, prefill_time_ms=0.0, decode_time_ms=0.0)


def _run(runtime: WorkerRuntime, steps: list[list[JobOutput]]) -> None:
    for outputs in steps:
        runtime.output.process(StepOutput(time.perf_counter(), outputs))


def _frames(job: Job) -> list[dict[str, Any]]:
    async def drain() -> bytes:
        return b"".join([chunk async for chunk in job.chunks()])

    raw = asyncio.run(drain()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") and "\n" not in e for e in events[:-1]), raw
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def _sample(runtime: WorkerRuntime, name: str, **labels: str) -> float | None:
    return runtime.metrics.registry.get_sample_value(name, labels)


def _text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["t"] for f in frames if f["type"] == "token")


def test_token_frames_are_the_frames_json_would_give() -> None:
    for text in ("", "plain", ' "quoted" \\ back', "é€🦀", "\n\t\u2028", "\x00"):
        assert token_frame(text, 7) == frame({"type": "token", "t": text, "i": 7})
        assert json.loads(token_frame(text, 7)[len(b"data: ") :]) == {"type": "token", "t": text, "i": 7}


def test_a_stop_string_across_token_boundaries_ends_the_job_in_the_step_that_completes_it(
    runtime: WorkerRuntime, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(" Hello world, this is the end of it", add_special=False)
    assert len(ids) >= 6
    pieces = [tokenizer.decode([i]) for i in ids]
    stop = pieces[2][-1] + pieces[3][:2]  # spans tokens 2 and 3
    full = "".join(pieces)
    assert full.find(stop) == len("".join(pieces[:3])) - 1
    job = _job(runtime, tokenizer, "stop-span", (stop,))
    _run(runtime, [[JobOutput("stop-span", [i])] for i in ids])  # the engine's steps after the stop go unheard
    frames = _frames(job)
    assert [f["i"] for f in frames if f["type"] == "token"] == [0, 1, 2, 3]
    assert _text(frames) == full[: full.index(stop)]
    assert frames[-1] == {
        "type": "end",
        "tokens_out": 4,
        "decode_time_ms": frames[-1]["decode_time_ms"],
        "stop_reason": "STOP_SEQUENCE",
        "stop_sequence_matched": stop,
    }
    assert job.ended and "stop-span" in runtime.jobs  # the slot is the engine's until it reports the end
    _run(runtime, [[JobOutput("stop-span", [ids[-1]], _finish("stop-span", "CANCELLED"))]])
    assert "stop-span" not in runtime.jobs
    # the engine's cancel is the stop's doing, not a cancellation
    assert _sample(runtime, "rbees_worker_jobs_cancelled_total") == 0
    assert _sample(runtime, "rbees_worker_jobs_completed_total", stop_reason="STOP_SEQUENCE") == 1


def test_text_held_back_at_eos_goes_into_the_last_tokens_own_frame(
    runtime: WorkerRuntime, tokenizer: Tokenizer
) -> None:
    """EOS comes a step after the last token: its held text (a possible stop string start) is flushed into the
    frame that was kept back for it, not into a second frame with the same index."""
    ids = tokenizer.encode(" one two three", add_special=False)
    full = tokenizer.decode(ids)
    job = _job(runtime, tokenizer, "eos-held", (full[-1] + "\u2603",))
    _run(
        runtime, [[JobOutput("eos-held", [i])] for i in ids] + [[JobOutput("eos-held", [], _finish("eos-held", "EOS"))]]
    )
    frames = _frames(job)
    assert [f["i"] for f in frames if f["type"] == "token"] == list(range(len(ids)))
    assert _text(frames) == full
    assert frames[-1]["stop_reason"] == "EOS" and frames[-1]["tokens_out"] == len(ids)


def test_a_character_split_across_tokens_is_never_split_in_frames(runtime: WorkerRuntime, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a🦀b🦀", add_special=False)
    assert len(ids) > 4, "the crab is several byte tokens"
    job = _job(runtime, tokenizer, "utf8")
    _run(runtime, [[JobOutput("utf8", [i])] for i in ids[:-1]] + [[JobOutput("utf8", [], _finish("utf8", "EOS"))]])
    frames = _frames(job)
    tokens = [f for f in frames if f["type"] == "token"]
    assert [f["i"] for f in tokens] == list(range(len(ids) - 1))
    assert all("\ufffd" not in f["t"] for f in tokens[:-1])
    assert _text(frames) == "a🦀b\ufffd"  # the last crab cut short: its bytes end as one replacement character


def test_one_pass_per_step_for_every_job(runtime: WorkerRuntime, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" alpha beta gamma", add_special=False)
    jobs = [_job(runtime, tokenizer, f"j{n}") for n in range(3)]
    steps = [[JobOutput(j.job_id, [i]) for j in jobs] for i in ids]
    steps[-1] = [JobOutput(j.job_id, [ids[-1]], _finish(j.job_id, "MAX_TOKENS")) for j in jobs]
    _run(runtime, steps)
    for job in jobs:
        frames = _frames(job)
        assert [f["i"] for f in frames if f["type"] == "token"] == list(range(len(ids)))
        assert _text(frames) == tokenizer.decode(ids)
        assert [f["type"] for f in frames][-2:] == ["metrics", "end"]
    assert runtime.jobs == {}
    assert _sample(runtime, "rbees_worker_tokens_generated_total") == 3 * len(ids)


# ---- the error tree
def test_errors_carry_status_and_code_found_along_the_mro() -> None:
    class Overloaded(Unavailable):  # sets nothing: all of it comes from Unavailable
        pass

    for cls, status, code in [
        (AllSlotsBusy, 503, "ALL_SLOTS_BUSY"),
        (NotReady, 503, "WORKER_NOT_READY"),
        (Draining, 503, "WORKER_DRAINING"),
        (Overloaded, 503, "UNAVAILABLE"),
        (FieldInvalid, 400, "INVALID_PARAMS"),
        (InvalidParams, 400, "INVALID_PARAMS"),
        (AuthFailed, 401, "AUTH_FAILED"),
        (JobNotFound, 404, "JOB_NOT_FOUND"),
        (ModelLoadError, 500, "MODEL_LOAD_FAILED"),
        (RbeesError, 500, "INTERNAL"),
    ]:
        assert (lookup(cls, "status"), lookup(cls, "code")) == (status, code), cls
        assert lookup(cls, "retriable") is issubclass(cls, Unavailable), cls
        assert (lookup(cls, "retry_after_s") is not None) is issubclass(cls, Unavailable), cls
    assert issubclass(AllSlotsBusy, Unavailable) and issubclass(NotReady, Unavailable)
    assert issubclass(Draining, Unavailable)
    error = Overloaded("later")
    assert error.to_dict() == {"code": "UNAVAILABLE", "message": "later", "retriable": True, "retry_after_ms": 1000}


def test_503s_are_retriable_with_retry_after(runtime: WorkerRuntime) -> None:
    body = {"job_id": "j", "prompt": "hi", "max_tokens": 2}
    with TestClient(create_app(runtime)) as client:
        r = client.post("/execute", json=body)
        assert (r.status_code, r.headers["retry-after"]) == (503, "2")
        assert r.json() == {"code": "WORKER_NOT_READY", "message": r.json()["message"], "retriable": True,
                            "retry_after_ms": 2000}  # fmt: skip
        asyncio.run(runtime.drain(1.0))
        r = client.post("/execute", json=body)
        assert (r.status_code, r.headers["retry-after"]) == (503, "5")
        assert r.json()["code"] == "WORKER_DRAINING" and r.json()["retriable"] is True
        assert r.json()["retry_after_ms"] == 5000
        r = client.post("/cancel", json={"job_id": "j"})
        assert r.status_code == 404 and "retry-after" not in r.headers and r.json()["retriable"] is False


# ---- the one WorkerState
def _states(client: TestClient) -> dict[str, float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    family = next(f for f in families if f.name == "rbees_worker_state")
    return {s.labels["state"]: s.value for s in family.samples}


def test_the_worker_state_enum_is_what_health_ready_and_metrics_report(runtime: WorkerRuntime) -> None:
    assert [s.value for s in WorkerState] == ["Starting", "Loading", "Ready", "Executing", "Draining", "Stopped"]
    assert Health.model_json_schema()["$defs"]["WorkerState"]["enum"] == [s.value for s in WorkerState]
    with TestClient(create_app(runtime)) as client:
        for state, status in ((WorkerState.STARTING, "loading"), (WorkerState.DRAINING, "draining")):
            if state is WorkerState.DRAINING:
                asyncio.run(runtime.drain(1.0))
            assert runtime.state is state
            health = client.get("/health").json()
            assert (health["state"], health["status"]) == (state.value, status)
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["state"] == state.value
            assert _states(client) == {s.value: float(s is state) for s in WorkerState}
