"""Shared helpers of the orchestrator tests: the real `rbees-orcd` as a subprocess, real workers spawned by
`rbees-pool` (registered through their ready callback), and SSE reading.

Every orchestrator started here is stopped when its context exits (and must exit 0 on SIGTERM); the pool
fixture of each module fails if a worker is still running under its root at the end.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from test_pool_support import run_json, run_pool
from worker_harness import daemon_env, free_port

ORCD = Path(sys.executable).parent / "rbees-orcd"
MODEL = "smol"
WAIT_S = 120.0


@dataclass
class Orcd:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    db: Path

    def logs(self) -> list[dict[str, Any]]:
        """Its JSON log lines so far (every line must be one JSON object)."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def run_orcd(tmp: Path, *args: str, db: Path | None = None, port: int | None = None) -> Iterator[Orcd]:
    """Start `rbees-orcd` on loopback (short health interval unless `args` say otherwise); stopped on exit."""
    port = port or free_port()
    db = db or tmp / f"orcd-{port}.sqlite"
    log_path = tmp / f"orcd-{port}.log"
    cmd = [str(ORCD), "--bind", f"127.0.0.1:{port}", "--db", str(db), "--health-interval", "0.5", *args]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=daemon_env())
    orcd = Orcd(proc, f"http://127.0.0.1:{port}", log_path, db)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"rbees-orcd exited with {proc.returncode}: {log_path.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{orcd.url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        yield orcd
    finally:
        code = orcd.stop()
    assert code == 0, f"rbees-orcd exited with {code}: {log_path.read_text()[-3000:]}"


def pool_with_model(root: Path, model_path: Path) -> Path:
    """A pool root with the real test model registered (file://) and downloaded as `smol`."""
    source = f"file://{model_path}"
    assert run_pool(root, "models", "register", MODEL, "--name", MODEL, "--source", source).returncode == 0
    assert run_pool(root, "models", "download", MODEL, "--quiet").returncode == 0
    return root


def spawn_worker(root: Path, callback_url: str, slots: int = 2) -> dict[str, Any]:
    """A CPU worker spawned by rbees-pool, Ready, with its ready callback pointed at `callback_url`."""
    return run_json(root, "worker", "spawn", "cpu", "--model", MODEL, "--slots", str(slots), "--callback-url",
                    callback_url)  # fmt: skip


def workers(url: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    return {w["worker_id"]: w for w in httpx.get(f"{url}/v2/workers", timeout=10, **kwargs).json()["workers"]}


def wait_for(predicate: Any, what: str, timeout: float = WAIT_S) -> Any:
    """Poll `predicate` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_worker_state(url: str, worker_id: str, state: str | None, timeout: float = WAIT_S) -> None:
    """Until the worker has `state` (None: until it is no longer registered)."""

    def reached() -> bool:
        worker = workers(url).get(worker_id)
        return worker is None if state is None else worker is not None and worker["state"] == state

    wait_for(reached, f"worker {worker_id} to be {state or 'removed'}", timeout)


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of /metrics (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and (labels is None or labels.items() <= sample.labels.items()):
                return sample.value
    return 0.0


def task_body(prompt: str = "The capital of France is", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, **fields}


def read_events(response: httpx.Response) -> Iterator[tuple[int, dict[str, Any]]]:
    """The (id, data) of each event of a task's SSE stream, as they arrive."""
    event_id: int | None = None
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            assert event_id is not None, "an event without its id"
            yield event_id, json.loads(line[6:])
            event_id = None
        else:
            assert line == "", f"unexpected SSE line {line!r}"


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    r = client.post("/v2/tasks", json=body)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def run_task(client: httpx.Client, body: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Submit a task and read its events to the end."""
    job_id = submit(client, body)
    with client.stream("GET", f"/v2/tasks/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return list(read_events(r))


def text_of(events: list[tuple[int, dict[str, Any]]]) -> str:
    return "".join(e["t"] for _, e in events if e["type"] == "token")
