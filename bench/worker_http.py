"""Benchmark the worker daemon over HTTP: time to first token, tokens/s at 1/4/8 concurrent streams,
and the HTTP+SSE overhead per token against `rbees-workerd bench` on the same model.

    .venv/bin/python bench/worker_http.py --model models-cache/SmolLM2-135M-Instruct.Q4_1.gguf

Starts its own `rbees-workerd` (or uses --url), runs the concurrency levels after a warm-up,
interleaved `--rounds` times, and prints for each level its median run (or one JSON object with
--json). "aggregate" counts every token over the level's wall time (prompts included); "decode
aggregate" the tokens after each stream's first over the span in which the streams decode. Each
ratio to one stream is the median over the rounds of that round's ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httptools
import httpx
import orjson

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"


class _Response:
    """httptools' callbacks for one /execute response: its body's SSE events, split and each
    `data:` line parsed as it arrives (chunked decoding is httptools', in C)."""

    def __init__(self, on_frame: Callable[[dict[str, Any]], None]) -> None:
        self._on_frame = on_frame
        self._pending = b""  # the start of an event whose blank line has not arrived yet
        self.complete = False

    def on_body(self, body: bytes) -> None:
        events = (self._pending + body).split(b"\n\n")
        self._pending = events.pop()
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    self._on_frame(orjson.loads(line[6:]))

    def on_message_complete(self) -> None:
        self.complete = True


async def _one_stream(url: SplitResult, job_id: str, max_tokens: int) -> dict[str, float]:
    """One /execute stream on a connection of its own, read without an HTTP client library: at 256 streams
    httpx took 55 us of the client's CPU a token (bench/serving_path.py), as much as the worker's serving
    path and engine together many times over, so that the client, not the worker, set the figure."""
    body = orjson.dumps({"job_id": job_id, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0})
    head = (f"POST /execute HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    engine_rate = 0.0

    def on_frame(frame: dict[str, Any]) -> None:
        nonlocal first, last, tokens, engine_rate
        if frame["type"] == "token":
            last = time.perf_counter()
            first = first or last
            if frame["i"] != tokens:
                raise RuntimeError(f"{job_id}: token frame {frame['i']} where {tokens} was due")
            tokens += 1
        elif frame["type"] == "metrics":
            engine_rate = frame["tokens_per_sec"]
        elif frame["type"] == "error":
            raise RuntimeError(f"{job_id}: {frame['code']}: {frame['message']}")

    response = _Response(on_frame)
    parser = httptools.HttpResponseParser(response)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(head.encode() + body)
        while not response.complete:
            data = await reader.read(1 << 16)
            if not data:
                raise ConnectionError("the worker closed the stream before its end")
            parser.feed_data(data)
            if parser.get_status_code() != 200:
                raise RuntimeError(f"/execute answered {parser.get_status_code()}")
    finally:
        writer.close()
    assert tokens, "no token frame"
    return {
        "ttft_s": first - t0,
        "tokens": tokens,
        "end_s": last - t0,
        "first_s": first - t0,
        "first_at": first,
        "last_at": last,
        "engine_tokens_per_sec": engine_rate,
    }


def measure(url: str, concurrency: int, max_tokens: int) -> dict[str, float]:
    """`run_level` on an event loop of its own (uvloop's where installed, as the worker's)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_level(url, concurrency, max_tokens))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_level(url, concurrency, max_tokens))


async def run_level(url: str, concurrency: int, max_tokens: int) -> dict[str, float]:
    """`concurrency` streams started together; aggregate tokens/s over the wall time of the level."""
    where = urlsplit(url)
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(_one_stream(where, f"bench-{concurrency}-{i}-{time.monotonic_ns()}", max_tokens) for i in range(concurrency))
    )
    wall = time.perf_counter() - t0
    timed = [r for r in results if r["end_s"] > r["first_s"] and r["engine_tokens_per_sec"] > 0]
    per_stream = [(r["tokens"] - 1) / (r["end_s"] - r["first_s"]) for r in timed]
    # same job, same time window: what the client saw per token minus what the engine spent per token
    overhead = [1000 / rate - 1000 / r["engine_tokens_per_sec"] for r, rate in zip(timed, per_stream, strict=True)]
    return {
        "concurrency": concurrency,
        **level_figures(results, wall),
        "per_stream_tokens_per_sec": round(statistics.mean(per_stream), 2),
        "engine_reported_tokens_per_sec": round(statistics.mean(r["engine_tokens_per_sec"] for r in results), 2),
        "http_overhead_ms_per_token": round(statistics.mean(overhead), 3),
    }


def level_figures(streams: list[dict[str, Any]], wall: float) -> dict[str, float]:
    """A level's figures from its streams' token counts, first and last tokens' stamps and times to first token
    (this bench's and bench/engine_burst.py's): every token over the wall time, and the tokens after each stream's
    first over the span from the first first token to the last token (the decode phase)."""
    total = sum(r["tokens"] for r in streams)
    span = max(r["last_at"] for r in streams) - min(r["first_at"] for r in streams)
    decode_rate = sum(r["tokens"] - 1 for r in streams) / span if span > 0 else 0.0
    return {
        "tokens": total,
        "wall_s": round(wall, 3),
        "aggregate_tokens_per_sec": round(total / wall, 2),
        "decode_aggregate_tokens_per_sec": round(decode_rate, 2),
        "ttft_ms_mean": round(1000 * statistics.mean(r["ttft_s"] for r in streams), 1),
        "ttft_ms_p50": round(1000 * statistics.median(r["ttft_s"] for r in streams), 1),
        "ttft_ms_max": round(1000 * max(r["ttft_s"] for r in streams), 1),
    }


def median_round(runs: list[dict[str, float]], key: str = "aggregate_tokens_per_sec") -> dict[str, float]:
    """The run of a level with the median `key` (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def engine_rate(model: str, max_tokens: int) -> float:
    """Single-sequence decode tokens/s of `rbees-workerd bench` on the same model (no HTTP)."""
    out = subprocess.run(
        [sys.executable, "-m", "rbees_workerd.cli", "bench", "--model", model, "--prompt-tokens", "24",
         "--gen-tokens", str(max_tokens), "--repeats", "3", "--json"],
        check=True, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1])["decode_tokens_per_sec"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(
    model: str, slots: int, context_length: int, backend: str = "cpu", gpu: int = 0, cache_dir: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A daemon on a free loopback port, returned once its /health says Ready (its Numba cache: `cache_dir`)."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "rbees_workerd.cli",
        "serve",
        "--worker-id",
        "bench",
        "--model",
        model,
        "--port",
        str(port),
        "--slots",
        str(slots),
        "--context-length",
        str(context_length),
        "--backend",
        backend,
        "--gpu",
        str(gpu),
        "--log-level",
        "WARNING",
    ]
    cache_dir = cache_dir or os.environ.get("NUMBA_CACHE_DIR", str(REPO / ".numba-cache"))
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).json()["state"] == "Ready":
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the daemon did not become ready")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--url", help="an already running worker (skips starting one)")
    p.add_argument("--levels", default="1,4,8", help="concurrency levels")
    p.add_argument("--slots", type=int, help="slots of the daemon started (default: the largest level)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="times each level runs (interleaved); medians reported")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--no-engine", action="store_true", help="skip the `rbees-workerd bench` comparison")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    proc = None
    url = args.url
    if url is None:
        proc, url = start_daemon(args.model, args.slots or max(levels), args.context_length)
    try:
        measure(url, 1, 8)  # warm-up: first-call compilation and caches
        measure(url, max(levels), 8)
        # the levels interleaved, `rounds` times: a busy neighbour on a shared host then slows all of them alike
        rounds = [[measure(url, c, args.max_tokens) for c in levels] for _ in range(args.rounds)]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    results = [median_round([rnd[i] for rnd in rounds]) for i in range(len(levels))]
    report: dict[str, Any] = {"levels": results, "rounds": args.rounds}
    single = next((r for r in results if r["concurrency"] == 1), None)
    if single is not None and not args.no_engine:
        rate = engine_rate(args.model, args.max_tokens)
        report["workerd_bench_tokens_per_sec"] = round(rate, 2)
        report["vs_workerd_bench_ms_per_token"] = round(1000 / single["per_stream_tokens_per_sec"] - 1000 / rate, 3)
    if 1 in levels:  # each round's ratio to that round's single stream, then the median over the rounds
        one = levels.index(1)
        for i, r in enumerate(results):
            for key, name in (("aggregate_tokens_per_sec", "speedup_vs_1"),
                              ("decode_aggregate_tokens_per_sec", "decode_speedup_vs_1")):  # fmt: skip
                r[name] = round(statistics.median(rnd[i][key] / rnd[one][key] for rnd in rounds), 2)
    if args.json:
        print(json.dumps(report))
        return
    cols = [
        "concurrency",
        "aggregate_tokens_per_sec",
        "speedup_vs_1",
        "decode_aggregate_tokens_per_sec",
        "decode_speedup_vs_1",
        "per_stream_tokens_per_sec",
        "ttft_ms_mean",
        "ttft_ms_p50",
        "ttft_ms_max",
        "engine_reported_tokens_per_sec",
        "http_overhead_ms_per_token",
    ]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r.get(c)) for c in cols))
    for key in ("workerd_bench_tokens_per_sec", "vs_workerd_bench_ms_per_token"):
        if key in report:
            print(f"{key}: {report[key]}")


if __name__ == "__main__":
    main()
