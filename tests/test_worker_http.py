"""The worker's HTTP API, against one real daemon (subprocess, real SmolLM2 model) for the module."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from worker_harness import Daemon, execute_body, free_port, read_frames, run_daemon, stream_job

from rbees_workerd.cli_serve import parse_settings
from rbees_workerd.engine.config import ModelConfig
from rbees_workerd.engine.gguf import load_gguf
from rbees_workerd.engine.model import kv_cache_bytes
from rbees_workerd.engine.tokenizer import Tokenizer
from rbees_workerd.logs import JsonFormatter
from rbees_workerd.runtime import WorkerRuntime
from rbees_workerd.server import create_app

SLOTS = 2
CONTEXT = 256
SECRET_PROMPT = "zebra-quartz-SECRET-PROMPT"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("worker")
    with run_daemon(tmp, "--slots", str(SLOTS), "--context-length", str(CONTEXT)) as daemon:
        yield daemon


@pytest.fixture
def client(worker: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker.url, timeout=120) as c:
        yield c


def _text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["t"] for f in frames if f["type"] == "token")


def _metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or labels.items() <= sample.labels.items()):
                return sample.value
    raise AssertionError(f"metric {name} not found")


def _wait_slots_free(client: httpx.Client, expected: int) -> None:
    """Slots free again once the scheduler has processed the cancel (bounded, not a timing check)."""
    for _ in range(600):
        if client.get("/health").json()["slots_free"] == expected:
            return
        time.sleep(0.05)
    raise AssertionError(f"slots_free never came back to {expected}")


def test_health_and_ready_describe_the_loaded_model(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "state": "Ready",
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "backend": "cpu",
        "device": health["device"],
        "vram_bytes": 0,
        "slots_total": SLOTS,
        "slots_free": SLOTS,
    }
    assert isinstance(health["device"], str) and health["device"]
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "state": "Ready",
        "load_progress": 1.0,
        "phase": None,
        "model": "SmolLM2-135M-Instruct.Q4_1",
    }


def test_execute_streams_started_tokens_metrics_end(worker: Daemon) -> None:
    frames = stream_job(worker.url, execute_body("job-stream", max_tokens=6))
    started, *tokens, metrics, end = frames
    assert started["type"] == "started" and started["job_id"] == "job-stream"
    assert started["model"] == "SmolLM2-135M-Instruct.Q4_1" and started["prompt_tokens"] > 0
    assert re.match(r"\d{4}-\d\d-\d\dT", started["started_at"])
    assert tokens and all(f["type"] == "token" for f in tokens)
    assert [f["i"] for f in tokens] == sorted(f["i"] for f in tokens) and tokens[0]["i"] == 0
    assert metrics["type"] == "metrics" and metrics["tokens_out"] == end["tokens_out"]
    assert end["type"] == "end" and end["stop_reason"] in ("MAX_TOKENS", "EOS")
    assert end["tokens_out"] == 6 or end["stop_reason"] == "EOS"
    assert end["decode_time_ms"] >= 0 and "stop_sequence_matched" not in end
    assert _text(frames).strip()


def test_greedy_generation_is_deterministic_and_seed_reproduces(worker: Daemon) -> None:
    first = _text(stream_job(worker.url, execute_body("det-1")))
    assert _text(stream_job(worker.url, execute_body("det-2"))) == first
    sampled = execute_body("seed-1", temperature=0.9, top_k=40, top_p=0.95, seed=1234, max_tokens=10)
    again = {**sampled, "job_id": "seed-2"}
    assert _text(stream_job(worker.url, sampled)) == _text(stream_job(worker.url, again))


def test_stop_sequence_ends_the_stream_before_the_match(worker: Daemon) -> None:
    full = _text(stream_job(worker.url, execute_body("stop-ref", max_tokens=12)))
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    frames = stream_job(worker.url, execute_body("stop-1", max_tokens=12, stop=[stop]))
    end = frames[-1]
    assert end["stop_reason"] == "STOP_SEQUENCE" and end["stop_sequence_matched"] == stop
    assert _text(frames) == full[: full.index(stop)]


def _boundary_stop(tokens: list[dict[str, Any]]) -> tuple[str, int]:
    """A stop string that spans the boundary between two tokens of `tokens` (the last character of one, the
    first ones of the next) and occurs nowhere before; and the index of the token that completes it."""
    full = "".join(f["t"] for f in tokens)
    prefix = ""
    for k in range(len(tokens) - 1):
        prefix += tokens[k]["t"]
        after = tokens[k + 1]["t"]
        if prefix and after:
            stop = prefix[-1] + after[:2]
            if full.find(stop) == len(prefix) - 1:
                return stop, k + 1
    raise AssertionError(f"no token boundary to stop at in {tokens!r}")


def test_a_stop_string_across_token_boundaries_stops_and_frees_the_slot(worker: Daemon, client: httpx.Client) -> None:
    """The stop string is matched on the serving side, after the step that sampled its last token: the stream
    ends at once without the matched text; the engine ends the sequence one step later (the slot frees then),
    and that is not counted as a cancellation."""
    reference = stream_job(worker.url, execute_body("stop-span-ref", max_tokens=16))
    tokens = [f for f in reference if f["type"] == "token"]
    full = _text(reference)
    stop, completing = _boundary_stop(tokens)
    cancelled = _metric(worker.url, "rbees_worker_jobs_cancelled_total")
    frames = stream_job(worker.url, execute_body("stop-span", max_tokens=16, stop=["never-there", stop]))
    *_, metrics, end = frames
    assert end == {
        "type": "end",
        "tokens_out": completing + 1,
        "decode_time_ms": end["decode_time_ms"],
        "stop_reason": "STOP_SEQUENCE",
        "stop_sequence_matched": stop,
    }
    assert metrics["tokens_out"] == completing + 1
    assert _text(frames) == full[: full.index(stop)]
    assert [f["i"] for f in frames if f["type"] == "token"] == list(range(completing + 1))
    _wait_slots_free(client, SLOTS)
    assert _metric(worker.url, "rbees_worker_jobs_cancelled_total") == cancelled
    assert _metric(worker.url, "rbees_worker_jobs_completed_total", {"stop_reason": "STOP_SEQUENCE"}) >= 1


def test_one_token_event_per_token_and_the_flushed_tail_in_the_last_one(worker: Daemon) -> None:
    """A stop string that could begin at the last token's end holds that text back; at MAX_TOKENS it is
    flushed into the last token's own frame: one event per token, indices 0..n-1, none repeated, no text lost."""
    reference = stream_job(worker.url, execute_body("tail-ref", max_tokens=6))
    full = _text(reference)
    last = [f["t"] for f in reference if f["type"] == "token" and f["t"]][-1]
    stop = last[-1] + "\u2603never"  # its first character ends the text; the rest never comes
    frames = stream_job(worker.url, execute_body("tail", max_tokens=6, stop=[stop]))
    indices = [f["i"] for f in frames if f["type"] == "token"]
    assert frames[-1]["stop_reason"] == "MAX_TOKENS" and frames[-1]["tokens_out"] == 6
    assert indices == list(range(6))
    assert _text(frames) == full
    assert [f["type"] for f in frames] == ["started", *["token"] * 6, "metrics", "end"]


