"""What rbees-orcd adds to a token stream, against a synthetic worker that emits worker-shaped SSE frames.

    .venv/bin/python bench/orcd_relay.py [--streams 64] [--step-rate 235] [--tokens 200] [--rounds 3]

Starts three processes: the synthetic worker (`source`, this file), a real `rbees-orcd`, and this client.
The source answers /health and /execute like rbees-workerd; every `1/step-rate` seconds it emits one token
frame to each open stream (a GPU worker's batched decode step), each stamped with the monotonic clock (which
every process on the host shares). The client opens `--streams` streams at once, directly to the source or
through the orchestrator (`/v2/tasks` + its events, or `/v1/completions` with `stream`), and records each
token's delay from its stamp, and each stream's first token from its request. Rounds alternate the paths.
Then the source emits as fast as it can (`--capacity-tokens` per stream) and the orchestrator's relay rate is
its tokens over its own CPU seconds (psutil), i.e. tokens/s on one core, and over the wall time. The paced
rounds report the orchestrator's CPU per token too (its CPU seconds in the round over the round's tokens, the
tasks' start and end included): the figure that sets how long the last of a step's 64 frames waits, and one
that a busy host disturbs less than the delays.

    ... bench/orcd_relay.py --worker http://127.0.0.1:8188 --tokens 128

streams the paced rounds from a running rbees-workerd instead (a GPU worker: its steps pace the tokens).
Its frames carry no stamp, so the rounds compare the paths by the gaps between a stream's tokens, their
first tokens and tokens/s; the capacity rounds still use the synthetic source.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httptools
import httpx
import numpy as np
import orjson
import psutil

REPO = Path(__file__).resolve().parents[1]
MODEL = "synthetic"
STEADY_AFTER = 5  # tokens of each stream left out of the per-token delays
PROMPT = "Once upon a time"


# ---- the synthetic worker ----------------------------------------------------------------------------
class _Source:
    """Streams waiting for their next step's frame; `step_rate` 0 means every stream writes flat out."""

    def __init__(self, step_rate: float) -> None:
        self.step_rate = step_rate
        self.streams: set[asyncio.Queue[int]] = set()

    async def ticker(self) -> None:
        if self.step_rate <= 0:
            return
        period = 1.0 / self.step_rate
        next_at = time.monotonic()
        while True:
            next_at += period
            stamp = time.monotonic_ns()
            for q in self.streams:
                q.put_nowait(stamp)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *headers = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length")), 0)
                body = await reader.readexactly(length) if length else b""
                if path == "/health":
                    doc = orjson.dumps({"status": "ok", "state": "Ready", "model": MODEL, "backend": "cpu",
                                        "device": "synthetic", "vram_bytes": 0, "slots_total": 4096,
                                        "slots_free": 4096})  # fmt: skip
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(doc), doc))  # fmt: skip
                elif path == "/execute" and method == "POST":
                    await self._execute(orjson.loads(body), writer)
                else:
                    writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def _execute(self, req: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        def chunk(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data)

        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        started = {"type": "started", "job_id": req["job_id"], "model": MODEL, "started_at": "now", "prompt_tokens": 8}
        writer.write(chunk(b"data: " + orjson.dumps(started) + b"\n\n"))
        n = int(req["max_tokens"])
        if self.step_rate > 0:
            steps: asyncio.Queue[int] = asyncio.Queue()
            self.streams.add(steps)
            try:
                for i in range(n):
                    stamp = await steps.get()
                    writer.write(chunk(b'data: {"type":"token","t":" tok","i":%d,"ts":%d}\n\n' % (i, stamp)))
            finally:
                self.streams.discard(steps)
        else:
            for first in range(0, n, 64):
                stamp = time.monotonic_ns()
                frames = b"".join(b'data: {"type":"token","t":" tok","i":%d,"ts":%d}\n\n' % (i, stamp)
                                  for i in range(first, min(n, first + 64)))  # fmt: skip
                writer.write(chunk(frames))
                await writer.drain()
        end = {"type": "end", "tokens_out": n, "decode_time_ms": 1.0, "stop_reason": "MAX_TOKENS"}
        writer.write(chunk(b"data: " + orjson.dumps(end) + b"\n\n") + b"0\r\n\r\n")


async def _serve_source(port: int, step_rate: float) -> None:
    source = _Source(step_rate)
    server = await asyncio.start_server(source.handle, "127.0.0.1", port, backlog=1024)
    ticker = asyncio.create_task(source.ticker())
    async with server:
        await server.serve_forever()
    ticker.cancel()


# ---- the client --------------------------------------------------------------------------------------
class _Stream:
    """One HTTP/1.1 response read with httptools; token delays are taken as each chunk arrives."""

    def __init__(self, started: float, collect: bool = False) -> None:
        self.started = started
        self.collect = collect  # keep the body (a JSON answer) instead of reading SSE
        self.status = 0
        self.body = b""
        self.pending = b""
        self.done = False
        self.first_token: float | None = None
        self.delays_ns: list[int] = []
        self.arrivals_ns: list[int] = []  # each token's arrival (a real worker's frames carry no stamp)
        self.tokens = 0

    def on_status(self, _: bytes) -> None:
        pass

    def on_body(self, data: bytes) -> None:
        if self.collect:
            self.body += data
            return
        now = time.monotonic_ns()
        self.pending += data
        *events, self.pending = self.pending.split(b"\n\n")
        for event in events:
            at = event.find(b"data: ")
            if at < 0:
                continue
            raw = event[at + 6 :]
            if raw == b"[DONE]":
                continue
            frame = orjson.loads(raw)
            choices = frame.get("choices")  # an OpenAI chunk carries no stamp: only its arrival counts
            if frame.get("type") == "token" or choices and choices[0]["finish_reason"] is None:
                self.tokens += 1
                self.arrivals_ns.append(now)
                if self.first_token is None:
                    self.first_token = time.perf_counter()
                stamp = frame.get("ts")
                if stamp is not None:
                    self.delays_ns.append(now - stamp)

    def on_message_complete(self) -> None:
        self.done = True


async def _request(port: int, method: str, path: str, body: dict[str, Any] | None, stream: _Stream) -> _Stream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = orjson.dumps(body) if body is not None else b""
    writer.write(b"%s %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (method.encode(), path.encode(), len(payload), payload))  # fmt: skip
    parser = httptools.HttpResponseParser(stream)
    while not stream.done:
        data = await reader.read(1 << 16)
        if not data:
            break
        parser.feed_data(data)
    stream.status = parser.get_status_code()
    writer.close()
    return stream


async def _one(path: str, source_port: int, orcd_port: int, tokens: int, seq: int, model: str) -> _Stream:
    stream = _Stream(time.perf_counter())
    if path == "direct":
        body = {"job_id": f"b-{seq}-{time.monotonic_ns()}", "prompt": PROMPT, "max_tokens": tokens}
        return await _request(source_port, "POST", "/execute", body, stream)
    if path == "openai":
        body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "stream": True}
        return await _request(orcd_port, "POST", "/v1/completions", body, stream)
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens}
    accepted = await _request(orcd_port, "POST", "/v2/tasks", body, _Stream(stream.started, collect=True))
    assert accepted.status == 202, accepted.body
    return await _request(orcd_port, "GET", f"/v2/tasks/{orjson.loads(accepted.body)['job_id']}/events", None, stream)


