"""rbees-orcd's API against the real orchestrator and one real worker (rbees-pool, SmolLM2 on the CPU).

One orchestrator (`--max-queue 1 --resume-window 5`) and one 2-slot worker, registered through its ready
callback, serve the whole module; the OpenAI tests use the official `openai` client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from orcd_harness import (
    MODEL,
    Orcd,
    metric,
    pool_with_model,
    read_events,
    run_orcd,
    run_task,
    spawn_worker,
    submit,
    task_body,
    text_of,
    wait_for,
    wait_worker_state,
    workers,
)
from pydantic import TypeAdapter, ValidationError
from schemathesis import GenerationMode
from test_pool_support import assert_nothing_left_running, run_pool
from worker_harness import free_port

from rbees_orcd.schemas import WorkerUrl

SECRET_PROMPT = "zebra-quartz-SECRET-PROMPT"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Path]:
    root = pool_with_model(tmp_path_factory.mktemp("orcd-api") / "pool", model_path)
    yield root
    assert_nothing_left_running(str(root))


@pytest.fixture(scope="module")
def orcd(root: Path) -> Iterator[Orcd]:
    with run_orcd(root.parent, "--max-queue", "1", "--resume-window", "5") as o:
        yield o


@pytest.fixture(scope="module")
def worker(root: Path, orcd: Orcd) -> Iterator[dict[str, Any]]:
    spawned = spawn_worker(root, f"{orcd.url}/v2/workers/ready", slots=2)
    try:
        wait_worker_state(orcd.url, spawned["worker_id"], "healthy")
        yield spawned
    finally:
        assert run_pool(root, "worker", "stop", spawned["worker_id"]).returncode == 0


@pytest.fixture
def client(orcd: Orcd, worker: dict[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=orcd.url, timeout=120) as c:
        yield c


@pytest.fixture
def oai(orcd: Orcd, worker: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{orcd.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _cancelled_on_worker(worker: dict[str, Any]) -> float:
    return metric(worker["url"], "rbees_worker_jobs_cancelled_total")


def _wait_idle(orcd: Orcd, worker: dict[str, Any]) -> None:
    """Until neither the orchestrator nor the worker runs a job (bounded)."""
    wait_for(lambda: workers(orcd.url)[worker["worker_id"]]["active_jobs"] == 0, "no job relayed")
    wait_for(lambda: httpx.get(f"{worker['url']}/health").json()["slots_free"] == 2, "the worker's slots free")


# ---- registry, health, models ------------------------------------------------------------------------
def test_the_worker_registers_through_its_ready_callback(orcd: Orcd, worker: dict[str, Any], oai: openai.OpenAI):
    registered = workers(orcd.url)[worker["worker_id"]]
    assert {k: registered[k] for k in ("url", "model", "backend", "slots_total", "state", "active_jobs")} == {
        "url": worker["url"], "model": MODEL, "backend": "cpu", "slots_total": 2, "state": "healthy", "active_jobs": 0
    }  # fmt: skip
    assert registered["last_seen"] >= registered["registered_at"] > 0
    health = httpx.get(f"{orcd.url}/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    assert health["workers"]["total"] == health["workers"]["healthy"] == 1
    assert [m.id for m in oai.models.list()] == [MODEL]
    assert any(e.get("worker_id") == worker["worker_id"] and "registered" in e["human"] for e in orcd.logs())


# ---- the relay ---------------------------------------------------------------------------------------
def test_task_events_relay_the_worker_stream_with_ids(client: httpx.Client, worker: dict[str, Any]) -> None:
    events = run_task(client, task_body(max_tokens=6))
    assert [i for i, _ in events] == list(range(len(events)))
    kinds = [e["type"] for _, e in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-2:] == ["metrics", "end"]
    assert set(kinds[2:-2]) == {"token"}
    queued, started, end = events[0][1], events[1][1], events[-1][1]
    assert queued["queue_position"] == 0 and started["job_id"] == queued["job_id"]
    assert started["worker_id"] == worker["worker_id"] and started["model"] == MODEL and started["prompt_tokens"] > 0
    tokens = [e for _, e in events if e["type"] == "token"]
    assert [t["i"] for t in tokens] == list(range(len(tokens))) and end["tokens_out"] == len(tokens)
    assert end["stop_reason"] in ("MAX_TOKENS", "EOS")
    # the same greedy request straight to the worker gives the same text
    body = {"job_id": "direct-1", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0.0}
    with httpx.stream("POST", f"{worker['url']}/execute", json=body, timeout=120) as r:
        direct = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert text_of(events) == "".join(f["t"] for f in direct if f["type"] == "token") != ""
    view = client.get(f"/v2/tasks/{queued['job_id']}").json()
    assert (view["status"], view["tokens_out"], view["worker_id"]) == ("completed", len(tokens), worker["worker_id"])


def test_last_event_id_resumes_without_duplicates_or_gaps(client: httpx.Client) -> None:
    job_id = submit(client, task_body(max_tokens=40))
    first: list[tuple[int, dict[str, Any]]] = []
    with client.stream("GET", f"/v2/tasks/{job_id}/events") as r:
        for event in read_events(r):
            first.append(event)
            if event[0] == 4:
                break  # hang up mid-stream
    assert first[-1][1]["type"] == "token"
    with client.stream("GET", f"/v2/tasks/{job_id}/events", headers={"Last-Event-ID": "4"}) as r:
        rest = list(read_events(r))
    resumed = first + rest
    assert [i for i, _ in resumed] == list(range(len(resumed)))
    assert resumed[-1][1]["type"] == "end" and resumed[-1][1]["stop_reason"] in ("MAX_TOKENS", "EOS")
    with client.stream("GET", f"/v2/tasks/{job_id}/events") as r:
        assert list(read_events(r)) == resumed  # a late reader replays it all
    with client.stream("GET", f"/v2/tasks/{job_id}/events", headers={"Last-Event-ID": str(len(resumed) - 1)}) as r:
        assert list(read_events(r)) == []
    bad = client.get(f"/v2/tasks/{job_id}/events", headers={"Last-Event-ID": "seven"})
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "Last-Event-ID"
    missing = client.get("/v2/tasks/job-none/events")
    assert missing.status_code == 404 and missing.json()["code"] == "TASK_NOT_FOUND"


# ---- cancellation ------------------------------------------------------------------------------------
def test_cancel_reaches_the_worker(orcd: Orcd, client: httpx.Client, worker: dict[str, Any]) -> None:
    before = _cancelled_on_worker(worker)
    job_id = submit(client, task_body(max_tokens=200))
    with client.stream("GET", f"/v2/tasks/{job_id}/events") as r:
        events = read_events(r)
        while next(events)[1]["type"] != "token":
            pass
        accepted = client.post(f"/v2/tasks/{job_id}/cancel")
        assert accepted.status_code == 202 and accepted.json() == {"job_id": job_id, "status": "cancelling"}
        end = list(events)[-1][1]
    assert end["type"] == "end" and end["stop_reason"] == "CANCELLED" and end["tokens_out"] < 200
    assert _cancelled_on_worker(worker) == before + 1
    again = client.post(f"/v2/tasks/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["code"] == "TASK_ENDED"
    assert client.post("/v2/tasks/job-none/cancel").status_code == 404
    _wait_idle(orcd, worker)


def test_an_openai_client_that_hangs_up_cancels_its_job(orcd: Orcd, worker: dict[str, Any]) -> None:
    before = _cancelled_on_worker(worker)
    ended = metric(orcd.url, "rbees_orcd_tasks_ended_total", {"status": "cancelled"})
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{orcd.url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    wait_for(lambda: _cancelled_on_worker(worker) == before + 1, "the worker to cancel the job")
    # (two processes count the end, each in its own time: the worker's count does not mean the orchestrator's)
    wait_for(lambda: metric(orcd.url, "rbees_orcd_tasks_ended_total", {"status": "cancelled"}) == ended + 1,
             "the orchestrator to end the task as cancelled")  # fmt: skip
    _wait_idle(orcd, worker)


def test_a_task_without_a_reader_is_cancelled_after_the_resume_window(
    orcd: Orcd, client: httpx.Client, worker: dict[str, Any]
) -> None:
    before = _cancelled_on_worker(worker)
    job_id = submit(client, task_body(max_tokens=2000))  # a job that outlives the window (5 s)
    with client.stream("GET", f"/v2/tasks/{job_id}/events") as r:
        events = read_events(r)
        while next(events)[1]["type"] != "token":
            pass
    assert client.get(f"/v2/tasks/{job_id}").json()["status"] == "running"  # within the window it runs on
    wait_for(lambda: client.get(f"/v2/tasks/{job_id}").json()["status"] == "cancelled", "the orphan's cancel", 60)
    assert _cancelled_on_worker(worker) == before + 1
    _wait_idle(orcd, worker)


# ---- admission ---------------------------------------------------------------------------------------
def test_a_full_queue_is_429_with_retry_after(orcd: Orcd, client: httpx.Client, oai: openai.OpenAI, worker):
    rejected = metric(orcd.url, "rbees_orcd_rejections_total", {"code": "QUEUE_FULL"})
    running = [submit(client, task_body(max_tokens=300)) for _ in range(2)]  # the worker's two slots
    queued = client.post("/v2/tasks", json=task_body(max_tokens=300))
    assert queued.status_code == 202 and queued.json()["queue_position"] == 1 and queued.json()["status"] == "queued"
    full = client.post("/v2/tasks", json=task_body())
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert full.json() == {"code": "QUEUE_FULL", "message": full.json()["message"], "retriable": True,
                           "retry_after_ms": int(full.headers["retry-after"]) * 1000}  # fmt: skip
    with pytest.raises(openai.RateLimitError) as caught:
        oai.completions.create(model=MODEL, prompt="hello", max_tokens=2)
    assert caught.value.status_code == 429 and caught.value.code == "QUEUE_FULL"
    assert client.get("/health").json()["queue_depth"] == 1
    assert metric(orcd.url, "rbees_orcd_rejections_total", {"code": "QUEUE_FULL"}) == rejected + 2
    waiting = queued.json()["job_id"]
    assert client.post(f"/v2/tasks/{waiting}/cancel").json() == {"job_id": waiting, "status": "cancelled"}
    with client.stream("GET", f"/v2/tasks/{waiting}/events") as r:
        assert [e["type"] for _, e in read_events(r)] == ["queued", "end"]
    for job_id in running:
        assert client.post(f"/v2/tasks/{job_id}/cancel").status_code == 202
    _wait_idle(orcd, worker)


def test_unknown_model_is_404_and_a_model_without_workers_503(client: httpx.Client, oai: openai.OpenAI) -> None:
    unknown = client.post("/v2/tasks", json=task_body(model="no-such-model"))
    assert unknown.status_code == 404 and unknown.json()["code"] == "MODEL_NOT_FOUND"
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="no-such-model", messages=CHAT)
    assert caught.value.code == "MODEL_NOT_FOUND"
    # a catalog model no worker serves
    down = client.post("/v2/tasks", json=task_body(model="tinyllama"))
    assert down.status_code == 503 and down.json()["code"] == "POOL_UNAVAILABLE" and down.headers["retry-after"]
    with pytest.raises(openai.InternalServerError) as caught:
        oai.chat.completions.create(model="tinyllama", messages=CHAT)
    assert caught.value.status_code == 503 and caught.value.code == "POOL_UNAVAILABLE"


# ---- malformed requests ------------------------------------------------------------------------------
def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": SECRET_PROMPT}], **fields}


INVALID: list[tuple[str, str, Any, str]] = [
    ("/v2/tasks", "malformed json", '{"model": "smol", "prompt": ', "body"),
    ("/v2/tasks", "not an object", "[1, 2]", "body"),
    ("/v2/tasks", "no model", {"prompt": SECRET_PROMPT, "max_tokens": 4}, "model"),
    ("/v2/tasks", "max_tokens zero", task_body(SECRET_PROMPT, max_tokens=0), "max_tokens"),
    ("/v2/tasks", "temperature 3", task_body(SECRET_PROMPT, temperature=3), "temperature"),
    ("/v2/tasks", "top_p 2", task_body(SECRET_PROMPT, top_p=2), "top_p"),
    ("/v2/tasks", "five stops", task_body(SECRET_PROMPT, stop=list("abcde")), "stop"),
    ("/v2/tasks", "negative seed", task_body(SECRET_PROMPT, seed=-1), "seed"),
    ("/v2/tasks", "bad priority", task_body(SECRET_PROMPT, priority="urgent"), "priority"),
    ("/v2/tasks", "prompt and messages", task_body(SECRET_PROMPT, messages=CHAT), "body"),
    ("/v2/tasks", "bad model id", task_body(SECRET_PROMPT, model="a b"), "model"),
    ("/v1/chat/completions", "malformed json", "{", "body"),
    ("/v1/chat/completions", "no messages", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", "empty messages", _chat(messages=[]), "messages"),
    ("/v1/chat/completions", "tool role", _chat(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
    ("/v1/chat/completions", "temperature 2.5", _chat(temperature=2.5), "temperature"),
    ("/v1/chat/completions", "n 2", _chat(n=2), "n"),
    ("/v1/chat/completions", "logprobs", _chat(logprobs=True), "logprobs"),
    ("/v1/chat/completions", "max_tokens 5000", _chat(max_tokens=5000), "max_tokens"),
    ("/v1/chat/completions", "stop too long", _chat(stop="é" * 51), "stop"),
    ("/v1/chat/completions", "max_tokens true", _chat(max_tokens=True), "max_tokens"),
    ("/v1/chat/completions", "temperature as text", _chat(temperature="0.5"), "temperature"),
    ("/v1/chat/completions", "stream as text", _chat(stream="yes"), "stream"),
    ("/v1/chat/completions", "include_usage 1", _chat(stream=True, stream_options={"include_usage": 1}),
     "stream_options"),
    ("/v1/completions", "no prompt", {"model": MODEL}, "prompt"),
    ("/v1/completions", "two prompts", {"model": MODEL, "prompt": [SECRET_PROMPT, "b"]}, "prompt"),
    ("/v1/completions", "echo", {"model": MODEL, "prompt": SECRET_PROMPT, "echo": True}, "echo"),
    ("/v1/completions", "top_p -1", {"model": MODEL, "prompt": SECRET_PROMPT, "top_p": -1}, "top_p"),
    ("/v1/completions", "seed as text", {"model": MODEL, "prompt": SECRET_PROMPT, "seed": "7"}, "seed"),
]


@pytest.mark.parametrize(("path", "body", "field"), [(p, b, f) for p, _, b, f in INVALID],
                         ids=[f"{p} {n}" for p, n, _, _ in INVALID])  # fmt: skip
def test_malformed_requests_are_400_naming_the_field(client: httpx.Client, path: str, body: Any, field: str) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert SECRET_PROMPT not in r.text
    if path.startswith("/v1/"):
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "INVALID_PARAMS"
        assert error["param"] is not None and error["param"].startswith(field), error
    else:
        assert field in [e["field"].split(".")[0] if field != "body" else e["field"] for e in r.json()["errors"]]


def test_a_request_the_worker_refuses_is_a_400_too(client: httpx.Client, oai: openai.OpenAI) -> None:
    """Limits only the worker knows (its model context) come back as the task's INVALID_PARAMS."""
    events = run_task(client, task_body(SECRET_PROMPT + " a" * 16000))
    error = events[-1][1]
    assert error["type"] == "error" and error["code"] == "INVALID_PARAMS" and error["errors"][0]["field"] == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=SECRET_PROMPT + " a" * 16000, max_tokens=2)
    assert caught.value.code == "INVALID_PARAMS" and SECRET_PROMPT not in caught.value.message


