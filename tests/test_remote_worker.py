"""End to end through a real sshd: the real SmolLM2 model registered and downloaded on a "host", a real CPU
worker spawned there with `rbees pool worker spawn --host`, and `rbees infer` streaming from it."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
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
from orcd_harness import run_orcd
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
    marker = f"rbees-test-marker-{uuid.uuid4().hex}"
    received = _read_until(proc.stdout.fileno(), b"\n", 60)  # the tail: `logs -f` is following now
    with fleet.log().open("a") as log:
        log.write(json.dumps({"ts": "2030-01-01T00:00:00.000Z", "level": "INFO", "human": marker}) + "\n")
    shown = f"2030-01-01T00:00:00.000Z INFO    {marker}\n".encode()  # the readable form of that JSON line
    received += _read_until(proc.stdout.fileno(), shown, 60)
    assert shown in received  # appended after the command started, streamed while it runs

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


class _CuttingProxy:
    """Passes requests through to the real rbees-orcd, but cuts the first events stream it relays after three
    events (a dropped connection, which cannot be produced otherwise), so that the client has to resume with
    Last-Event-ID. It records the Last-Event-ID of each resumed stream."""

    def __init__(self, orcd_url: str) -> None:
        self.orcd_url = orcd_url
        self.resumed_from: list[str] = []
        self.cut = False

    def handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                r = httpx.post(proxy.orcd_url + self.path, content=body, headers=self._forwarded(), timeout=60)
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self) -> None:  # noqa: N802
                if "Last-Event-ID" in self.headers:
                    proxy.resumed_from.append(self.headers["Last-Event-ID"])
                cut_after = None if proxy.cut else 3
                proxy.cut = True
                with httpx.stream("GET", proxy.orcd_url + self.path, headers=self._forwarded(), timeout=120) as r:
                    self.send_response(r.status_code)
                    self.send_header("Content-Type", r.headers.get("content-type", "text/event-stream"))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    sent = 0
                    for line in r.iter_lines():
                        self.wfile.write(line.encode() + b"\n")
                        self.wfile.flush()
                        sent += line == ""
                        if sent == cut_after:
                            return  # the connection drops here

            def _forwarded(self) -> dict[str, str]:
                names = ("Authorization", "Last-Event-ID", "Content-Type")
                return {name: self.headers[name] for name in names if name in self.headers}

        return Handler


def test_infer_through_the_orchestrator(fleet: Fleet, tmp_path: Path) -> None:
    token = "orcd-" + uuid.uuid4().hex
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    expected = _direct_text(fleet.url, PROMPT, 12)
    with run_orcd(tmp_path, "--api-token-file", str(token_file)) as orcd:
        auth = {"Authorization": f"Bearer {token}"}
        added = httpx.post(f"{orcd.url}/v2/workers", json={"worker_id": fleet.worker["worker_id"], "url": fleet.url},
                           headers=auth, timeout=30)  # fmt: skip
        assert added.status_code == 201, added.text
        args = ["infer", "--orcd", orcd.url, "--model", "smol", "--max-tokens", "12", "--temperature", "0", PROMPT]
        done = fleet.client.run(*args, "--token-file", str(token_file))
        assert done.returncode == 0 and done.stdout == expected + "\n", done.stderr
        refused = fleet.client.run(*args, RBEES_API_TOKEN="wrong")
        assert refused.returncode == ExitCode.AUTH_FAILED and "401" in refused.stderr
        in_env = fleet.client.run(*args, "--json", RBEES_API_TOKEN=token)
        assert in_env.returncode == 0 and json.loads(in_env.stdout)["text"] == expected

        proxy = _CuttingProxy(orcd.url)
        with serve(proxy.handler()) as url:
            cut = fleet.client.run("infer", "--orcd", url, *args[3:], RBEES_API_TOKEN=token)
        assert cut.returncode == 0 and cut.stdout == expected + "\n", cut.stderr
        assert proxy.resumed_from == ["2"]  # resumed after its third event (ids count from 0)

        job = _interrupted(fleet.client, "--orcd", orcd.url, "--model", "smol", RBEES_API_TOKEN=token)
        events = httpx.get(f"{orcd.url}/v2/tasks/{job[1]}/events", headers=auth, timeout=30).text
        assert '"stop_reason":"CANCELLED"' in events.replace(" ", ""), events[-500:]
    health = _health(fleet.url)
    assert health["slots_free"] == health["slots_total"]
