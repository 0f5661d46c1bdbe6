"""Placement and failures with two real workers of one model (rbees-pool, SmolLM2, one slot each).

The faults are real: a worker whose slot a direct client holds answers 503, a URL where nothing listens
refuses connections, SIGSTOP freezes a worker, SIGKILL kills one mid-stream.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
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
    wait_for,
    wait_worker_state,
    workers,
)
from test_pool_support import assert_nothing_left_running, run_json, run_pool
from worker_harness import free_port

LOST_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Path]:
    root = pool_with_model(tmp_path_factory.mktemp("orcd-failover") / "pool", model_path)
    yield root
    run_pool(root, "worker", "stop-all")
    assert_nothing_left_running(str(root))


@pytest.fixture(scope="module")
def orcd(root: Path) -> Iterator[Orcd]:
    with run_orcd(root.parent, "--drop-after", "6") as o:
        yield o


@pytest.fixture(scope="module")
def pair(root: Path, orcd: Orcd) -> list[dict[str, Any]]:
    """Two one-slot workers, by worker id (the first is the one placement prefers among equals)."""
    spawned = sorted((spawn_worker(root, f"{orcd.url}/v2/workers/ready", slots=1) for _ in range(2)),
                     key=lambda w: w["worker_id"])  # fmt: skip
    for w in spawned:
        wait_worker_state(orcd.url, w["worker_id"], "healthy")
    return spawned


@pytest.fixture
def client(orcd: Orcd, pair: list[dict[str, Any]]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=orcd.url, timeout=120) as c:
        yield c


def _started_on(client: httpx.Client, job_id: str) -> str:
    with client.stream("GET", f"/v2/tasks/{job_id}/events") as r:
        for _, event in read_events(r):
            if event["type"] == "started":
                return event["worker_id"]
    raise AssertionError(f"task {job_id} never started")


def _idle(url: str) -> bool:
    return all(w["active_jobs"] == 0 for w in workers(url).values())


def test_two_workers_of_one_model_share_the_load(orcd: Orcd, client: httpx.Client, pair) -> None:
    jobs = [submit(client, task_body(max_tokens=120)) for _ in range(2)]
    busy = workers(orcd.url)
    assert [busy[w["worker_id"]]["active_jobs"] for w in pair] == [1, 1]
    assert {_started_on(client, job) for job in jobs} == {w["worker_id"] for w in pair}
    for job in jobs:
        client.post(f"/v2/tasks/{job}/cancel")
    wait_for(lambda: _idle(orcd.url), "both workers idle")


def test_a_busy_worker_passes_the_task_on_before_its_first_token(orcd: Orcd, client: httpx.Client, pair) -> None:
    """A direct client holds the preferred worker's only slot: it answers 503 and the task runs on the other."""
    first, second = pair
    retries = metric(orcd.url, "rbees_orcd_retries_total")
    body = {"job_id": "direct-hold", "prompt": "Once upon a time", "max_tokens": 2000}
    with httpx.stream("POST", f"{first['url']}/execute", json=body, timeout=120) as held:
        assert held.status_code == 200
        events = run_task(client, task_body(max_tokens=4))
    assert [i for i, _ in events] == list(range(len(events)))  # the refusal left no trace in the stream
    assert [e["type"] for _, e in events].count("started") == 1
    assert events[1][1]["worker_id"] == second["worker_id"] and events[-1][1]["type"] == "end"
    assert metric(orcd.url, "rbees_orcd_retries_total") == retries + 1
    assert workers(orcd.url)[first["worker_id"]]["state"] == "healthy"  # busy is no fault


def test_connection_refused_before_the_first_token_moves_the_task(root: Path, pair) -> None:
    """A registered worker where nothing listens (polling off, so it still looks healthy): the task runs
    elsewhere, that worker is marked unhealthy; a model whose every worker refuses fails WORKER_FAILED."""
    with run_orcd(root.parent, "--health-interval", "3600") as orcd, httpx.Client(base_url=orcd.url, timeout=60) as c:
        for w in pair:
            assert c.post("/v2/workers", json={"worker_id": w["worker_id"], "url": w["url"]}).status_code == 201
        dead = {"url": f"http://127.0.0.1:{free_port()}", "backend": "cpu", "slots_total": 4}
        for worker_id, model in (("a-dead", MODEL), ("g-1", "ghost"), ("g-2", "ghost"), ("g-3", "ghost")):
            r = c.post("/v2/workers/ready", json={**dead, "url": f"http://127.0.0.1:{free_port()}",
                                                  "worker_id": worker_id, "model_ref": model})  # fmt: skip
            assert r.status_code == 200 and r.json()["state"] == "healthy"
        events = run_task(c, task_body(max_tokens=4))
        assert events[1][1]["worker_id"] in {w["worker_id"] for w in pair} and events[-1][1]["type"] == "end"
        assert workers(orcd.url)["a-dead"]["state"] == "unhealthy"
        failed = run_task(c, task_body(model="ghost"))
        assert [e["type"] for _, e in failed] == ["queued", "error"]
        assert failed[-1][1]["code"] == "WORKER_FAILED" and failed[-1][1]["retriable"] is True
        assert {workers(orcd.url)[w]["state"] for w in ("g-1", "g-2", "g-3")} == {"unhealthy"}


