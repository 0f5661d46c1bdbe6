"""`rbees-workerd`: the worker daemon (`serve`), plus one-shot `generate` and `bench` for operators and benchmarks.

One typer app parses every command; any failure is one line `error: CODE: reason` on stderr (cli_run.py).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import typer

from rbees_workerd import cli_run, cli_serve
from rbees_workerd.errors import RbeesError

PROG = "rbees-workerd"

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=cli_run.HELP_OPTIONS,
    help="Worker daemon: `rbees-workerd --worker-id ID --model PATH --port N` (the same as `serve ...`) serves "
    "one model over HTTP; `generate` and `bench` run the engine once.",
)
app.command()(cli_serve.serve)


@app.callback()
def _root(
    _version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=cli_run.version_callback(PROG), help="Print the version."),
    ] = False,
) -> None:
    """The options of `rbees-workerd` itself (the app's help text says what it does)."""


ModelOpt = Annotated[str, typer.Option("--model", help="Path of a GGUF model file.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="cpu or cuda.")]
GpuOpt = Annotated[int, typer.Option("--gpu", envvar="WORKER_GPU_DEVICE", help="CUDA device index.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: all cores).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


def _load(model: str, backend: str, gpu: int, threads: int | None, context_length: int | None = None):  # noqa: ANN202
    from rbees_workerd.engine.engine import Engine

    return Engine.load(model, backend=backend, gpu=gpu, threads=threads, context_length=context_length)


@app.command()
def generate(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt text, used raw unless --chat.")],
    backend: BackendOpt = "cpu",
    gpu: GpuOpt = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, max=2.0)] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 0,
    min_p: Annotated[float, typer.Option("--min-p", min=0.0, max=1.0)] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", min=0.0)] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate a completion and print it as it streams."""
    from rbees_workerd.engine.types import FinishEvent, GenerationParams, TokenEvent

    engine = _load(model, backend, gpu, threads)
    text = prompt
    if chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = engine.tokenizer.encode(text)
    params = GenerationParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()),
    )  # fmt: skip
    parts: list[str] = []
    token_ids: list[int] = []
    finish: FinishEvent | None = None
    for event in engine.generate(ids, params):
        if isinstance(event, TokenEvent):
            parts.append(event.text)
            if event.index == len(token_ids):
                token_ids.append(event.token_id)
            if not as_json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        else:
            finish = event
    assert finish is not None
    if as_json:
        decode_s = finish.decode_time_ms / 1000
        print(
            json.dumps(
                {
                    "text": "".join(parts),
                    "token_ids": token_ids,
                    "prompt_tokens": finish.prompt_tokens,
                    "stop_reason": finish.stop_reason,
                    "stop_sequence": finish.stop_sequence,
                    "prefill_tokens_per_sec": _rate(finish.prompt_tokens, finish.prefill_time_ms / 1000),
                    "decode_tokens_per_sec": _rate(max(finish.tokens_out - 1, 0), decode_s),
                }
            )
        )
    else:
        sys.stdout.write("\n")


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 and n > 0 else 0.0


@app.command()
def bench(
    model: ModelOpt,
    backend: BackendOpt = "cpu",
    gpu: GpuOpt = 0,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1)] = 256,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", min=2)] = 64,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Concurrent sequences decoding together.")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", min=1)] = 3,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure prefill and decode tokens/s (best of --repeats) after one warm-up run."""
    from rbees_workerd.engine.engine import Engine
    from rbees_workerd.engine.types import FinishEvent, GenerationParams

    t0 = time.perf_counter()
    engine = Engine.load(
        model, backend=backend, gpu=gpu, threads=threads, slots=batch,
        context_length=prompt_tokens + gen_tokens + 8,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    vocab = engine.config.vocab_size
    rng = __import__("numpy").random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, min(vocab, 20000), prompt_tokens)]
    never_stop = GenerationParams(max_tokens=gen_tokens, temperature=0.0)
    eos = engine.tokenizer.eos_ids

    def run() -> tuple[float, float]:
        t_start = time.perf_counter()
        first = [engine.submit(prompt, never_stop) for _ in range(batch)]
        ids = {s.id for s in first}
        prefill_done = None
        tokens = 0
        while ids:
            for e in engine.step():
                if isinstance(e, FinishEvent):
                    ids.discard(e.seq_id)
                    if e.stop_reason != "MAX_TOKENS" and not eos:
                        raise RuntimeError(f"bench sequence stopped early: {e.stop_reason}")
                else:
                    tokens += 1
            if prefill_done is None:
                prefill_done = time.perf_counter()
        end = time.perf_counter()
        assert prefill_done is not None
        prefill = batch * prompt_tokens / (prefill_done - t_start)
        decode = (tokens - batch) / (end - prefill_done) if end > prefill_done else 0.0
        return prefill, decode

    t1 = time.perf_counter()
    run()  # warm-up: first-call compilation and cache loading happen here
    warmup_s = time.perf_counter() - t1
    results = [run() for _ in range(repeats)]
    report = {
        "model": engine.model_name,
        "backend": engine.backend.name,
        "device": engine.backend.device,
        "threads": threads,
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tokens_per_sec": round(max(r[0] for r in results), 2),
        "decode_tokens_per_sec": round(max(r[1] for r in results), 2),
        "load_seconds": round(load_s, 3),
        "warmup_seconds": round(warmup_s, 3),
        "memory_bytes": engine.backend.memory_bytes(),
    }
    if as_json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>24}: {v}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Without a command, `rbees-workerd --worker-id ...` (the form rbees-pool uses) serves."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]
    try:
        code = cli_run.run(app, PROG, argv)
    except RbeesError as e:
        cli_run.print_error(e.code, e.message)
        code = e.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
