"""Bearer auth: clients need the orchestrator's token; the orchestrator calls a token-protected worker with
the token from its worker token file. The worker (real rbees-workerd, own token) registers through a ready
callback that carries the orchestrator's token as HTTP Basic credentials in its URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from orcd_harness import Orcd, run_orcd, run_task, task_body, wait_for, workers
from worker_harness import Daemon, free_port, run_daemon

API_TOKEN = "orcd-secret-token"
WORKER_TOKEN = "worker-secret-token"
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("orcd-auth")
    (tmp / "api-token").write_text(API_TOKEN + "\n")
    (tmp / "worker-tokens").write_text(f"# worker tokens\nw-test {WORKER_TOKEN}\n")
    (tmp / "worker-token").write_text(WORKER_TOKEN)
    return tmp


@pytest.fixture(scope="module")
def orcd(tmp: Path) -> Iterator[Orcd]:
    args = ("--api-token-file", str(tmp / "api-token"), "--worker-token-file", str(tmp / "worker-tokens"))
    with run_orcd(tmp, *args, port=free_port()) as o:
        yield o


@pytest.fixture(scope="module")
def worker(tmp: Path, orcd: Orcd) -> Iterator[Daemon]:
    callback = f"http://rbees:{API_TOKEN}@{orcd.url.removeprefix('http://')}/v2/workers/ready"
    token = str(tmp / "worker-token")
    with run_daemon(tmp, "--slots", "1", "--api-token-file", token, "--callback-url", callback) as d:
        wait_for(lambda: "w-test" in workers(orcd.url, headers=_auth()), "the worker's callback")
        yield d


def _auth(token: str = API_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_routes_need_the_token_but_health_and_metrics(orcd: Orcd, worker: Daemon) -> None:
    for method, path in (("GET", "/v2/workers"), ("POST", "/v2/tasks"), ("GET", "/v1/models"),
                         ("GET", "/openapi.json"), ("POST", "/v2/workers/ready")):  # fmt: skip
        for headers in ({}, _auth("wrong"), {"Authorization": "Basic Zm9vOmJhcg=="}):
            r = httpx.request(method, f"{orcd.url}{path}", headers=headers, json={})
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            body = r.json()
            assert body.get("code", body.get("error", {}).get("code")) == "AUTH_FAILED"
    assert httpx.get(f"{orcd.url}/health").status_code == 200
    assert httpx.get(f"{orcd.url}/metrics").status_code == 200
    assert httpx.get(f"{orcd.url}/openapi.json", headers=_auth()).status_code == 200


def test_the_worker_token_comes_from_the_file(orcd: Orcd, worker: Daemon) -> None:
    """The worker refuses /execute without its token: the answer streaming proves the orchestrator sent it."""
    assert httpx.post(f"{worker.url}/execute", json={"job_id": "x", "prompt": "hi", "max_tokens": 1}).status_code == 401
    oai = openai.OpenAI(base_url=f"{orcd.url}/v1", api_key=API_TOKEN, max_retries=0, timeout=120)
    done = oai.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=CHAT, max_tokens=4)
    assert done.usage.completion_tokens >= 1 and done.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{orcd.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_without_the_worker_token_the_task_fails_after_three_workers(tmp: Path, worker: Daemon) -> None:
    """An orchestrator that lacks the worker's token: each attempt is refused (401), the worker is taken out
    of placement until its next poll, and after three attempts the task fails WORKER_FAILED."""
    with run_orcd(tmp) as bare, httpx.Client(base_url=bare.url, timeout=60) as c:
        assert c.post("/v2/workers", json={"worker_id": "w-test", "url": worker.url}).status_code == 201
        events = run_task(c, task_body(model="SmolLM2-135M-Instruct.Q4_1"))
    error = events[-1][1]
    assert [e["type"] for _, e in events] == ["queued", "error"]
    assert error["code"] == "WORKER_FAILED" and "AUTH_FAILED" in error["message"]
