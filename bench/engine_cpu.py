"""Prefill and decode tokens/s of rbees' CPU engine against llama.cpp, on the same model in one run.

    python bench/engine_cpu.py --model models-cache/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 [--rounds 5]

Each side runs in a process of its own, loaded and warmed up once; then the rounds alternate
between them, each a random prompt of --prompt-tokens ids and --gen-tokens greedy tokens, so
that both see the same machine: on a machine shared with other work the speed drifts by ±25%
and more within minutes. Reported: each side's median and best, the ratios of the medians and
each round's ratios. rbees also reports its cold (empty Numba cache) and warm start times when
--start-times is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

KEYS = ("prefill_tokens_per_sec", "decode_tokens_per_sec")


def _prompt(n: int, vocab: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(0).integers(100, min(vocab, 20000), n)]


def rbees_round(model: str, threads: int, prompt_tokens: int, gen_tokens: int) -> tuple[Callable[[], dict], dict]:
    """A round of rbees (the engine's greedy prefill, then decode), and what to report about it."""
    from rbees_workerd.engine.engine import Engine
    from rbees_workerd.engine.types import FinishEvent, GenerationParams

    engine = Engine.load(model, backend="cpu", threads=threads, context_length=prompt_tokens + gen_tokens + 8)
    prompt = _prompt(prompt_tokens, engine.config.vocab_size)
    params = GenerationParams(max_tokens=gen_tokens, temperature=0.0)

    def run() -> dict:
        t0 = time.perf_counter()
        seq = engine.submit(prompt, params)
        first = None
        tokens = 0
        done = False
        while not done:
            for e in engine.step():
                done = done or (isinstance(e, FinishEvent) and e.seq_id == seq.id)
                tokens += not isinstance(e, FinishEvent)
            first = first or time.perf_counter()
        end = time.perf_counter()
        return {KEYS[0]: prompt_tokens / (first - t0), KEYS[1]: (tokens - 1) / (end - first)}

    return run, {"memory_bytes": engine.backend.memory_bytes()}


def llama_round(model: str, threads: int, prompt_tokens: int, gen_tokens: int) -> tuple[Callable[[], dict], dict]:
    """A round of llama.cpp (llama-cpp-python, whatever build is importable), and its build."""
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)  # fmt: skip
    prompt = _prompt(prompt_tokens, llm.n_vocab())

    def run() -> dict:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(gen_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        return {KEYS[0]: prompt_tokens / (t1 - t0), KEYS[1]: (gen_tokens - 1) / (t2 - t1)}

    return run, {"llama_cpp_version": llama_cpp.__version__,
                 "llama_cpp_build": llama_cpp.llama_print_system_info().decode().strip()}  # fmt: skip


def serve(side: str, args: argparse.Namespace) -> None:
    """The child process of one side: load, warm up, say so; then one round per line of stdin."""
    make = rbees_round if side == "rbees" else llama_round
    run, info = make(args.model, args.threads, args.prompt_tokens, args.gen_tokens)
    run()  # first-call compilation and cache loading happen here
    print(json.dumps(info), flush=True)
    for _ in sys.stdin:
        print(json.dumps(run()), flush=True)


class Side:
    """A side's child process (this script with --side)."""

    def __init__(self, side: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--side", side, "--model", args.model, "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        self.rounds: list[dict] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.proc.args[3]} side exited with {self.proc.wait()}")
        return json.loads(line)

    def round(self) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        self.rounds.append(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()

    def summary(self) -> dict:
        out = dict(self.info)
        for key in KEYS:
            values = [r[key] for r in self.rounds]
            out[key] = round(statistics.median(values), 2)
            out[key.replace("_tokens", "_best_tokens")] = round(max(values), 2)
        return out


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
    p.add_argument("--rounds", type=int, default=5, help="rounds of each side, alternating")
    p.add_argument("--start-times", action="store_true")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--side", choices=["rbees", "llama_cpp"], help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    args.model = str(Path(args.model).resolve())
    if args.side:
        serve(args.side, args)
        return
    sides = {name: Side(name, args) for name in ("rbees", "llama_cpp")[: 1 if args.no_llama_cpp else 2]}
    for _ in range(args.rounds):
        for side in sides.values():
            side.round()
    for side in sides.values():
        side.close()
    report: dict = {name: side.summary() for name, side in sides.items()}
    report["rbees"] |= {"model": Path(args.model).stem, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                        "gen_tokens": args.gen_tokens, "rounds": args.rounds}  # fmt: skip
    if "llama_cpp" in sides:
        ours, theirs = sides["rbees"].rounds, sides["llama_cpp"].rounds
        for key in KEYS:
            name = key.split("_")[0]
            report[f"{name}_ratio"] = round(report["rbees"][key] / report["llama_cpp"][key], 3)
            report[f"{name}_round_ratios"] = [round(a[key] / b[key], 3) for a, b in zip(ours, theirs, strict=True)]
    if args.start_times:
        report["rbees"] |= start_times(args.model, args.threads)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
