"""`rbees-pool worker ...` against the real rbees-workerd serving the real SmolLM2 model on the CPU.

Workers are real detached processes; the fixture kills anything still running under the pool root at the end
and fails if there was anything to kill."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from test_pool_support import POOL, assert_nothing_left_running, gguf_bytes, run_json, run_pool

from rbees_pool.exitcodes import ExitCode
from rbees_pool.host import gpus


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Path]:
    """A pool with the real model registered (file://) and downloaded, plus a corrupt GGUF."""
    root = tmp_path_factory.mktemp("workers") / "pool"
    corrupt = root.parent / "corrupt" / "broken.gguf"
    corrupt.parent.mkdir()
    corrupt.write_bytes(gguf_bytes("llama") + os.urandom(4096))  # a llama header, then no usable model
    for model_id, path in (("smol", model_path), ("broken", corrupt)):
        assert (
            run_pool(root, "models", "register", model_id, "--name", model_id, "--source", f"file://{path}").returncode
            == 0
        )
        assert run_pool(root, "models", "download", model_id, "--quiet").returncode == 0
    yield root
    assert_nothing_left_running(str(root))  # every worker a test spawned was stopped through the CLI


def _record(root: Path, worker_id: str) -> dict:
    return json.loads((root / ".runtime" / "workers" / f"{worker_id}.json").read_text())


def _wait_dead(pid: int) -> None:
    """Wait (bounded) until a SIGKILLed process is gone or a zombie."""
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        time.sleep(0.05)


def _wait_ready(url: str) -> None:
    """Wait (bounded) until a worker's /health says Ready."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).json()["state"] == "Ready":
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} was not Ready after 300 s")


def test_spawn_list_logs_stop(root: Path) -> None:
    first = run_json(root, "worker", "spawn", "cpu", "--model", "smol", "--slots", "1")
    worker_id, pid = first["worker_id"], first["pid"]
    assert first["state"] == "Ready" and first["url"] == f"http://127.0.0.1:{first['port']}"
    assert first["port"] >= 8001 and worker_id == f"w-smol-{first['port']}"
    record = _record(root, worker_id)
    assert {k: record[k] for k in ("pid", "backend", "model_id", "gpu", "port", "url")} == {
        "pid": pid, "backend": "cpu", "model_id": "smol", "gpu": None, "port": first["port"], "url": first["url"]
    }  # fmt: skip
    assert record["started_at"]
    # Detached: the CLI has exited, the worker runs on in its own session, reporting the catalog id.
    assert os.getsid(pid) == pid and psutil.Process(pid).is_running()
    health = httpx.get(f"{first['url']}/health", timeout=10).json()
    assert health["state"] == "Ready" and health["model"] == "smol" and health["slots_total"] == 1

    second = run_json(root, "worker", "spawn", "cpu", "--model", "smol", "--no-wait")
    third = run_json(root, "worker", "spawn", "cpu", "--model", "smol", "--no-wait")
    assert len({first["port"], second["port"], third["port"]}) == 3 and second["state"] == "Starting"
    taken = run_pool(root, "worker", "spawn", "cpu", "--model", "smol", "--port", str(first["port"]))
    assert taken.returncode == ExitCode.CONFLICT and "PORT_UNAVAILABLE" in taken.stderr

    # A worker killed behind the pool's back is reconciled away by `list`.
    os.killpg(third["pid"], signal.SIGKILL)
    _wait_dead(third["pid"])
    listed = run_json(root, "worker", "list")
    assert listed["removed_stale"] == [third["worker_id"]]
    states = {w["worker_id"]: w["state"] for w in listed["workers"]}
    assert states[worker_id] == "Ready" and set(states) == {worker_id, second["worker_id"]}
    assert worker_id in {w["worker_id"] for w in run_json(root, "status")["workers"]}

    in_use = run_pool(root, "models", "remove", "smol")  # a model a worker serves is not deleted under it
    assert in_use.returncode == ExitCode.CONFLICT and "MODEL_IN_USE" in in_use.stderr, in_use.stderr
    assert "smol" in {m["id"] for m in run_json(root, "models", "list")}

    logs = run_pool(root, "worker", "logs", worker_id)
    assert logs.returncode == 0 and worker_id in logs.stdout
    follower = subprocess.Popen([str(POOL), "--root", str(root), "worker", "logs", worker_id, "-f", "-n", "1"],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert follower.stdout is not None and follower.stdout.readline().strip()  # the tail: following from here
    stopped = run_pool(root, "worker", "stop", worker_id)
    assert stopped.returncode == 0 and f"{worker_id}: stopped" in stopped.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    out, _ = follower.communicate(timeout=60)  # `logs -f` ends once the worker is gone
    # the lines the worker wrote while stopping arrived through following, not the tail
    assert follower.returncode == 0 and "draining" in out and "stopped (exit 0)" in out, out

    # --timeout 0: a Ready worker drains on SIGTERM, so it is still there at once and gets SIGKILL.
    _wait_ready(second["url"])
    killed = run_pool(root, "worker", "stop", second["worker_id"], "--timeout", "0")
    assert killed.returncode == 0 and f"{second['worker_id']}: killed" in killed.stdout, killed.stdout
    _wait_dead(second["pid"])
    assert not psutil.pid_exists(second["pid"]) or psutil.Process(second["pid"]).status() == psutil.STATUS_ZOMBIE

    fourth = run_json(root, "worker", "spawn", "cpu", "--model", "smol", "--no-wait")
    stop_all = run_pool(root, "worker", "stop-all")
    assert stop_all.returncode == 0 and fourth["worker_id"] in stop_all.stdout
    assert run_json(root, "worker", "list") == {"workers": [], "removed_stale": []}
    assert run_pool(root, "worker", "stop", worker_id).returncode == ExitCode.NOT_FOUND


def test_worker_that_dies_while_loading_is_reported(root: Path) -> None:
    done = run_pool(root, "worker", "spawn", "cpu", "--model", "broken")
    assert done.returncode == ExitCode.WORKER_FAILED, done.stderr
    assert "WORKER_FAILED" in done.stderr and "MODEL_LOAD_FAILED" in done.stderr  # the log's tail is shown
    assert run_json(root, "worker", "list")["workers"] == []


def test_spawn_refusals(root: Path) -> None:
    cases = [
        (["worker", "spawn", "cpu", "--model", "nope"], ExitCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (["worker", "spawn", "tpu", "--model", "smol"], ExitCode.USAGE, "unknown backend"),
        (["worker", "spawn", "cpu", "--model", "smol", "--gpu", "0"], ExitCode.USAGE, "cuda backend only"),
        (["worker", "spawn", "cpu", "--model", "tinyllama"], ExitCode.NOT_DOWNLOADED, "models download tinyllama"),
        (["worker", "stop", "w-none"], ExitCode.NOT_FOUND, "WORKER_NOT_FOUND"),
        (["worker", "logs", "w-none"], ExitCode.NOT_FOUND, "WORKER_NOT_FOUND"),
    ]
    if not gpus():
        cases.append((["worker", "spawn", "cuda", "--model", "smol"], ExitCode.BACKEND_UNAVAILABLE, "NVIDIA GPU"))
    for args, code, text in cases:
        done = run_pool(root, *args)
        assert (done.returncode, text in done.stderr) == (code, True), (args, done.stderr)
    assert not list((root / ".runtime" / "workers").glob("*.json"))


def test_backends_and_status_describe_the_host(root: Path) -> None:
    backends = {b["name"]: b for b in run_json(root, "backends", "list")}
    assert backends["cpu"]["available"] is True and backends["cuda"]["available"] == bool(gpus())
    status = run_json(root, "status")
    assert status["host"]["cpu"]["cores_logical"] == os.cpu_count()
    assert status["host"]["ram"]["total_bytes"] == psutil.virtual_memory().total
    assert {"id": "smol", "downloaded": True} in status["models"]
    assert "cpu" in run_pool(root, "status").stdout


def test_spawn_with_callback_url_reports_ready_to_it(root: Path) -> None:
    """--callback-url reaches the worker: it POSTs its ready payload to a real loopback server."""
    from http.server import BaseHTTPRequestHandler

    from test_pool_support import serve

    received: list[dict] = []

    class Ready(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

    with serve(Ready) as url:
        callback = f"{url}/v2/workers/ready"
        spawned = run_json(root, "worker", "spawn", "cpu", "--model", "smol", "--callback-url", callback)
        try:
            deadline = time.monotonic() + 60
            while not received and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            assert run_pool(root, "worker", "stop", spawned["worker_id"]).returncode == 0
    assert received, "the worker never called back"
    payload = received[0]
    assert payload["worker_id"] == spawned["worker_id"] and payload["url"] == spawned["url"]
    assert payload["model_ref"] == "smol" and payload["backend"] == "cpu" and payload["slots_total"] >= 1


def test_spawn_options_are_refused_before_anything_starts(root: Path, tmp_path: Path) -> None:
    empty_token = tmp_path / "empty-token"
    empty_token.write_text("\n")
    cases = [
        (["--slots", "1000"], "--slots must be between 1 and 256"),
        (["--callback-url", "notaurl"], "--callback-url must be an http(s) URL"),
        (["--context-length", "8"], "--context-length must be between"),
        (["--api-token-file", str(tmp_path / "missing")], "cannot read API token file"),
        (["--api-token-file", str(empty_token)], "is empty"),
        (["--bind", "not-an-address"], "give an IP address"),
        (["--bind", "127.0.0.1:9000"], "the port is --port"),
        (["--bind", "203.0.113.7"], "no such address"),  # TEST-NET-3: never this host's
        (["--threads", "0"], "--threads"),
        (["--slots", "0"], "--slots"),
    ]
    logs_before = sorted((root / ".runtime" / "workers").glob("*.log"))
    for extra, text in cases:
        done = run_pool(root, "worker", "spawn", "cpu", "--model", "smol", *extra)
        assert (done.returncode, text in done.stderr) == (ExitCode.USAGE, True), (extra, done.stderr)
    from_env = run_pool(root, "worker", "spawn", "cpu", "--model", "smol", env={"WORKER_BIND_ADDR": "203.0.113.7:9"})
    assert from_env.returncode == ExitCode.USAGE and "--bind 203.0.113.7" in from_env.stderr, from_env.stderr
    assert not list((root / ".runtime" / "workers").glob("*.json"))
    assert sorted((root / ".runtime" / "workers").glob("*.log")) == logs_before  # no worker was started
    assert_nothing_left_running(str(root))


def test_spawn_passes_options_reports_progress_and_logs_every_run(root: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    args = ["worker", "spawn", "cpu", "--model", "smol", "--bind", "0.0.0.0", "--slots", "2",
            "--context-length", "256", "--api-token-file", str(token)]  # fmt: skip
    done = run_pool(root, *args, "--json")
    assert done.returncode == 0, done.stderr
    spawned = json.loads(done.stdout)  # stdout: the JSON alone; the progress went to stderr
    worker_id, url = spawned["worker_id"], spawned["url"]
    earlier = _log_before_last_run(root, worker_id)
    assert url == f"http://127.0.0.1:{spawned['port']}" and spawned["health"]["slots_total"] == 2
    progress = done.stderr.splitlines()
    assert any(line.startswith(f"{worker_id}: Loading") for line in progress), done.stderr
    assert re.fullmatch(rf"{worker_id}: Ready after \d+\.\ds", progress[-1]), done.stderr
    try:
        cmdline = psutil.Process(spawned["pid"]).cmdline()
        for flag, value in (("--bind", "0.0.0.0"), ("--slots", "2"), ("--context-length", "256"),
                            ("--api-token-file", str(token))):  # fmt: skip
            assert cmdline[cmdline.index(flag) + 1] == value, cmdline
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 401  # the token is required
        ready = httpx.get(f"{url}/ready", headers={"Authorization": "Bearer s3cret-token"}, timeout=10)
        assert ready.status_code == 200 and ready.json()["state"] == "Ready"
    finally:
        assert run_pool(root, "worker", "stop", worker_id).returncode == 0
    again = run_pool(root, *args, "--port", str(spawned["port"]))  # the same worker id again
    assert again.returncode == 0 and again.stdout.strip() == url, again.stderr
    assert run_pool(root, "worker", "stop", worker_id).returncode == 0

    log = (root / ".runtime" / "workers" / f"{worker_id}.log").read_bytes()
    assert log.startswith(earlier)  # every run appends: the runs of earlier tests are still there
    raw = run_pool(root, "worker", "logs", worker_id, "--json", "-n", "1000").stdout.splitlines()
    docs = [json.loads(line) for line in raw]  # --json: the raw JSON lines, every one of them
    ours = docs[len(earlier.splitlines()) :]
    starts = [d for d in ours if d["logger"] == "rbees-pool"]
    assert len(starts) == 2 and all("--slots 2 --context-length 256" in d["human"] for d in starts)
    assert sum("stopped (exit 0)" in d["human"] for d in ours) == 2
    people = run_pool(root, "worker", "logs", worker_id, "-n", "1000").stdout.splitlines()
    assert len(people) == len(raw) and not any(line.startswith("{") for line in people)
    listening = next(line for line in people if "listening on" in line)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO +listening on http://\S+  url=http://", listening)


def _log_before_last_run(root: Path, worker_id: str) -> bytes:
    """The worker's log up to the start line of its latest run."""
    lines = (root / ".runtime" / "workers" / f"{worker_id}.log").read_bytes().splitlines(keepends=True)
    return b"".join(lines[: max(i for i, line in enumerate(lines) if _is_start(line))])


def _is_start(line: bytes) -> bool:
    with contextlib.suppress(ValueError):
        return json.loads(line).get("logger") == "rbees-pool"
    return False


def test_ctrl_c_during_spawn_stops_the_worker(root: Path) -> None:
    spawning = subprocess.Popen([str(POOL), "--root", str(root), "worker", "spawn", "cpu", "--model", "smol"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    workers = root / ".runtime" / "workers"
    deadline = time.monotonic() + 60
    while not list(workers.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    record = json.loads(next(workers.glob("*.json")).read_text())
    spawning.send_signal(signal.SIGINT)
    out, err = spawning.communicate(timeout=120)
    assert spawning.returncode == ExitCode.INTERRUPTED == 130, err
    assert f"interrupted: stopping {record['worker_id']}" in err and "Traceback" not in err, err
    assert out == ""
    _wait_dead(record["pid"])
    assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not list(workers.glob("*.json"))


def test_spawn_on_a_terminal_shows_a_live_line(root: Path) -> None:
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([str(POOL), "--root", str(root), "worker", "spawn", "cpu", "--model", "smol"],
                            stdin=follower, stdout=follower, stderr=follower)  # fmt: skip
    os.close(follower)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the child closed the terminal
        while chunk := os.read(leader, 65536):
            shown += chunk
    os.close(leader)
    assert proc.wait(120) == 0
    text = shown.decode(errors="replace")
    url = re.search(r"http://127\.0\.0\.1:(\d+)", text)
    assert url is not None, text
    assert run_pool(root, "worker", "stop", f"w-smol-{url[1]}").returncode == 0
    assert re.search(r"w-smol-\d+: (Starting|Loading)[^\n]*\(\d+s\)", text), text  # the live line, with time
    assert "\x1b[" in text and re.search(r"Ready after \d+\.\ds", text), text


def test_threads_reach_the_worker(root: Path) -> None:
    spawned = run_json(root, "worker", "spawn", "cpu", "--model", "smol", "--threads", "1")
    try:
        cmdline = psutil.Process(spawned["pid"]).cmdline()
        assert cmdline[cmdline.index("--threads") + 1] == "1" and spawned["state"] == "Ready"
    finally:
        assert run_pool(root, "worker", "stop", spawned["worker_id"]).returncode == 0
