"""Prefill and decode tokens/s of rbees' CPU engine against llama.cpp, on the same model in one run.

    python bench/engine_cpu.py --model models-cache/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2

Each side gets the same random prompt of --prompt-tokens ids, then decodes
--gen-tokens greedily; best of --repeats after a warm-up. rbees also reports
its cold (empty Numba cache) and warm start times when --start-times is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_rbees(model: str, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "rbees_workerd.cli", "bench", "--model", model, "--threads", str(threads),
         "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens), "--repeats", str(repeats),
         "--json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_llama_cpp(model: str, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)  # fmt: skip
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, 20000, prompt_tokens)]
    best_prefill = best_decode = 0.0
    for i in range(repeats + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(gen_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        if i:
            best_prefill = max(best_prefill, prompt_tokens / (t1 - t0))
            best_decode = max(best_decode, (gen_tokens - 1) / (t2 - t1))
    llm.close()
    return {"prefill_tokens_per_sec": round(best_prefill, 2), "decode_tokens_per_sec": round(best_decode, 2),
            "llama_cpp_version": llama_cpp.__version__,
            "llama_cpp_build": llama_cpp.llama_print_system_info().decode().strip()}  # fmt: skip


def start_times(model: str, threads: int) -> dict:
    """Seconds for `rbees-workerd generate` of one token with an empty, then a filled, Numba cache."""
    cache = tempfile.mkdtemp(prefix="rbees-numba-")
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    cmd = [sys.executable, "-m", "rbees_workerd.cli", "generate", "--model", model, "--prompt", "Hi",
           "--max-tokens", "2", "--temperature", "0", "--threads", str(threads), "--json"]  # fmt: skip
    times = {}
    for label in ("cold_start_seconds", "warm_start_seconds"):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        times[label] = round(time.perf_counter() - t0, 2)
    shutil.rmtree(cache, ignore_errors=True)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_model = os.environ.get("RBEES_TEST_MODEL", "models-cache/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--model", default=default_model)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--start-times", action="store_true")
    p.add_argument("--no-llama-cpp", action="store_true")
    args = p.parse_args()
    model = str(Path(args.model).resolve())
    report = {"rbees": bench_rbees(model, args.threads, args.prompt_tokens, args.gen_tokens, args.repeats)}
    if not args.no_llama_cpp:
        report["llama_cpp"] = bench_llama_cpp(model, args.threads, args.prompt_tokens, args.gen_tokens, args.repeats)
        for key in ("prefill_tokens_per_sec", "decode_tokens_per_sec"):
            report[f"{key.split('_')[0]}_ratio"] = round(report["rbees"][key] / report["llama_cpp"][key], 3)
    if args.start_times:
        report["rbees"] |= start_times(model, args.threads)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