# ---- the OpenAI API through the official client -----------------------------------------------------
def test_chat_completion_with_usage(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert done.object == "chat.completion" and done.model == MODEL and len(done.choices) == 1
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens > len(CHAT[0]["content"].split())
    assert done.usage.total_tokens == done.usage.prompt_tokens + 8
    shorter = oai.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, temperature=0)
    assert shorter.usage.completion_tokens == 3
    assert done.choices[0].message.content.startswith(shorter.choices[0].message.content)


def test_chat_completion_stream_with_include_usage(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    *content, last, usage = chunks
    assert last.choices[0].finish_reason == "length" and all(c.usage is None for c in content + [last])
    assert usage.choices == [] and usage.usage.completion_tokens == 8
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    plain = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, stream=True))
    assert all(c.usage is None and c.choices for c in plain)


def test_completions_stream_and_not(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text.strip()
    assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
    chunks = list(oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                         stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_and_seed_are_applied(oai: openai.OpenAI) -> None:
    full = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    words = full.choices[0].text.split()
    assert len(words) >= 3, full.choices[0].text
    stop = words[2]
    stopped = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                     stop=stop)  # fmt: skip
    assert stopped.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [
        oai.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.9, top_p=0.95, seed=seed
        )
        .choices[0]
        .text
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "temperature"


# ---- operations --------------------------------------------------------------------------------------
def test_metrics_count_admissions_tokens_and_dispatch(orcd: Orcd, client: httpx.Client, worker) -> None:
    admitted = metric(orcd.url, "rbees_orcd_admissions_total", {"model": MODEL})
    relayed = metric(orcd.url, "rbees_orcd_tokens_relayed_total", {"model": MODEL})
    dispatched = metric(orcd.url, "rbees_orcd_dispatch_latency_seconds_count")
    events = run_task(client, task_body(max_tokens=5))
    tokens = sum(1 for _, e in events if e["type"] == "token")
    assert metric(orcd.url, "rbees_orcd_admissions_total", {"model": MODEL}) == admitted + 1
    assert metric(orcd.url, "rbees_orcd_tokens_relayed_total", {"model": MODEL}) == relayed + tokens
    assert metric(orcd.url, "rbees_orcd_dispatch_latency_seconds_count") == dispatched + 1
    assert metric(orcd.url, "rbees_orcd_queue_depth", {"model": MODEL}) == 0
    labels = {"worker_id": worker["worker_id"], "state": "healthy"}
    assert metric(orcd.url, "rbees_orcd_worker_state", labels) == 1
    assert metric(orcd.url, "rbees_orcd_worker_slots", {"worker_id": worker["worker_id"]}) == 2


def test_correlation_id_is_echoed_and_logs_are_json_without_prompts(orcd: Orcd, client: httpx.Client) -> None:
    # (an answer long enough not to turn up in the log by chance: a 3-token one, "-20", matched a pytest temp path)
    r = client.post("/v2/tasks", json=task_body(SECRET_PROMPT, max_tokens=16), headers={"X-Correlation-Id": "orc-7"})
    assert r.status_code == 202 and r.headers["x-correlation-id"] == "orc-7"
    job_id = r.json()["job_id"]
    with client.stream("GET", f"/v2/tasks/{job_id}/events") as events:
        text = text_of(list(read_events(events)))
    entries = orcd.logs()
    assert all({"ts", "level", "service", "human"} <= set(e) for e in entries)
    assert any(e.get("job_id") == job_id and e.get("status") == "completed" for e in entries)
    log_text = orcd.log_path.read_text()
    assert len(text.strip()) >= 12, text
    assert SECRET_PROMPT not in log_text and text.strip() not in log_text


# ---- manual registration, and schemathesis, against a second orchestrator of the same worker ---------
@pytest.fixture(scope="module")
def fuzzed(root: Path, worker: dict[str, Any]) -> Iterator[Orcd]:
    """An orchestrator of its own (generated requests register and delete workers) with the worker added."""
    with run_orcd(root.parent) as o:
        r = httpx.post(f"{o.url}/v2/workers", json={"worker_id": worker["worker_id"], "url": worker["url"]})
        assert r.status_code == 201, r.text
        yield o


def test_manual_registration_asks_the_worker(fuzzed: Orcd, worker: dict[str, Any]) -> None:
    registered = workers(fuzzed.url)[worker["worker_id"]]
    assert (registered["model"], registered["slots_total"], registered["backend"]) == (MODEL, 2, "cpu")
    assert registered["state"] == "healthy" and registered["device"]
    dead = f"http://127.0.0.1:{free_port()}"
    nowhere = httpx.post(f"{fuzzed.url}/v2/workers", json={"worker_id": "w-x", "url": dead})
    assert nowhere.status_code == 400 and nowhere.json()["errors"][0]["field"] == "url"
    other = httpx.post(f"{fuzzed.url}/v2/workers", json={"worker_id": "w-y", "url": worker["url"], "model_ref": "q"})
    assert other.status_code == 400 and other.json()["errors"][0]["field"] == "model_ref"
    ready = {"worker_id": "w-gone", "url": f"http://127.0.0.1:{free_port()}", "model_ref": "m", "backend": "cpu",
             "slots_total": 1}  # fmt: skip
    assert httpx.post(f"{fuzzed.url}/v2/workers/ready", json=ready).status_code == 200
    assert httpx.delete(f"{fuzzed.url}/v2/workers/w-gone").status_code == 204
    missing = httpx.delete(f"{fuzzed.url}/v2/workers/w-gone")
    assert missing.status_code == 404 and missing.json()["code"] == "WORKER_NOT_FOUND"
    assert set(workers(fuzzed.url)) == {worker["worker_id"]}


@pytest.mark.parametrize("fields", [{"vram_bytes": False}, {"slots_total": "2"}, {"slots_total": 1.5},
                                    {"slots_total": 0}], ids=str)  # fmt: skip
def test_a_ready_callback_of_wrong_types_is_refused(fuzzed: Orcd, fields: dict[str, Any]) -> None:
    """JSON types as the schema states them: false is no number and "2" no integer (pydantic would coerce them)."""
    worker_id = f"w-typed-{free_port()}"
    ready = {"worker_id": worker_id, "url": f"http://127.0.0.1:{free_port()}", "model_ref": "m", "backend": "cpu",
             "slots_total": 1, **fields}  # fmt: skip
    r = httpx.post(f"{fuzzed.url}/v2/workers/ready", json=ready)
    assert r.status_code == 400 and [e["field"] for e in r.json()["errors"]] == list(fields), r.text
    assert worker_id not in workers(fuzzed.url)


WITH_BODY = [("/v2/workers/ready", "POST"), ("/v2/workers", "POST"), ("/v2/tasks", "POST"),
             ("/v1/chat/completions", "POST"), ("/v1/completions", "POST")]  # fmt: skip
WITHOUT_BODY = [("/v2/workers", "GET"), ("/v2/workers/{worker_id}", "DELETE"), ("/v2/tasks/{job_id}", "GET"),
                ("/v2/tasks/{job_id}/events", "GET"), ("/v2/tasks/{job_id}/cancel", "POST"), ("/health", "GET"),
                ("/metrics", "GET"), ("/v1/models", "GET")]  # fmt: skip
# Invalid inputs exist only where there is a body to break (any string is a valid path parameter).
OPERATIONS = [(*op, GenerationMode.POSITIVE) for op in WITH_BODY + WITHOUT_BODY] + [
    (*op, GenerationMode.NEGATIVE) for op in WITH_BODY
]


@pytest.fixture(scope="module")
def api_schema(fuzzed: Orcd) -> Any:
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")


def test_openapi_documents_every_route(api_schema: Any) -> None:
    documented = {(op.path, op.method.upper()) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert documented == set(WITH_BODY + WITHOUT_BODY)


def _is_worker_url(value: object) -> bool:
    try:
        TypeAdapter(WorkerUrl).validate_python(value)
    except ValidationError:
        return False
    return True


def _bounded(path: str, body: dict[str, Any], worker: dict[str, Any], dead_url: str, positive: bool) -> None:
    """Every URL on loopback (a manual registration names the real worker, a ready callback a port where
    nothing listens), whether the body is valid or not: a URL is replaced only by one as valid. A valid body
    stays valid and within this model and machine: short generations, a prompt of at least one token (the
    worker refuses one of none with 400, as tested above). An invalid body is left invalid."""
    if _is_worker_url(body.get("url")):
        body["url"] = worker["url"] if path == "/v2/workers" else dead_url
    if not positive:
        return
    if path == "/v2/workers" and isinstance(body.get("model_ref"), str):
        body["model_ref"] = MODEL
    if path in ("/v2/tasks", "/v1/chat/completions", "/v1/completions"):
        body["model"] = MODEL
        body["max_tokens"] = min(body.get("max_tokens") or 3, 3)
        body.pop("max_completion_tokens", None)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            body["prompt"] = [p[:60] + "a" for p in prompt]
        elif isinstance(prompt, str):
            body["prompt"] = prompt[:60] + "a"
        if isinstance(body.get("messages"), list):
            body["messages"] = [{**m, "content": _short(m["content"])} for m in body["messages"][:2]]
        stop = body.get("stop")  # at most 100 bytes of UTF-8 each: a limit the static schema cannot state
        if isinstance(stop, str) or isinstance(stop, list) and stop:
            body["stop"] = [s[:25] for s in stop] if isinstance(stop, list) else stop[:25]


def _short(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A message's content cut to 60 characters (of at most two text parts)."""
    if isinstance(content, str):
        return content[:60]
    return [{**part, "text": part["text"][:60]} for part in content[:2]]


@pytest.mark.parametrize(("path", "method", "mode"), OPERATIONS)
@settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_generated_requests_get_4xx_never_5xx(
    api_schema: Any, worker: dict[str, Any], path: str, method: str, mode: GenerationMode, data: st.DataObject
) -> None:
    """Every documented operation, with valid and invalid inputs: answers that match the schema, never 5xx."""
    case = data.draw(api_schema[path][method].as_strategy(generation_mode=mode))
    if isinstance(case.body, dict):
        _bounded(path, case.body, worker, f"http://127.0.0.1:{free_port()}", mode == GenerationMode.POSITIVE)
    case.call_and_validate(timeout=120)
