"""End to end through a real sshd: the real SmolLM2 model registered and downloaded on a "host", a real CPU
worker spawned there with `rbees pool worker spawn --host`, and `rbees infer` streaming from it."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sshd_harness import POOL, Client, Sshd, make_client, run_in_terminal, run_sshd
from test_pool_support import assert_nothing_left_running, serve
from worker_harness import execute_body, free_port, stream_job

from rbees.exitcodes import ExitCode

PROMPT = "The capital of France is"
LONG_PROMPT = "Here is a very long story about a dragon, told in many chapters. Chapter one:"


@dataclass
class Fleet:
    client: Client
    sshd: Sshd
    worker: dict[str, Any]  # the `worker spawn --json` document

    @property
    def url(self) -> str:
        return self.worker["url"]

    def log(self) -> Path:
        return self.sshd.default_home / ".runtime" / "workers" / f"{self.worker['worker_id']}.log"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Fleet]:
    with run_sshd(tmp_path_factory.mktemp("sshd")) as sshd:
        home = tmp_path_factory.mktemp("operator")
        client = make_client(home, sshd, f'[hosts.a]\nssh = "a"\nrbees_pool = "{POOL}"\n')
        source = f"file://{model_path}"
        registered = client.run("pool", "models", "register", "smol", "--name", "SmolLM2", "--source", source,
                                "--host", "a")  # fmt: skip
        assert registered.returncode == 0, registered.stderr
        downloaded = client.run_json("pool", "models", "download", "smol", "--host", "a")
        assert downloaded["downloaded"] and downloaded["size_bytes"] == model_path.stat().st_size
        spawned = client.run("pool", "worker", "spawn", "cpu", "--model", "smol", "--slots", "2", "--json",
                             "--host", "a", timeout=900)  # fmt: skip
        try:
            assert spawned.returncode == 0, spawned.stderr
            worker_id = json.loads(spawned.stdout)["worker_id"]
            yield Fleet(client, sshd, json.loads(spawned.stdout))
            stopped = client.run("pool", "worker", "stop", worker_id, "--host", "a")
            assert (stopped.returncode, stopped.stdout) == (0, f"{worker_id}: stopped\n"), stopped.stderr
            assert client.run_json("pool", "worker", "list", "--host", "a")["workers"] == []
        finally:
            assert_nothing_left_running(str(sshd.default_home))  # kills what is left, and fails if anything was


def _direct_text(url: str, prompt: str, max_tokens: int) -> str:
    frames = stream_job(url, execute_body(f"direct-{uuid.uuid4().hex[:8]}", prompt, max_tokens=max_tokens))
    assert frames[-1]["type"] == "end", frames[-1]
    return "".join(frame["t"] for frame in frames if frame["type"] == "token")


def _health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=10).json()


def test_spawned_worker_is_listed_and_executes_through_its_url(fleet: Fleet) -> None:
    assert fleet.worker["state"] == "Ready" and fleet.worker["model_id"] == "smol"
    listed = fleet.client.run_json("pool", "worker", "list", "--host", "a")
    assert [(w["worker_id"], w["state"]) for w in listed["workers"]] == [(fleet.worker["worker_id"], "Ready")]
    assert fleet.worker["worker_id"] in fleet.client.run("pool", "status", "--host", "a").stdout
    assert _direct_text(fleet.url, PROMPT, 8)  # the URL the pool printed serves the model


def test_infer_streams_the_answer_and_reports_its_rate(fleet: Fleet) -> None:
    expected = _direct_text(fleet.url, PROMPT, 12)
    done = fleet.client.run("infer", "--worker", fleet.url, "--max-tokens", "12", "--temperature", "0", PROMPT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n" and re.search(r"\d+ tokens, [\d.]+ tokens/s", done.stderr), done.stderr

    line = fleet.client.run("infer", "--worker", fleet.url, "--max-tokens", "12", "--temperature", "0", "--json",
                            "--model", "smol", PROMPT)  # fmt: skip
    assert line.returncode == 0 and line.stdout.count("\n") == 1, line.stdout
    doc = json.loads(line.stdout)
    assert doc["text"] == expected and doc["model"] == "smol" and doc["stop_reason"] in ("MAX_TOKENS", "EOS")
    assert doc["tokens_out"] <= 12 and doc["tokens_per_sec"] > 0 and doc["time_to_first_token_ms"] > 0


def test_infer_failures_have_their_codes(fleet: Fleet) -> None:
    cases = [
        (["--worker", fleet.url, "--model", "other"], ExitCode.USAGE, "serves 'smol', not 'other'"),
        (["--worker", f"http://127.0.0.1:{free_port()}"], ExitCode.UNREACHABLE, "UNREACHABLE"),
        (["--worker", fleet.url, "--max-tokens", "999999"], ExitCode.USAGE, "max_tokens"),
        ([], ExitCode.USAGE, "--orcd URL or --worker URL"),
    ]
    for flags, code, text in cases:
        done = fleet.client.run("infer", *flags, PROMPT)
        assert (done.returncode, text in done.stderr) == (code, True), (flags, done.stderr)


def _interrupted(client: Client, *args: str, **env: str) -> re.Match[str]:
    """Start a long `rbees infer`, press Ctrl-C (a real SIGINT) once text has arrived; it must say that the
    server cancelled the job, and exit 130."""
    proc = client.popen("infer", *args, "--max-tokens", "2000", "--temperature", "0", LONG_PROMPT, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    assert ready and os.read(proc.stdout.fileno(), 4096), "no token streamed"  # text arrives while it generates
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == ExitCode.INTERRUPTED
    stderr = proc.stderr.read().decode()
    job = re.search(r"job ([\w-]+) cancelled on the server after (\d+) tokens \(stop reason CANCELLED\)", stderr)
    assert job and 0 < int(job[2]) < 2000, stderr
    return job


def test_ctrl_c_cancels_the_job_on_the_worker(fleet: Fleet) -> None:
    job = _interrupted(fleet.client, "--worker", fleet.url)
    deadline = time.monotonic() + 30
    while f"job {job[1]} ended (CANCELLED)" not in fleet.log().read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    logs = fleet.client.run("pool", "worker", "logs", fleet.worker["worker_id"], "--host", "a").stdout
    assert f"job {job[1]} ended (CANCELLED)" in logs
    health = _health(fleet.url)
    assert health["slots_free"] == health["slots_total"]


def test_logs_follow_live_and_a_killed_remote_command_is_reported(fleet: Fleet) -> None:
    proc = fleet.client.popen("pool", "worker", "logs", fleet.worker["worker_id"], "-f", "-n", "1", "--host", "a",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    marker = f'{{"human": "rbees-test-marker-{uuid.uuid4().hex}"}}'
    received = _read_until(proc.stdout.fileno(), b"\n", 60)  # the tail: `logs -f` is following now
    with fleet.log().open("a") as log:
        log.write(marker + "\n")
    received += _read_until(proc.stdout.fileno(), marker.encode(), 60)
    assert marker.encode() in received  # appended after the command started, streamed while it runs

    followers = [p for p in psutil.process_iter(["cmdline"]) if _is_remote_follower(p.info["cmdline"] or [])]
    assert len(followers) == 1, followers
    followers[0].kill()
    assert proc.wait(60) == ExitCode.REMOTE_LOST
    lines = proc.stderr.read().decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: REMOTE_LOST: a: no exit status"), lines


def test_ctrl_c_on_a_terminal_reaches_the_remote_command(fleet: Fleet) -> None:
    code, shown = run_in_terminal(fleet.client, "pool", "worker", "logs", fleet.worker["worker_id"], "-f", "-n", "1",
                                  "--host", "a", interrupt_after=b"\n")  # fmt: skip
    # ^C went through the remote terminal (which echoed it) to rbees-pool, which ended as typer does on SIGINT
    # (exit 130, passed through); had rbees hung up instead it would say so (error: ...)
    assert code == 130 and "^C" in shown and "error:" not in shown, shown
    deadline = time.monotonic() + 10
    while any(_is_remote_follower(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        assert time.monotonic() < deadline, "the remote `logs -f` outlived Ctrl-C"
        time.sleep(0.1)


def test_a_worker_killed_mid_answer_is_reported(fleet: Fleet) -> None:
    doomed = fleet.client.run_json("pool", "worker", "spawn", "cpu", "--model", "smol", "--slots", "1", "--host", "a")
    proc = fleet.client.popen("infer", "--worker", doomed["url"], "--max-tokens", "2000", "--temperature", "0",
                              LONG_PROMPT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert _read_until(proc.stdout.fileno(), b" ", 120)  # the answer is streaming
    psutil.Process(doomed["pid"]).kill()
    assert proc.wait(60) == ExitCode.REMOTE_LOST
    lines = proc.stderr.read().decode().strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: REMOTE_LOST: job rbees-\w+ lost after \d+ tokens", lines[0]), lines
    listed = fleet.client.run_json("pool", "worker", "list", "--host", "a")
    assert listed["removed_stale"] == [doomed["worker_id"]]  # the pool noticed too


def _is_remote_follower(cmdline: list[str]) -> bool:
    return any(part.endswith("rbees-pool") for part in cmdline) and "-f" in cmdline and "logs" in cmdline


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"{needle!r} did not arrive in {timeout} s; got {data!r}"
        chunk = os.read(fd, 65536)
        assert chunk, f"stream ended before {needle!r}; got {data!r}"
        data += chunk
    return data


class _StandInOrcd:
    """The part of rbees-orcd's `/v2/tasks` API that `rbees infer` uses (SPEC: rbees-orcd), relaying to one real
    worker. rbees-orcd is being built beside this CLI; until it lands this stands in for it. Its first events
    stream is cut after three events, so the client has to resume with Last-Event-ID."""

    def __init__(self, worker_url: str, token: str) -> None:
        self.worker_url, self.token = worker_url, token
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.changed = threading.Condition()
        self.resumed_from: list[str] = []
        self.cancelled: list[str] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        orcd = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                if not self._authorized():
                    return
                if self.path == "/v2/tasks":
                    job_id = orcd.submit(body)
                    self._json(202, {"job_id": job_id, "status": "queued", "queue_position": 0,
                                     "events_url": f"/v2/tasks/{job_id}/events"})  # fmt: skip
                else:
                    job_id = self.path.split("/")[3]
                    orcd.cancelled.append(job_id)
                    httpx.post(f"{orcd.worker_url}/cancel", json={"job_id": job_id}, timeout=10)
                    self._json(202, {"job_id": job_id, "status": "cancelling"})

            def do_GET(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                job_id = self.path.split("/")[3]
                resume = self.headers.get("Last-Event-ID")
                if resume is not None:
                    orcd.resumed_from.append(resume)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for sent, (index, event) in enumerate(orcd.follow(job_id, int(resume or 0)), start=1):
                    self.wfile.write(f"id: {index}\ndata: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                    if resume is None and sent == 3:
                        return  # cut: the client must come back with Last-Event-ID
                    if event["type"] in ("end", "error"):
                        return

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {orcd.token}":
                    return True
                self._json(401, {"code": "AUTH_FAILED", "message": "missing or wrong bearer token"})
                return False

            def _json(self, status: int, doc: dict[str, Any]) -> None:
                payload = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def submit(self, body: dict[str, Any]) -> str:
        job_id = f"task-{uuid.uuid4().hex[:12]}"
        self.events[job_id] = [{"type": "queued", "queue_position": 0}]
        work = {k: v for k, v in body.items() if k not in ("model", "priority")}
        threading.Thread(target=self._relay, args=(job_id, work), daemon=True).start()
        return job_id

    def _relay(self, job_id: str, body: dict[str, Any]) -> None:
        with httpx.stream("POST", f"{self.worker_url}/execute", json={"job_id": job_id, **body}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    with self.changed:
                        self.events[job_id].append(json.loads(line[6:]))
                        self.changed.notify_all()

    def follow(self, job_id: str, after: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """Events after the `after`-th (ids count from 1), as they come."""
        events = self.events[job_id]
        for index in range(after, 1 << 20):
            with self.changed:
                assert self.changed.wait_for(lambda i=index: len(events) > i, timeout=120)
                event = events[index]
            yield index + 1, event
            if event["type"] in ("end", "error"):
                return


def test_infer_through_the_orchestrator_tasks_api(fleet: Fleet, tmp_path: Path) -> None:
    token = "orcd-" + uuid.uuid4().hex
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    orcd = _StandInOrcd(fleet.url, token)
    expected = _direct_text(fleet.url, PROMPT, 12)
    with serve(orcd.handler()) as url:
        args = ["infer", "--orcd", url, "--model", "smol", "--max-tokens", "12", "--temperature", "0", PROMPT]
        done = fleet.client.run(*args, "--token-file", str(token_file))
        assert done.returncode == 0 and done.stdout == expected + "\n", done.stderr
        assert orcd.resumed_from == ["3"]  # the cut stream was resumed after the third event
        refused = fleet.client.run(*args, RBEES_API_TOKEN="wrong")
        assert refused.returncode == ExitCode.AUTH_FAILED and "401" in refused.stderr
        in_env = fleet.client.run(*args, "--json", RBEES_API_TOKEN=token)
        assert in_env.returncode == 0 and json.loads(in_env.stdout)["text"] == expected

        job = _interrupted(fleet.client, "--orcd", url, "--model", "smol", RBEES_API_TOKEN=token)
        assert orcd.cancelled == [job[1]]
    health = _health(fleet.url)
    assert health["slots_free"] == health["slots_total"]
