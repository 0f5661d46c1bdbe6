"""The engine: a loaded model plus the sequences it is generating, advanced one batched step at a time.

`step()` builds one flat batch: a token for every sequence that is decoding,
then prompt chunks of sequences still being prefilled, up to the model's step
size. A request submitted between steps joins at the next one (continuous
batching). The engine is not thread-safe: one thread owns it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rbees_workerd.engine.config import ModelConfig
from rbees_workerd.engine.gguf import load_gguf
from rbees_workerd.engine.model import Transformer, cache_slots, kv_cache_bytes, scratch_bytes
from rbees_workerd.engine.sampling import SeededUniforms
from rbees_workerd.engine.tokenizer import StreamDecoder, Tokenizer
from rbees_workerd.engine.types import (
    Event,
    FinishEvent,
    GenerationParams,
    GenerationResult,
    LoadPhase,
    StopReason,
    TokenEvent,
)
from rbees_workerd.errors import AllSlotsBusy, InvalidParams
from rbees_workerd.kernels.backend import Backend, Picks, SamplingRow

DEFAULT_CONTEXT = 4096
STEP_TOKENS = 256  # a step's tokens at least; a worker of many slots takes more (step_tokens)
STEP_TOKENS_MAX = 2048  # ... and at most this many by default (vLLM's max_num_batched_tokens)
REPETITION_WINDOW = 64  # llama.cpp's default penalty_last_n
_NO_HISTORY = np.zeros(0, np.int32)


def make_backend(name: str, gpu: int = 0, threads: int | None = None) -> Backend:
    if name == "cpu":
        from rbees_workerd.kernels.cpu.backend import CpuBackend

        return CpuBackend(threads)
    if name == "cuda":
        from rbees_workerd.kernels.cuda.probe import require_cuda

        require_cuda()  # BackendUnavailable, not an ImportError, where numba-cuda or a device is missing
        from rbees_workerd.kernels.cuda import CudaBackend

        return CudaBackend(gpu)
    raise InvalidParams(f"unknown backend {name!r} (expected cpu or cuda)")


def step_tokens(slots: int) -> int:
    """The tokens a step takes at most by default: eight a slot, from STEP_TOKENS to STEP_TOKENS_MAX. A burst of
    streams arriving together is prefilled in a few large steps rather than many small ones between decodes,
    each of which held back every stream already decoding. (256 streams of 20-token prompts: 14 steps of 512
    tokens spread their first tokens over 10-175 ms, and the HTTP aggregate lost 11-14% to that ramp, H100.)
    A larger step delays the tokens of the streams decoding beside it, once per burst."""
    return max(STEP_TOKENS, min(8 * slots, STEP_TOKENS_MAX))


@dataclass
class Sequence:
    id: Hashable  # the engine's own number, or the caller's id (the worker's job_id)
    slot: int
    prompt: list[int]
    params: GenerationParams
    decoder: StreamDecoder | None  # None: token ids only, the caller detokenizes and checks stop strings
    uniforms: SeededUniforms
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens already in the KV cache
    held: str = ""  # decoded text not yet emitted: it may be the start of a stop string
    cancelled: bool = False
    ended: bool = False  # finished (_finish): no longer active
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    greedy_row: SamplingRow | None = None  # (Engine._sampling_row)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)


@dataclass
class _Batch:
    """One step's flat batch (see Transformer.run) and the sequences its logit rows sample."""

    feed: Picks | None
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    sampled: list[Sequence] = field(default_factory=list)


