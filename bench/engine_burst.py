"""Bursts of streams through the engine alone, no HTTP: the ceiling of bench/worker_http.py's figures.

    python bench/engine_burst.py MODEL.gguf --backend cuda --levels 64,256 --max-tokens 128 --rounds 5

Each level submits that many copies of worker_http.py's prompt at once (greedy, token ids only) to the worker's
own Scheduler over the worker's Engine (`--slots`, `--context-length` and the default step size of a worker
started as bench/gpu/serve.sh starts one), stepped on the thread that loaded it as in the engine process, and
counts each stream's tokens as the scheduler hands them out. The figures are worker_http.py's: "aggregate" is
every token over the level's wall time, "decode aggregate" the tokens after each stream's first over the span
from the first first token to the last token.

So the two benchmarks split the HTTP figure's share of bench/cuda_bench.py's:
- this figure over cuda_bench's is what a burst's prompts and its ramp leave of the engine's decode rate (cuda_bench
  decodes without prompts);
- worker_http's over this one is what the serving path (HTTP, the engine process's pipe, frames, SSE) delivers.
Every level runs after a warm-up burst of each level (compilation, graph capture) and `--rounds` times, the levels
interleaved; the median round of each level (by decode aggregate) is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_http import PROMPT, level_figures, median_round  # noqa: E402

from rbees_workerd.engine.engine import Engine  # noqa: E402
from rbees_workerd.engine.types import GenerationParams  # noqa: E402
from rbees_workerd.scheduler import Scheduler, StepOutput  # noqa: E402


class _Burst:
    """One level's streams: each one's first and last token's stamp and its count, and when all have ended."""

    def __init__(self, streams: int) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.left = streams
        self.done = threading.Event()

    def on_step(self, out: StepOutput) -> None:
        for job in out.jobs:
            if job.token_ids:
                self.first.setdefault(job.job_id, out.at)
                self.last[job.job_id] = out.at
                self.tokens[job.job_id] = self.tokens.get(job.job_id, 0) + len(job.token_ids)
            if job.finish is not None:
                self.left -= 1
        if self.left == 0:
            self.done.set()


class _Router:
    """The scheduler's one callback, handed to the level in flight."""

    burst: _Burst | None = None

    def on_step(self, out: StepOutput) -> None:
        if self.burst is not None:
            self.burst.on_step(out)


def run_level(scheduler: Scheduler, router: _Router, prompt: list[int], streams_n: int, max_tokens: int,
              tag: str) -> dict[str, float]:  # fmt: skip
    burst = router.burst = _Burst(streams_n)
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    for f in [scheduler.submit(f"{tag}-{i}", prompt, params) for i in range(streams_n)]:
        f.result()
    if not burst.done.wait(600):
        raise SystemExit(f"{streams_n} streams did not end within 600 s")
    last = max(burst.last.values())
    streams = [{"tokens": n, "first_at": burst.first[job], "last_at": burst.last[job], "ttft_s": burst.first[job] - t0}
               for job, n in burst.tokens.items()]  # fmt: skip
    return {"concurrency": streams_n, **level_figures(streams, last - t0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--levels", default="1,64,256")
    p.add_argument("--slots", type=int, default=256, help="the engine's slots (bench/gpu/serve.sh's worker: 256)")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--step-tokens", type=int, help="the engine's step size (default: a worker's for --slots)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if max(levels) > args.slots:
        p.error(f"a level of {max(levels)} streams needs --slots {max(levels)} or more")
    engine = Engine.load(args.model, backend=args.backend, gpu=args.gpu, slots=args.slots,
                         context_length=args.context_length, max_step_tokens=args.step_tokens)  # fmt: skip
    prompt = engine.tokenizer.encode(PROMPT)
    router = _Router()
    failed: list[BaseException] = []
    scheduler = Scheduler(engine, router.on_step, failed.append)
    rounds: list[list[dict[str, float]]] = []

    def levels_then_stop() -> None:
        try:
            for c in levels:  # warm-up
                run_level(scheduler, router, prompt, c, 8, f"warm-{c}")
            for r in range(args.rounds):
                rounds.append([run_level(scheduler, router, prompt, c, args.max_tokens, f"r{r}-{c}") for c in levels])
        except BaseException as e:  # noqa: BLE001 - reported once the scheduler has stopped
            failed.append(e)
        finally:
            scheduler.stop()

    gc.collect()  # as the engine process does once loaded
    gc.freeze()
    threading.Thread(target=levels_then_stop, name="bench-bursts", daemon=True).start()
    # the steps on this thread, which loaded the engine, as in the engine process (engine_process.py: Numba's CPU
    # kernels run on OpenMP teams per thread, and a second thread's team made a CPU step three times as long)
    scheduler.run()
    if failed or len(rounds) < args.rounds:
        raise SystemExit(f"the bursts failed: {failed[0]!r}" if failed else "the bursts did not finish")
    key = "decode_aggregate_tokens_per_sec"
    results = [median_round([rnd[i] for rnd in rounds], key) for i in range(len(levels))]
    report = {"levels": results, "rounds": args.rounds, "prompt_tokens": len(prompt),
              "step_tokens": engine.model.max_step_tokens, "backend": engine.backend.name}  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['backend']}, {len(prompt)}-token prompts, steps of up to {report['step_tokens']} tokens, "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(f"{'streams':>8} {'aggregate':>11} {'decode agg':>11} {'TTFT p50':>9} {'TTFT max':>9}")
    for r in results:
        print(f"{r['concurrency']:>8} {r['aggregate_tokens_per_sec']:>11,.0f} {r[key]:>11,.0f} "
              f"{r['ttft_ms_p50']:>9.1f} {r['ttft_ms_max']:>9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
