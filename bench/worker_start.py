"""Time the worker daemon from its start to Ready: cold (an empty Numba cache, so every kernel compiles) and warm.

    python3 bench/worker_start.py --model models-cache/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 bench/worker_start.py --model /root/dev/model.gguf --backend cuda --gpu 0 --json

Each start is a whole `rbees-workerd` process, timed from its launch until GET /health says Ready,
then stopped with SIGTERM. The first start gets a new, empty cache folder; the `--warm` starts after
it reuse that folder (with `--cache-dir`, only warm starts, on that folder). Also prints what /health
reported (device, vram_bytes) on the last start, and the worker's resident host memory then (its process's
and its children's: the engine's process holds the model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from worker_http import REPO, start_daemon


def _start(args: argparse.Namespace, cache_dir: str) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    proc, url = start_daemon(args.model, args.slots, args.context_length, args.backend, args.gpu, cache_dir)
    seconds = time.perf_counter() - t0
    try:
        health = httpx.get(f"{url}/health", timeout=5).json()
        worker = psutil.Process(proc.pid)
        health["rss_bytes"] = sum(p.memory_info().rss for p in [worker, *worker.children(recursive=True)])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    return seconds, health


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--backend", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--warm", type=int, default=3, help="warm starts after the cold one")
    p.add_argument("--cache-dir", help="time warm starts only, on this Numba cache (e.g. the benchmarks' own: "
                   "an 8B model's cold start compiles for minutes)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    given = contextlib.nullcontext(args.cache_dir) if args.cache_dir else None
    with given or tempfile.TemporaryDirectory(prefix="rbees-numba-") as cache_dir:
        cold = None if given else _start(args, cache_dir)[0]
        if cold is not None:
            print(f"cold start to Ready: {cold:.2f} s", file=sys.stderr, flush=True)  # (each as it comes: minutes)
        warm = []
        health: dict[str, object] = {}
        for _ in range(args.warm):
            seconds, health = _start(args, cache_dir)
            warm.append(seconds)
            print(f"warm start to Ready: {seconds:.2f} s", file=sys.stderr, flush=True)
        cache_mb = sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file()) / 1e6
    report = {
        "backend": args.backend,
        "device": health.get("device"),
        "vram_bytes": health.get("vram_bytes"),
        "rss_bytes": health.get("rss_bytes"),  # the worker's host memory once Ready (last start)
        "cold_start_s": None if cold is None else round(cold, 2),
        "warm_start_s": [round(s, 2) for s in warm],
        "warm_start_median_s": round(statistics.median(warm), 2) if warm else None,
        "kernel_cache_mb": round(cache_mb, 1),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