INVALID_BODIES: list[tuple[str, str, str]] = [
    ("malformed json", '{"job_id": "x", "prompt": ', "body"),
    ("not an object", "[1, 2]", "body"),
    ("missing max_tokens", json.dumps({"job_id": "x", "prompt": SECRET_PROMPT}), "max_tokens"),
    ("max_tokens as string", json.dumps(execute_body("x", SECRET_PROMPT, max_tokens="5")), "max_tokens"),
    ("max_tokens zero", json.dumps(execute_body("x", SECRET_PROMPT, max_tokens=0)), "max_tokens"),
    ("max_tokens over 2048", json.dumps(execute_body("x", SECRET_PROMPT, max_tokens=4096)), "max_tokens"),
    (
        "max_tokens over context",
        json.dumps(execute_body("x", SECRET_PROMPT, max_tokens=CONTEXT + 1)),
        "max_tokens",
    ),
    (
        "temperature NaN",
        json.dumps(execute_body("x", SECRET_PROMPT, temperature=float("nan"))),
        "temperature",
    ),
    ("temperature too high", json.dumps(execute_body("x", SECRET_PROMPT, temperature=2.5)), "temperature"),
    ("temperature bool", json.dumps(execute_body("x", SECRET_PROMPT, temperature=True)), "temperature"),
    ("top_p above 1", json.dumps(execute_body("x", SECRET_PROMPT, top_p=1.5)), "top_p"),
    ("min_p negative", json.dumps(execute_body("x", SECRET_PROMPT, min_p=-0.1)), "min_p"),
    ("top_k negative", json.dumps(execute_body("x", SECRET_PROMPT, top_k=-1)), "top_k"),
    ("seed negative", json.dumps(execute_body("x", SECRET_PROMPT, seed=-3)), "seed"),
    ("seed over 2**53", json.dumps(execute_body("x", SECRET_PROMPT, seed=2**53 + 1)), "seed"),
    ("empty prompt", json.dumps(execute_body("x", "")), "prompt"),
    ("prompt of no tokens", json.dumps(execute_body("x", "\u0006\u0006")), "prompt"),  # bytes SmolLM2 lacks
    ("prompt over 32768 chars", json.dumps(execute_body("x", SECRET_PROMPT * 1500)), "prompt"),
    ("prompt over the context", json.dumps(execute_body("x", SECRET_PROMPT + " word" * 400)), "prompt"),
    ("five stop strings", json.dumps(execute_body("x", SECRET_PROMPT, stop=list("abcde"))), "stop"),
    ("stop string over 100 bytes", json.dumps(execute_body("x", SECRET_PROMPT, stop=["é" * 51])), "stop.0"),
    ("stop not a list", json.dumps(execute_body("x", SECRET_PROMPT, stop="\n")), "stop"),
    ("bad job id", json.dumps(execute_body("a b/c", SECRET_PROMPT)), "job_id"),
    ("neither prompt nor messages", json.dumps({"job_id": "x", "max_tokens": 4}), "body"),
    (
        "both prompt and messages",
        json.dumps(execute_body("x", SECRET_PROMPT, messages=[{"role": "user", "content": SECRET_PROMPT}])),
        "body",
    ),
    ("null prompt", json.dumps({"job_id": "x", "prompt": None, "max_tokens": 4}), "prompt"),
    ("empty messages", json.dumps({"job_id": "x", "messages": [], "max_tokens": 4}), "messages"),
    (
        "unknown message role",
        json.dumps({"job_id": "x", "messages": [{"role": "robot", "content": SECRET_PROMPT}], "max_tokens": 4}),
        "messages.0.role",
    ),
    (
        "messages over the context",
        json.dumps({"job_id": "x", "messages": [{"role": "user", "content": SECRET_PROMPT + " word" * 400}],
                    "max_tokens": 4}),
        "prompt",
    ),
]