async def _level(path: str, streams: int, tokens: int, ports: tuple[int, int], model: str = MODEL) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_one(path, *ports, tokens, i, model) for i in range(streams)))
    wall = time.perf_counter() - t0
    # (a real worker's stream may end early, at the model's end of text)
    complete = all(r.tokens == tokens or model != MODEL and r.tokens > 0 for r in results)
    assert complete, (path, [r.tokens for r in results][:4])
    gaps = sorted(int(g) for r in results for g in np.diff(r.arrivals_ns[STEADY_AFTER:]))
    # steady state: each stream's first tokens, while 64 streams connect at once, are the first-token figures
    delays = sorted(d for r in results for d in r.delays_ns[STEADY_AFTER:])
    ttft = sorted((r.first_token or 0) - r.started for r in results)
    return {
        "path": path,
        "tokens": sum(r.tokens for r in results),
        "wall_s": wall,
        "delay_p50_ms": delays[len(delays) // 2] / 1e6 if delays else None,
        "delay_p99_ms": delays[int(len(delays) * 0.99)] / 1e6 if delays else None,
        "ttft_p50_ms": ttft[len(ttft) // 2] * 1e3,
        "ttft_p99_ms": ttft[int(len(ttft) * 0.99)] * 1e3,
        "gap_p50_ms": gaps[len(gaps) // 2] / 1e6 if gaps else None,
        "gap_p99_ms": gaps[int(len(gaps) * 0.99)] / 1e6 if gaps else None,
    }


# ---- running it all ----------------------------------------------------------------------------------
def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} never answered")


def _run_source(port: int, step_rate: float, log_dir: Path) -> subprocess.Popen[bytes]:
    proc = _start([sys.executable, __file__, "source", "--port", str(port), "--step-rate", str(step_rate)],
                  log_dir / f"source-{port}.log")  # fmt: skip
    _wait_http(f"http://127.0.0.1:{port}/health")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "source"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--step-rate", type=float, default=235.0, help="source steps/s (a token per stream per step)")
    p.add_argument("--tokens", type=int, default=200, help="tokens per stream in the paced rounds")
    p.add_argument("--capacity-tokens", type=int, default=2000, help="tokens per stream, source flat out")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", help="a running rbees-workerd (its URL): the paced rounds stream from it instead")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.mode == "source":
        import uvloop

        uvloop.run(_serve_source(args.port, args.step_rate))
        return
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"orcd-bench-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    paced_port, flat_port, orcd_port = _free_port(), _free_port(), _free_port()
    procs = [_run_source(paced_port, args.step_rate, log_dir), _run_source(flat_port, 0, log_dir)]
    orcd = _start([sys.executable, "-m", "rbees_orcd.cli", "--bind", f"127.0.0.1:{orcd_port}", "--db",
                   str(log_dir / "orcd.sqlite"), "--max-queue", "4096", "--log-level", "WARNING"],
                  log_dir / "orcd.log")  # fmt: skip
    procs.append(orcd)
    try:
        _wait_http(f"http://127.0.0.1:{orcd_port}/health")
        orcd_url = f"http://127.0.0.1:{orcd_port}"
        paced_url = args.worker or f"http://127.0.0.1:{paced_port}"
        model = httpx.get(f"{paced_url}/health").json()["model"]
        register = {"worker_id": "paced", "url": paced_url}
        assert httpx.post(f"{orcd_url}/v2/workers", json=register).status_code == 201
        paced: dict[str, list[dict[str, Any]]] = {"direct": [], "v2": [], "openai": []}
        process = psutil.Process(orcd.pid)
        ports = (int(paced_url.rsplit(":", 1)[1].rstrip("/")), orcd_port)
        for _ in range(args.rounds):
            for path in paced:
                cpu0 = sum(process.cpu_times()[:2])
                row = asyncio.run(_level(path, args.streams, args.tokens, ports, model))
                cpu = sum(process.cpu_times()[:2]) - cpu0
                row["orcd_cpu_share"] = cpu / row["wall_s"]
                row["orcd_cpu_us_per_token"] = cpu * 1e6 / row["tokens"]
                paced[path].append(row)
        assert httpx.delete(f"{orcd_url}/v2/workers/paced").status_code == 204
        register = {"worker_id": "flat", "url": f"http://127.0.0.1:{flat_port}"}
        assert httpx.post(f"{orcd_url}/v2/workers", json=register).status_code == 201
        capacity = {}
        for path in ("direct", "v2", "openai"):
            cpu0 = sum(process.cpu_times()[:2])
            row = asyncio.run(_level(path, args.streams, args.capacity_tokens, (flat_port, orcd_port)))
            cpu = sum(process.cpu_times()[:2]) - cpu0
            row["orcd_cpu_s"] = cpu
            row["tokens_per_s_wall"] = row["tokens"] / row["wall_s"]
            row["tokens_per_orcd_cpu_s"] = row["tokens"] / cpu if path != "direct" and cpu > 0 else None
            capacity[path] = row
    finally:
        for proc in procs:
            _stop(proc)
    report = {"args": vars(args), "paced": paced, "capacity": capacity}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.streams} streams x {args.tokens} tokens, source step rate {args.step_rate:g}/s "
          f"({args.streams * args.step_rate:,.0f} tok/s offered); medians of {args.rounds} rounds")  # fmt: skip
    print(
        "| path | tok/s | token delay p50 (ms) | p99 (ms) | token gap p50 (ms) | p99 (ms) | first token p50 (ms) "
        "| p99 (ms) | orcd CPU | orcd CPU per token (µs) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path, rows in paced.items():
        print(f"| {path} | {sum(r['tokens'] for r in rows) / sum(r['wall_s'] for r in rows):,.0f} | "
              f"{_fmt(_median(rows, 'delay_p50_ms'), 2)} | {_fmt(_median(rows, 'delay_p99_ms'), 2)} | "
              f"{_fmt(_median(rows, 'gap_p50_ms'), 2)} | {_fmt(_median(rows, 'gap_p99_ms'), 2)} | "
              f"{_fmt(_median(rows, 'ttft_p50_ms'), 1)} | {_fmt(_median(rows, 'ttft_p99_ms'), 1)} | "
              f"{_median(rows, 'orcd_cpu_share'):.0%} | {_median(rows, 'orcd_cpu_us_per_token'):.1f} |")  # fmt: skip
    base = paced["direct"]

    def added(rows: list[dict[str, Any]], key: str, digits: int) -> str:
        value, reference = _median(rows, key), _median(base, key)
        return "-" if value is None or reference is None else f"{value - reference:.{digits}f}"

    for path in ("v2", "openai"):
        rows = paced[path]
        print(f"added by orcd ({path}): per token p50 {added(rows, 'delay_p50_ms', 2)} ms, "
              f"p99 {added(rows, 'delay_p99_ms', 2)} ms; token gap p99 {added(rows, 'gap_p99_ms', 2)} ms; "
              f"first token p50 {added(rows, 'ttft_p50_ms', 1)} ms, "
              f"p99 {added(rows, 'ttft_p99_ms', 1)} ms")  # fmt: skip
    print(f"\ncapacity: {args.streams} streams x {args.capacity_tokens} tokens, source flat out")
    print("| path | tokens | wall tok/s | orcd CPU s | tokens per orcd CPU second |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path, row in capacity.items():
        per_cpu = f"{row['tokens_per_orcd_cpu_s']:,.0f}" if row["tokens_per_orcd_cpu_s"] else "-"
        print(f"| {path} | {row['tokens']:,} | {row['tokens_per_s_wall']:,.0f} | {row['orcd_cpu_s']:.2f} | {per_cpu} |")


if __name__ == "__main__":
    main()