def test_a_restarted_orchestrator_keeps_its_registry(root: Path, pair) -> None:
    db = root.parent / "restart.sqlite"
    port = free_port()
    with run_orcd(root.parent, db=db, port=port) as orcd:
        for w in pair:
            r = httpx.post(f"{orcd.url}/v2/workers", json={"worker_id": w["worker_id"], "url": w["url"]})
            assert r.status_code == 201 and r.json()["model"] == MODEL and r.json()["slots_total"] == 1
        before = workers(orcd.url)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with run_orcd(root.parent, db=db, port=port) as orcd, httpx.Client(base_url=orcd.url, timeout=60) as c:
        after = workers(orcd.url)
        assert after.keys() == before.keys() == {w["worker_id"] for w in pair}
        assert all(after[k]["url"] == before[k]["url"] and after[k]["registered_at"] == before[k]["registered_at"]
                   for k in after)  # fmt: skip
        assert run_task(c, task_body(max_tokens=3))[-1][1]["type"] == "end"


def test_a_frozen_worker_is_given_up_then_used_again_when_it_answers(orcd: Orcd, client: httpx.Client, pair):
    """SIGSTOP mid-stream: the stream goes quiet, the worker's /health does not answer: an error event
    within seconds and the worker unhealthy. SIGCONT: the next poll finds it healthy, and it is used again."""
    job_id = submit(client, task_body(max_tokens=2000))
    with client.stream("GET", f"/v2/tasks/{job_id}/events") as r:
        events = read_events(r)
        started = next(e for _, e in events if e["type"] == "started")
        target = next(w for w in pair if w["worker_id"] == started["worker_id"])
        os.kill(target["pid"], signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            last = list(events)[-1][1]
            seen_after = time.monotonic() - stopped_at
            assert last["type"] == "error" and last["code"] == "WORKER_LOST", last
            assert seen_after < LOST_WITHIN_S + 2  # the quiet stream's probe needs a probe timeout more
            wait_worker_state(orcd.url, target["worker_id"], "unhealthy", timeout=10)
        finally:
            os.kill(target["pid"], signal.SIGCONT)
    wait_worker_state(orcd.url, target["worker_id"], "healthy", timeout=30)
    other = next(w for w in pair if w is not target)
    with httpx.stream("POST", f"{other['url']}/execute", json={"job_id": "hold-2", "prompt": "Hi", "max_tokens": 2000},
                      timeout=120) as held:  # fmt: skip
        assert held.status_code == 200
        assert run_task(client, task_body(max_tokens=3))[1][1]["worker_id"] == target["worker_id"]


def test_a_worker_killed_mid_stream_is_an_error_event_within_5s(root: Path, orcd: Orcd, client: httpx.Client, pair):
    wait_for(lambda: _idle(orcd.url), "both workers idle")
    job_id = submit(client, task_body(max_tokens=2000))
    with client.stream("GET", f"/v2/tasks/{job_id}/events") as r:
        events = read_events(r)
        while (event := next(events)[1])["type"] != "token":
            started = event
        victim = next(w for w in pair if w["worker_id"] == started["worker_id"])
        os.killpg(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        rest = list(events)
        lost_after = time.monotonic() - killed_at
    assert rest[-1][1]["type"] == "error" and rest[-1][1]["code"] == "WORKER_LOST"
    assert lost_after < LOST_WITHIN_S, lost_after
    assert workers(orcd.url)[victim["worker_id"]]["state"] == "unhealthy"
    assert client.get(f"/v2/tasks/{job_id}").json()["status"] == "failed"
    survivor = next(w for w in pair if w is not victim)
    assert run_task(client, task_body(max_tokens=3))[1][1]["worker_id"] == survivor["worker_id"]
    wait_worker_state(orcd.url, victim["worker_id"], None, timeout=60)  # dead for --drop-after: dropped
    assert run_json(root, "worker", "list")["removed_stale"] == [victim["worker_id"]]