@pytest.mark.parametrize(
    ("raw", "field"), [(b, f) for _, b, f in INVALID_BODIES], ids=[n for n, _, _ in INVALID_BODIES]
)
def test_invalid_execute_is_400_with_field_errors_and_no_echo(client: httpx.Client, raw: str, field: str) -> None:
    r = client.post("/execute", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    errors = r.json()["errors"]
    assert field in [e["field"] for e in errors]
    assert all(set(e) == {"field", "constraint", "message"} and e["message"] for e in errors)
    assert SECRET_PROMPT not in r.text


def test_chat_messages_are_rendered_with_the_model_chat_template(worker: Daemon, tokenizer: Tokenizer) -> None:
    """`messages` generate exactly what their rendering by the model's template generates as a raw prompt."""
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    body = {"job_id": "chat-1", "messages": messages, "max_tokens": 8, "temperature": 0.0}
    chat = stream_job(worker.url, body)
    rendered = tokenizer.apply_chat_template(messages)
    assert "<|im_start|>assistant" in rendered  # SmolLM2's template, with the generation prompt
    raw = stream_job(worker.url, execute_body("chat-raw", rendered))
    assert chat[0]["prompt_tokens"] == raw[0]["prompt_tokens"] == len(tokenizer.encode(rendered))
    assert _text(chat) == _text(raw) and _text(chat).strip()


def test_cancel_ends_the_stream_with_cancelled(client: httpx.Client) -> None:
    with client.stream("POST", "/execute", json=execute_body("job-cancel", max_tokens=200)) as r:
        frames = read_frames(r)
        assert next(frames)["type"] == "started"
        assert next(frames)["type"] == "token"
        accepted = client.post("/cancel", json={"job_id": "job-cancel"})
        assert accepted.status_code == 202 and accepted.json() == {
            "job_id": "job-cancel",
            "status": "cancelling",
        }
        rest = list(frames)
    end = rest[-1]
    assert end["type"] == "end" and end["stop_reason"] == "CANCELLED" and end["tokens_out"] < 200
    assert client.post("/cancel", json={"job_id": "job-cancel"}).status_code == 404


def test_cancel_unknown_job_is_404(client: httpx.Client) -> None:
    r = client.post("/cancel", json={"job_id": "no-such-job"})
    assert r.status_code == 404
    assert r.json() == {
        "code": "JOB_NOT_FOUND",
        "message": "no active job with id no-such-job",
        "retriable": False,
    }


def test_all_slots_busy_is_503_with_retry_after_and_duplicate_id_is_400(worker: Daemon, client: httpx.Client) -> None:
    with (
        httpx.Client(base_url=worker.url, timeout=120) as a,
        httpx.Client(base_url=worker.url, timeout=120) as b,
        a.stream("POST", "/execute", json=execute_body("busy-1", max_tokens=200)) as r1,
        b.stream("POST", "/execute", json=execute_body("busy-2", max_tokens=200)) as r2,
    ):
        assert r1.status_code == 200 and r2.status_code == 200
        health = client.get("/health").json()
        assert health["slots_free"] == 0 and health["state"] == "Executing"
        duplicate = client.post("/execute", json=execute_body("busy-1"))
        assert duplicate.status_code == 400 and duplicate.json()["errors"][0]["field"] == "job_id"
        busy = client.post("/execute", json=execute_body("busy-3"))
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        assert busy.json() == {
            "code": "ALL_SLOTS_BUSY",
            "message": busy.json()["message"],
            "retriable": True,
            "retry_after_ms": 1000,
        }
        for job in ("busy-1", "busy-2"):
            assert client.post("/cancel", json={"job_id": job}).status_code == 202
        assert list(read_frames(r1))[-1]["stop_reason"] == "CANCELLED"
        assert list(read_frames(r2))[-1]["stop_reason"] == "CANCELLED"
    _wait_slots_free(client, SLOTS)


def test_client_disconnect_frees_the_slot(worker: Daemon, client: httpx.Client) -> None:
    cancelled = _metric(worker.url, "rbees_worker_jobs_cancelled_total")
    with (
        httpx.Client(base_url=worker.url, timeout=120) as gone,
        gone.stream("POST", "/execute", json=execute_body("job-gone", max_tokens=200)) as r,
    ):
        frames = read_frames(r)
        assert next(frames)["type"] == "started"
        assert next(frames)["type"] == "token"
    _wait_slots_free(client, SLOTS)
    assert _metric(worker.url, "rbees_worker_jobs_cancelled_total") == cancelled + 1
    assert client.post("/cancel", json={"job_id": "job-gone"}).status_code == 404


def test_client_gone_before_the_first_frame_frees_the_slot(worker: Daemon, client: httpx.Client) -> None:
    """A client that sends its request and hangs up at once, before reading anything."""
    cancelled = _metric(worker.url, "rbees_worker_jobs_cancelled_total")
    body = json.dumps(execute_body("job-hung-up", max_tokens=200)).encode()
    host, port = worker.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        s.shutdown(socket.SHUT_RDWR)
    for _ in range(600):  # bounded: the cancelled job ends within a step, a finished one never counts
        if _metric(worker.url, "rbees_worker_jobs_cancelled_total") == cancelled + 1:
            break
        time.sleep(0.05)
    assert _metric(worker.url, "rbees_worker_jobs_cancelled_total") == cancelled + 1
    _wait_slots_free(client, SLOTS)


def test_a_request_joins_a_running_generation(worker: Daemon) -> None:
    """Continuous batching: a short job started mid-generation ends while the long one still streams."""
    long_frames: list[dict[str, Any]] = []
    first_token = threading.Event()

    def run_long() -> None:
        with (
            httpx.Client(timeout=120) as c,
            c.stream("POST", f"{worker.url}/execute", json=execute_body("long", max_tokens=80)) as r,
        ):
            for f in read_frames(r):
                long_frames.append(f)
                if f["type"] == "token":
                    first_token.set()

    thread = threading.Thread(target=run_long)
    thread.start()
    try:
        assert first_token.wait(120)
        short = stream_job(worker.url, execute_body("short", max_tokens=3))
        long_done_when_short_ended = any(f["type"] == "end" for f in long_frames)
    finally:
        thread.join(180)
    assert short[-1]["type"] == "end"
    assert not long_done_when_short_ended
    assert long_frames[-1]["type"] == "end" and long_frames[-1]["tokens_out"] in range(4, 81)


def test_the_stream_s_headers(worker: Daemon) -> None:
    """The stream's start goes through the middlewares (its correlation id) and its body straight to the server
    (stream.py): the headers are a StreamingResponse's, and the body is chunked and complete."""
    body = execute_body("job-headers", max_tokens=3)
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{worker.url}/execute", json=body, headers={"X-Correlation-Id": "corr-sse"}) as r,
    ):
        frames = list(read_frames(r))
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    assert r.headers["x-correlation-id"] == "corr-sse" and r.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.headers
    assert [f["type"] for f in frames] == ["started", "token", "token", "token", "metrics", "end"]