@dataclass
class _Queued:
    """A step on the device whose sampled tokens the host has not read yet."""

    sampled: list[Sequence]
    picks: Picks


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, model_name: str) -> None:
        self.model = model
        self.config: ModelConfig = model.cfg
        self.backend = model.be
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.slots = model.slots
        self.context_length = model.context_length
        self._free = list(range(self.slots - 1, -1, -1))
        self._active: dict[int, Sequence] = {}
        self._prefilling: dict[int, Sequence] = {}  # the active ones whose prompt is not all in the cache yet
        self._ids = itertools.count(1)
        self._queued: _Queued | None = None  # see step

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: str = "cpu",
        gpu: int = 0,
        slots: int = 1,
        context_length: int | None = None,
        on_progress: Callable[[LoadPhase, float], None] | None = None,
        threads: int | None = None,
        max_step_tokens: int | None = None,
    ) -> Engine:
        """Read, validate and prepare a GGUF model; raises ModelLoadError, VramOOM, InvalidParams.

        `on_progress(phase, fraction)` follows the load: "loading" with the fraction of the file's weight
        bytes prepared on the backend, then "compiling kernels" and "warming up" (see warm_up)."""
        report = on_progress or (lambda phase, fraction: None)
        report("loading", 0.0)
        if slots < 1:
            raise InvalidParams("slots must be at least 1")
        max_step_tokens = max_step_tokens or step_tokens(slots)
        if max_step_tokens < slots:
            raise InvalidParams(f"a step of {max_step_tokens} tokens cannot hold a token for each of {slots} slots")
        f = load_gguf(path)
        try:
            cfg = ModelConfig.from_gguf(f)
            cfg.check_tensors(f)
            tokenizer = Tokenizer.from_gguf(f.metadata)
            ctx = min(cfg.context_length, context_length or DEFAULT_CONTEXT)
            if ctx < 1:
                raise InvalidParams("context length must be at least 1")
            be = make_backend(backend, gpu, threads)
            weights = sum(t.raw.nbytes for t in f.tensors.values())
            cache = kv_cache_bytes(cfg, cache_slots(slots, be), ctx, np.dtype(be.kv_dtype).itemsize)
            be.check_fits(weights + cache + scratch_bytes(cfg, max_step_tokens))
            model = Transformer(cfg, f, be, slots, ctx, max_step_tokens, lambda done: report("loading", done))
        finally:
            f.close()
        report("loading", 1.0)
        engine = cls(model, tokenizer, Path(path).stem)
        engine.warm_up(report)
        return engine

    def warm_up(self, on_progress: Callable[[LoadPhase, float], None] | None = None) -> None:
        """Generate a little before any request: greedy passes, whose first call of each kernel compiles it (or
        loads it from Numba's cache), one for each of the backend's warm_sizes (a compilation while serving
        stalls every request in flight for seconds), and the padded step sizes prepared (see
        Transformer.prepare_padded_steps); then a sampled pass, which runs the sampling kernels."""
        report = on_progress or (lambda phase, fraction: None)
        report("compiling kernels", 0.0)
        for n in sorted({max(1, min(size, self.context_length - 2)) for size in self.backend.warm_sizes}):
            list(self.generate([0] * n, GenerationParams(max_tokens=2, temperature=0.0, seed=0)))
        self.model.prepare_padded_steps()
        report("compiling kernels", 1.0)
        report("warming up", 0.0)
        list(self.generate([0], GenerationParams(max_tokens=2, temperature=1.0, seed=0)))
        report("warming up", 1.0)

    # ---- sequences
    def free_slots(self) -> int:
        return len(self._free)

    def has_work(self) -> bool:
        return bool(self._active)

    def submit(
        self, prompt_ids: list[int], params: GenerationParams, seq_id: Hashable = None, detokenize: bool = True
    ) -> Sequence:
        """Queue a sequence for the next step; raises AllSlotsBusy or InvalidParams.

        `seq_id` names it in its events (default: the engine's next number). With `detokenize=False` its
        TokenEvents carry the token id and no text, and params.stop is left to the caller: the worker
        detokenizes and matches stop strings off the thread that owns the engine."""
        if not prompt_ids:
            raise InvalidParams("the prompt encodes to no tokens")
        if len(prompt_ids) >= self.context_length:
            raise InvalidParams(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context_length}"
            )
        if params.max_tokens < 1:
            raise InvalidParams("max_tokens must be at least 1")
        if not self._free:
            raise AllSlotsBusy(f"all {self.slots} slots are generating")
        if seq_id in self._active:
            raise InvalidParams(f"a sequence with id {seq_id!r} is active")
        seq = Sequence(
            id=next(self._ids) if seq_id is None else seq_id,
            slot=self._free.pop(),
            prompt=list(prompt_ids),
            params=params,
            decoder=self.tokenizer.stream_decoder(continuation=True) if detokenize else None,
            uniforms=SeededUniforms(params.seed),
        )
        self._active[seq.id] = seq
        self._prefilling[seq.id] = seq
        return seq

    def cancel(self, seq_id: Hashable) -> None:
        """The sequence ends with CANCELLED at the next step (unknown ids are ignored)."""
        seq = self._active.get(seq_id)
        if seq is not None:
            seq.cancelled = True

    # ---- stepping
    def step(self) -> list[Event]:
        """One batched step for every active sequence: the events of one step's tokens.

        Where the backend queues ahead (a GPU), the next step is queued before this one's tokens
        are read, its decode tokens fed on the device from this step's picks, so that the device
        need not wait for the host between steps. The speculation is exact: a sequence that ends
        with this step's token (end of text, a stop string) only leaves an unused row behind.
        """
        events: list[Event] = []
        for seq in [s for s in self._active.values() if s.cancelled]:
            events.append(self._finish(seq, "CANCELLED"))
        queued = self._queued
        if queued is None:
            if not self._active:
                return events
            queued = self._launch(self._batch(None))
            if queued is None:  # prompt chunks only: nothing to sample yet
                return events
        self._queued = self._launch(self._batch(queued)) if self._can_feed(queued) else None
        events.extend(self._read(queued))
        return events

    def _batch(self, fed: _Queued | None) -> _Batch:
        """The next step's tokens: one for every decoding sequence (those sampled by `fed`, in its order,
        their tokens still on the device; else each one's last token), then prompt chunks."""
        if fed is not None:
            decoding = fed.sampled
            tokens = [0] * len(decoding)  # (fed on the device)
        else:
            decoding = [s for s in self._active.values() if not s.prefilling]
            tokens = [s.generated[-1] for s in decoding]
        b = _Batch(fed.picks if fed is not None else None, tokens, [s.cached for s in decoding],
                   [s.slot for s in decoding], list(range(len(decoding))), list(decoding))  # fmt: skip
        for seq in decoding:
            seq.cached += 1
        budget = self.model.max_step_tokens - len(b.tokens)
        for seq in list(self._prefilling.values()):
            if budget <= 0:
                break
            chunk = seq.prompt[seq.cached : seq.cached + budget]
            b.tokens.extend(chunk)
            b.positions.extend(range(seq.cached, seq.cached + len(chunk)))
            b.slots.extend([seq.slot] * len(chunk))
            seq.cached += len(chunk)
            budget -= len(chunk)
            if not seq.prefilling:
                del self._prefilling[seq.id]
                b.rows.append(len(b.tokens) - 1)
                b.sampled.append(seq)
        return b

    def _launch(self, b: _Batch) -> _Queued | None:
        """Run the step and queue the sampling of its rows (None when it samples none)."""
        logits = self.model.run(
            np.asarray(b.tokens, np.int32), np.asarray(b.positions, np.int32), np.asarray(b.slots, np.int32),
            np.asarray(b.rows, np.int32), feed=b.feed, pad=True,
        )  # fmt: skip
        if not b.sampled:
            return None
        return _Queued(b.sampled, self.backend.sample_async(logits, [self._sampling_row(s) for s in b.sampled]))

    def _can_feed(self, queued: _Queued) -> bool:
        """Whether the next step can be queued before `queued`'s tokens are read: each sequence it
        sampled goes on unless that token ends it, and its sampling needs no token history. (A loop, not
        all() over a generator: this runs for every sequence at every step, on the thread that owns the GPU.)"""
        if not self.backend.queues_ahead:
            return False
        last = self.context_length - 1
        for s in queued.sampled:
            if s.ended or s.cancelled or s.cached >= last or len(s.generated) + 1 >= s.params.max_tokens:
                return False
            if s.params.repetition_penalty != 1.0:
                return False
        return True

    def _read(self, queued: _Queued) -> list[Event]:
        """Accept `queued`'s tokens (waiting for them) for the sequences still active. (One loop for the
        whole step, the token-id-only case inline: this runs for every sequence at every step, on the
        thread that owns the GPU.)"""
        events: list[Event] = []
        active, eos, ctx = self._active, self.tokenizer.eos_ids, self.context_length
        for seq, token in zip(queued.sampled, queued.picks.ids().tolist(), strict=True):
            if active.get(seq.id) is not seq:
                continue
            if seq.t_first is None:
                seq.t_first = time.perf_counter()
            if token in eos:
                events.extend(self._flush_and_finish(seq, "EOS"))
                continue
            seq.generated.append(token)
            if seq.decoder is not None:
                events.extend(self._accept_text(seq, token))
                continue
            n = len(seq.generated)
            events.append(TokenEvent(seq.id, token, "", n - 1))
            if n >= seq.params.max_tokens or seq.cached >= ctx:
                events.append(self._finish(seq, "MAX_TOKENS"))
        return events

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        """The sequence's sampling settings for this step: its token history only where a repetition penalty
        reads it, and a greedy sequence's row made once (it reads neither its number nor a history). Built
        in full for every sequence, a row took 2.9 us a step on the thread that owns the GPU."""
        if seq.greedy_row is not None:
            return seq.greedy_row
        p = seq.params
        history = _NO_HISTORY
        if p.repetition_penalty != 1.0:
            history = np.asarray((seq.prompt + seq.generated)[-REPETITION_WINDOW:], np.int32)
        row = SamplingRow(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty,
            uniform=seq.uniforms.next(),
            history=history,
        )
        if p.temperature == 0 and p.repetition_penalty == 1.0:
            seq.greedy_row = row
        return row

    def _accept_text(self, seq: Sequence, token: int) -> list[Event]:
        """The events of a detokenizing sequence's new token (appended to `generated`): its text, held back
        where it may start a stop string, and the end a stop string or the length limit makes."""
        assert seq.decoder is not None
        text, stop = self._stop_scan(seq, seq.decoder.push(token))
        events: list[Event] = [TokenEvent(seq.id, token, text, len(seq.generated) - 1)]
        if stop is not None:
            events.append(self._finish(seq, "STOP_SEQUENCE", stop))
        elif len(seq.generated) >= seq.params.max_tokens or seq.cached >= self.context_length:
            events.extend(self._flush_and_finish(seq, "MAX_TOKENS"))
        return events

    def _stop_scan(self, seq: Sequence, new_text: str) -> tuple[str, str | None]:
        """Text that can be emitted now, and the stop string that matched, if any.

        Text that might be the beginning of a stop string is held back until
        the next tokens decide, so a matched stop string is never emitted.
        """
        stops = seq.params.stop
        pending = seq.held + new_text
        if not stops:
            return pending, None
        hits = [(pending.find(s), s) for s in stops if s and s in pending]
        if hits:
            at, stop = min(hits)
            seq.held = ""
            return pending[:at], stop
        keep = 0
        for s in stops:
            for n in range(min(len(s) - 1, len(pending)), 0, -1):
                if pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        seq.held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], None

    def _flush_and_finish(self, seq: Sequence, reason: StopReason) -> list[Event]:
        events: list[Event] = []
        tail = seq.held + (seq.decoder.flush() if seq.decoder is not None else "")
        seq.held = ""
        if tail and seq.generated:
            events.append(TokenEvent(seq.id, seq.generated[-1], tail, len(seq.generated) - 1))
        events.append(self._finish(seq, reason))
        return events

    def _finish(self, seq: Sequence, reason: StopReason, stop: str | None = None) -> FinishEvent:
        del self._active[seq.id]
        self._prefilling.pop(seq.id, None)
        seq.ended = True
        self._free.append(seq.slot)
        now = time.perf_counter()
        first = seq.t_first or now
        return FinishEvent(
            seq_id=seq.id,
            stop_reason=reason,
            tokens_out=len(seq.generated),
            prompt_tokens=seq.prompt_tokens,
            prefill_time_ms=(first - seq.t_start) * 1000,
            decode_time_ms=(now - first) * 1000,
            stop_sequence=stop,
        )

    # ---- one-shot use
    def generate(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[Event]:
        """Run one sequence to its end, yielding its events (the engine must be otherwise idle)."""
        seq = self.submit(prompt_ids, params)
        while seq.id in self._active:
            yield from (e for e in self.step() if e.seq_id == seq.id)

    def generate_all(self, prompt_ids: list[int], params: GenerationParams) -> GenerationResult:
        result = GenerationResult(text="", prompt_tokens=len(prompt_ids))
        parts: list[str] = []
        for event in self.generate(prompt_ids, params):
            if isinstance(event, TokenEvent):
                parts.append(event.text)
                if not result.token_ids or event.index >= len(result.token_ids):
                    result.token_ids.append(event.token_id)
            else:
                result.stop_reason = event.stop_reason
                result.stop_sequence = event.stop_sequence
                if event.prefill_time_ms > 0:
                    result.prefill_tokens_per_sec = event.prompt_tokens / (event.prefill_time_ms / 1000)
                if event.decode_time_ms > 0 and event.tokens_out > 1:
                    result.decode_tokens_per_sec = (event.tokens_out - 1) / (event.decode_time_ms / 1000)
        result.text = "".join(parts)
        return result
