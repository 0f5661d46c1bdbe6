"""The worker's serving path alone: the real daemon (HTTP, engine process, frames, SSE) and the real Engine,
over a device whose every step takes a fixed time (`--step-ms`, waited for with the GIL released as a GPU wait
is) and does no math (bench/timed_engine.py, loaded by the engine process through Settings.engine_factory).

What a GPU worker's users get is bounded by what this path delivers per step: with `--step-ms 3.9` and 64
streams the engine gives 64 / 3.9 ms = 16,400 tokens/s (bench/cuda_bench.py's H100 figure at batch 64).

    python bench/serving_path.py --step-ms 3.9 --levels 1,16,64 --max-tokens 128

On a machine of few cores the bench client, the HTTP process and the engine process take turns on them, so each
level also reports each process's CPU time per token (psutil, user + system, over the level): the HTTP process's
figure is what the serving path costs, whatever the client's share of the cores.

The same file runs against an older tree (PYTHONPATH=that tree) for before/after figures (with the Engine of
that tree: before 2026-12-06's ninth session, this bench replaced the Engine itself, so the figures of those
sessions leave out the engine's own Python). A tree whose engine ran in the worker's own process (before
2026-12-07's engine process) takes its own copy of this file, which replaced Engine.load in that process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from timed_engine import load_timed  # noqa: E402


def serve(model: str, port: int, slots: int, step_ms: float, token_ms: float, step_tokens: int | None) -> None:
    """Run the real daemon whose engine process loads the real Engine over a timed device (timed_engine.py) in
    place of Engine.load."""
    from rbees_workerd.cli_serve import parse_settings
    from rbees_workerd.engine.tokenizer import Tokenizer
    from rbees_workerd.server import run

    cycle = Tokenizer.from_file(model).encode(" the keeper climbed the stairs of the lighthouse", add_special=False)
    argv = ["--worker-id", "serving-bench", "--model", model, "--port", str(port), "--slots", str(slots)]
    argv += ["--step-tokens", str(step_tokens)] if step_tokens else []
    settings = parse_settings([*argv, "--log-level", "WARNING"])
    factory = partial(load_timed, step_ms / 1000, cycle, token_s=token_ms / 1000)
    sys.exit(run(replace(settings, engine_factory=factory)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--step-ms", type=float, default=3.9)
    p.add_argument("--token-ms", type=float, default=0.0, help="a step's time per token, beside --step-ms")
    p.add_argument("--step-tokens", type=int, help="the worker's --step-tokens (default: its own)")
    p.add_argument("--levels", default="1,16,64")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the daemon process itself
    p.add_argument("--slots", type=int)
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    slots = args.slots or max(levels)
    if args.serve:
        serve(args.model, args.serve, slots, args.step_ms, args.token_ms, args.step_tokens)
        return
    import subprocess

    import httpx
    from worker_http import measure

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", str(port), "--model", args.model, "--slots", str(slots),
           "--step-ms", str(args.step_ms), "--token-ms", str(args.token_ms)]  # fmt: skip
    cmd += ["--step-tokens", str(args.step_tokens)] if args.step_tokens else []
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=5).json()["state"] == "Ready":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        measure(url, max(levels), 8)  # warm-up
        processes = _processes(proc.pid)
        rounds = [[_timed_level(processes, url, c, args.max_tokens) for c in levels] for _ in range(args.rounds)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    for i, level in enumerate(levels):
        engine_ceiling = 1000 / (args.step_ms + args.token_ms * level)  # a stream's tokens/s: steps of `level` tokens
        runs = sorted((r[i] for r in rounds), key=lambda r: r["decode_aggregate_tokens_per_sec"])
        med = runs[len(runs) // 2]
        row = {k: med[k] for k in ("concurrency", "aggregate_tokens_per_sec", "decode_aggregate_tokens_per_sec",
                                   "ttft_ms_mean", "ttft_ms_p50", "ttft_ms_max")}  # fmt: skip
        row.update({k: statistics.median(r[k] for r in runs) for k in _CPU_KEYS})  # each its own median of the rounds
        row["engine_tokens_per_sec"] = round(engine_ceiling * level, 1)
        row["decode_share_of_engine"] = round(med["decode_aggregate_tokens_per_sec"] / (engine_ceiling * level), 3)
        # the engine's own pace (each stream's metrics frame, first token to last, stamped in the engine process):
        # below 1 where the engine itself was slowed, not only the path from it to the client
        row["engine_own_share"] = round(med["engine_reported_tokens_per_sec"] / engine_ceiling, 3)
        print(json.dumps(row))


_CPU_KEYS = tuple(f"{name}_cpu_us_per_token" for name in ("http", "engine", "client"))


def _processes(daemon_pid: int) -> dict[str, psutil.Process]:
    """The daemon (HTTP), its engine process (its one spawned child) and this one (the client)."""
    daemon = psutil.Process(daemon_pid)
    (engine,) = [p for p in daemon.children() if "spawn_main" in " ".join(p.cmdline())]
    return {"http": daemon, "engine": engine, "client": psutil.Process()}


def _timed_level(processes: dict[str, psutil.Process], url: str, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """One level's run, with the CPU time each process spent in it per token delivered."""
    from worker_http import measure

    def cpu() -> dict[str, float]:
        return {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}

    before = cpu()
    result: dict[str, Any] = measure(url, concurrency, max_tokens)
    after = cpu()
    for name, key in zip(processes, _CPU_KEYS, strict=True):
        result[key] = round((after[name] - before[name]) / result["tokens"] * 1e6, 1)
    return result


if __name__ == "__main__":
    main()