def test_the_fast_path_and_the_fastapi_route_stream_alike(worker: Daemon) -> None:
    """A body of type application/json takes server.ExecuteFastPath; one of another JSON type (which FastAPI
    reads as JSON too) takes the FastAPI route: the same greedy request streams the same frames either way."""

    def run(job_id: str, headers: dict[str, str]) -> list[dict[str, Any]]:
        raw = json.dumps(execute_body(job_id, max_tokens=5)).encode()
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", f"{worker.url}/execute", content=raw, headers=headers) as r,
        ):
            assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert r.headers["x-correlation-id"] == job_id
            return list(read_frames(r))

    fast = run("path-fast", {"Content-Type": "application/json", "X-Correlation-Id": "path-fast"})
    routed = run("path-routed", {"Content-Type": "application/vnd.rbees+json", "X-Correlation-Id": "path-routed"})

    def comparable(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        drop = {"job_id", "started_at", "decode_time_ms", "tokens_per_sec", "time_to_first_token_ms", "prefill_time_ms"}
        return [{k: v for k, v in f.items() if k not in drop} for f in frames]

    assert comparable(fast) == comparable(routed) and [f["type"] for f in fast][-2:] == ["metrics", "end"]


def test_correlation_id_is_echoed_and_logged_without_the_prompt(worker: Daemon, client: httpx.Client) -> None:
    frames = stream_job(
        worker.url,
        execute_body("job-logged", SECRET_PROMPT, max_tokens=4),
        headers={"X-Correlation-Id": "corr-42"},
    )
    text = _text(frames)
    assert client.get("/health", headers={"X-Correlation-Id": "corr-43"}).headers["x-correlation-id"] == "corr-43"
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/health").headers["x-correlation-id"])
    ended = [e for e in worker.logs() if e.get("job_id") == "job-logged" and "tokens_out" in e]
    assert len(ended) == 1
    entry = ended[0]
    assert entry["correlation_id"] == "corr-42" and entry["worker_id"] == "w-test"
    assert entry["tokens_in"] == frames[0]["prompt_tokens"] and entry["tokens_out"] == frames[-1]["tokens_out"]
    assert entry["decode_time_ms"] >= 0 and "job-logged" in entry["human"]
    log_text = worker.log_path.read_text()
    assert SECRET_PROMPT not in log_text
    assert text.strip() not in log_text


def test_metrics_count_jobs_tokens_and_latencies(worker: Daemon) -> None:
    started = _metric(worker.url, "rbees_worker_jobs_started_total")
    tokens = _metric(worker.url, "rbees_worker_tokens_generated_total")
    ttft = _metric(worker.url, "rbees_worker_time_to_first_token_seconds_count")
    frames = stream_job(worker.url, execute_body("job-metrics", max_tokens=5))
    n = frames[-1]["tokens_out"]
    assert _metric(worker.url, "rbees_worker_jobs_started_total") == started + 1
    assert _metric(worker.url, "rbees_worker_tokens_generated_total") == tokens + n
    assert _metric(worker.url, "rbees_worker_time_to_first_token_seconds_count") == ttft + 1
    assert _metric(worker.url, "rbees_worker_token_latency_seconds_count") >= n - 1
    assert _metric(worker.url, "rbees_worker_jobs_completed_total", {"stop_reason": frames[-1]["stop_reason"]}) >= 1
    assert _metric(worker.url, "rbees_worker_slots") == SLOTS
    assert _metric(worker.url, "rbees_worker_slots_in_use") == 0
    assert _metric(worker.url, "rbees_worker_model_bytes") > 50_000_000
    assert _metric(worker.url, "rbees_worker_vram_bytes") == 0
    assert _metric(worker.url, "rbees_worker_state", {"state": "Ready"}) == 1
    assert _metric(worker.url, "rbees_worker_state", {"state": "Loading"}) == 0


def test_metrics_follow_prometheus_conventions(worker: Daemon, model_path: Path) -> None:
    """Gauges without `_total`, no label named like its metric, the weights apart from the KV cache, and the
    metrics of both processes: the HTTP server's and the engine's, which holds the weights."""
    families = list(text_string_to_metric_families(httpx.get(f"{worker.url}/metrics").text))
    assert families
    for family in families:
        assert family.type != "gauge" or not family.name.endswith("_total"), family.name
        assert all(family.name not in sample.labels for sample in family.samples), family.name
    f = load_gguf(model_path)
    try:
        cache = kv_cache_bytes(ModelConfig.from_gguf(f), SLOTS, CONTEXT)
        file_weights = sum(t.raw.nbytes for t in f.tensors.values())
    finally:
        f.close()
    assert _metric(worker.url, "rbees_worker_kv_cache_bytes") == cache
    weights = _metric(worker.url, "rbees_worker_model_bytes")
    assert file_weights * 0.8 < weights < file_weights * 2.5  # prepared weights, without the cache or scratch
    assert _metric(worker.url, "rbees_engine_process_resident_memory_bytes") > weights
    assert _metric(worker.url, "process_resident_memory_bytes") > 0
    assert _metric(worker.url, "process_open_fds") > 0 and _metric(worker.url, "rbees_engine_process_open_fds") > 0
    assert _metric(worker.url, "python_info") == 1


# ---- schemathesis: every documented operation, generated inputs, against the real daemon -------------
OPERATIONS = [
    ("/execute", "POST", GenerationMode.POSITIVE),
    ("/execute", "POST", GenerationMode.NEGATIVE),
    ("/cancel", "POST", GenerationMode.POSITIVE),
    ("/cancel", "POST", GenerationMode.NEGATIVE),
    ("/health", "GET", GenerationMode.POSITIVE),
    ("/ready", "GET", GenerationMode.POSITIVE),
    ("/metrics", "GET", GenerationMode.POSITIVE),
]


@pytest.fixture(scope="module")
def api_schema(worker: Daemon) -> Any:
    return schemathesis.openapi.from_url(f"{worker.url}/openapi.json")


def test_openapi_documents_every_route(api_schema: Any) -> None:
    documented = {(op.path, op.method.upper()) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert documented == {(path, method) for path, method, _ in OPERATIONS}


@pytest.mark.parametrize(("path", "method", "mode"), OPERATIONS)
@settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_openapi_schema_matches_the_real_responses(
    api_schema: Any, tokenizer: Tokenizer, path: str, method: str, mode: GenerationMode, data: st.DataObject
) -> None:
    case = data.draw(api_schema[path][method].as_strategy(generation_mode=mode))
    body = case.body
    if isinstance(body, dict) and mode == GenerationMode.POSITIVE:
        # Bounded CPU time, within the model context and of at least one token (limits the static schema
        # cannot state; the prompt/max_tokens over the context and a prompt of no tokens are tested above).
        # A valid body stays valid. Negative bodies are left alone: clamping could make them valid, and the
        # server rejects them unrun.
        tokens = body.get("max_tokens")
        if isinstance(tokens, int | float) and not isinstance(tokens, bool) and tokens > 3:
            body["max_tokens"] = 3
        if isinstance(body.get("prompt"), str) and len(body["prompt"]) > 60:
            body["prompt"] = body["prompt"][:60]
        if isinstance(body.get("prompt"), str) and body["prompt"] and not tokenizer.encode(body["prompt"]):
            body["prompt"] += "a"  # e.g. only bytes SmolLM2's vocabulary lacks, such as U+0006
        if isinstance(body.get("messages"), list):  # a rendered chat is never of no tokens
            body["messages"] = [{**m, "content": m["content"][:60]} for m in body["messages"][:2]]
    case.call_and_validate(timeout=120)


def test_logs_are_json_lines(worker: Daemon) -> None:
    entries = worker.logs()
    assert entries and all({"ts", "level", "worker_id", "human"} <= set(e) for e in entries)


def test_an_unexpected_error_is_a_500_that_keeps_the_correlation_id(model_path: Path) -> None:
    """A bug in a route gives 500 INTERNAL with the request's correlation id, and the server keeps serving.

    No request reaches a bug on purpose, so the fault is a route added to the real app, served by
    uvicorn on loopback; the handler under test is the app's own.
    """
    port = free_port()
    runtime = WorkerRuntime(parse_settings(["--worker-id", "w-fault", "--model", str(model_path), "--port", str(port)]))
    app = create_app(runtime)
    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setFormatter(JsonFormatter(worker_id="w-fault"))
    logging.getLogger("rbees_workerd.server").addHandler(handler)

    def fault() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/fault", fault)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    if c.get("/health").status_code == 200:
                        break
                time.sleep(0.05)
            r = c.get("/fault", headers={"X-Correlation-Id": "req-500.check"})
            assert r.status_code == 500
            assert r.json() == {"code": "INTERNAL", "message": "internal error", "retriable": True}
            assert r.headers["x-correlation-id"] == "req-500.check"
            assert r.headers["connection"] == "close"  # the server closes it: the client must not reuse it
            generated = c.get("/fault")
            assert generated.status_code == 500
            assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-correlation-id"])
            assert c.get("/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        logging.getLogger("rbees_workerd.server").removeHandler(handler)
    entry = json.loads(logged.getvalue().splitlines()[0])  # the log line carries the bug's traceback
    assert entry["correlation_id"] == "req-500.check" and entry["exception"] == "RuntimeError"
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert 'raise RuntimeError("a bug")' in entry["exc"]
    assert entry["exc"].endswith("RuntimeError: a bug")
