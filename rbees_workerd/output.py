"""The serving side of each step: token ids in, SSE frames out, for every job of the step in one pass.

The scheduler (which owns the engine, in the engine process) deals in token ids only; once per step the
whole step (`StepOutput`) reaches the event loop with one `call_soon_threadsafe`. `OutputProcessor.process` then,
on the event loop, for each job of the step: detokenizes its tokens (incrementally, never splitting a
UTF-8 character), matches its stop strings, updates the metrics, builds its frames as bytes (orjson for
the text, no JSON encode of a whole dict per token), appends them to the job's outbox and wakes the job's
stream once. The stream (stream.py) writes whatever the outbox holds in one write.

A stop string is found here, after the step that sampled it: the job's stream ends at once (the matched
text is never sent), and the engine is told to cancel the sequence, which it does at its next step; the
slot stays busy until then (one more step of work, never sent).

Every token has exactly one `token` frame, its index `i` consecutive from 0. Text that cannot be decided
yet (a possible start of a stop string, or a UTF-8 character not complete) keeps that token's frame back
until a later token decides it or the job ends: the text flushed at the end then goes into the last
token's own frame, never into a second frame with the same index.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from rbees_workerd.engine.types import StopReason
from rbees_workerd.errors import Internal, RbeesError
from rbees_workerd.metrics import WorkerMetrics
from rbees_workerd.scheduler import JobOutput, StepOutput

if TYPE_CHECKING:
    from rbees_workerd.runtime import Job, WorkerRuntime

log = logging.getLogger("rbees_workerd.jobs")


def frame(payload: dict[str, object]) -> bytes:
    """One SSE event: `data: {json}` and a blank line."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def token_frame(text: str, index: int) -> bytes:
    """A `token` frame, byte for byte what frame({"type": "token", "t": text, "i": index}) gives."""
    return b'data: {"type":"token","t":%b,"i":%d}\n\n' % (orjson.dumps(text), index)


class TextStream:
    """One job's text: its tokens decoded one at a time, and its stop strings matched across tokens."""

    def __init__(self, decoder: Any, stops: tuple[str, ...]) -> None:
        self._decoder = decoder
        self._stops = tuple(s for s in stops if s)
        self._held = ""  # decoded text not yet decided: it may be the start of a stop string

    def push(self, token_id: int) -> tuple[str, bool, str | None]:
        """The text this token decides, whether some text is still undecided after it, and the stop
        string matched (its text and everything after it are dropped)."""
        pending = self._held + self._decoder.push(token_id)
        if not self._stops:
            return pending, self._decoder.pending, None
        hits = [(pending.find(s), s) for s in self._stops if s in pending]
        if hits:
            at, stop = min(hits)
            self._held = ""
            return pending[:at], False, stop
        keep = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(pending)), 0, -1):
                if pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], bool(keep) or self._decoder.pending, None

    def flush(self) -> str:
        """What is left once no token follows (an incomplete character becomes U+FFFD)."""
        tail = self._held + self._decoder.flush()
        self._held = ""
        return tail

class OutputProcessor:
    """Turns each StepOutput into frames in the jobs' outboxes; runs on the event loop, once per step."""

    def __init__(self, runtime: WorkerRuntime, metrics: WorkerMetrics) -> None:
        self._runtime = runtime
        self._metrics = metrics

    def process(self, step: StepOutput) -> None:
        jobs = self._runtime.jobs
        m = self._metrics
        tokens = 0
        for out in step.jobs:
            job = jobs.get(out.job_id)
            if job is None:
                continue
            tokens += self._job(job, out, step.at)
            if out.finish is not None:
                self._runtime.forget(job)
        if tokens:
            m.tokens_generated.inc(tokens)
        m.slots_in_use.set(step.slots_in_use)

    def _job(self, job: Job, out: JobOutput, at: float) -> int:
        """Fold one job's part of a step into its outbox; the number of its tokens counted."""
        if job.ended:  # stopped by a stop string: the engine's tokens after it are never sent
            return 0
        m = self._metrics
        if out.token_ids:
            if job.first_token_at is None:
                job.first_token_at = at
                m.time_to_first_token.observe(at - job.accepted_at)
            else:
                m.token_latency.observe(at - job.last_token_at)
            job.last_token_at = at
        deferred = job.deferred
        frames: list[bytes] = []
        stop = None
        counted = 0
        for token_id in out.token_ids:
            counted += 1
            text, undecided, stop = job.text.push(token_id)
            deferred.append((job.tokens_out, text))
            job.tokens_out += 1
            if stop is not None or not undecided:
                frames.extend(token_frame(t, i) for i, t in deferred)
                deferred.clear()
            if stop is not None:
                break
        if stop is not None:
            self._end(job, frames, "STOP_SEQUENCE", at, stop=stop)
            if out.finish is None:
                self._runtime.cancel_in_engine(job)  # lands at the engine's next step
        elif out.finish is not None:
            reason = out.finish.stop_reason
            if reason in ("EOS", "MAX_TOKENS"):
                tail = job.text.flush()
                if tail and deferred:
                    i, t = deferred[-1]
                    deferred[-1] = (i, t + tail)
                elif tail:  # cannot happen: undecided text always keeps its token's frame back
                    log.warning(
                        f"job {job.job_id}: {len(tail)} characters of text had no token frame left",
                        extra={"fields": job.log_fields()},
                    )
            frames.extend(token_frame(t, i) for i, t in deferred)
            deferred.clear()
            self._end(job, frames, reason, at, error=out.finish.error)
        if frames:
            job.send(b"".join(frames))
        return counted

    def _end(
        self, job: Job, frames: list[bytes], reason: StopReason, at: float, stop: str | None = None,
        error: RbeesError | None = None,
    ) -> None:  # fmt: skip
        """The job's metrics frame and its end (or error) frame; the job's stream closes after them."""
        m = self._metrics
        if reason == "CANCELLED":
            m.jobs_cancelled.inc()
        elif reason == "ERROR":
            m.jobs_failed.inc()
        else:
            m.jobs_completed.labels(reason).inc()
        first = job.first_token_at if job.first_token_at is not None else at
        decode_s = at - first
        n = job.tokens_out
        # the first token comes out of the prefill; the decode rate counts the ones after it
        rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        prefill_ms = max(0.0, first - job.admitted_at) * 1000 if job.admitted_at is not None else 0.0
        frames.append(
            frame(
                {
                    "type": "metrics",
                    "tokens_per_sec": round(rate, 2),
                    "time_to_first_token_ms": round((first - job.accepted_at) * 1000, 2),
                    "prefill_time_ms": round(prefill_ms, 2),
                    "prompt_tokens": job.prompt_tokens,
                    "tokens_out": n,
                }
            )
        )
        if reason == "ERROR":
            failure = error or Internal("generation failed")
            # retriable whatever the error: the job failed with this worker's engine, not for what it asked
            body: dict[str, object] = {"type": "error", "code": failure.code, "message": failure.message,
                                       "retriable": True}  # fmt: skip
        else:
            body = {"type": "end", "tokens_out": n, "decode_time_ms": round(decode_s * 1000, 2), "stop_reason": reason}
            if stop is not None:
                body["stop_sequence_matched"] = stop
        frames.append(frame(body))
        job.ended = True
        job.closed = True
        _log_end(job, reason, decode_s * 1000, prefill_ms)


def _log_end(job: Job, reason: StopReason, decode_ms: float, prefill_ms: float) -> None:
    fields = {
        **job.log_fields(),
        "tokens_in": job.prompt_tokens,
        "tokens_out": job.tokens_out,
        "decode_time_ms": round(decode_ms, 2),
        "prefill_time_ms": round(prefill_ms, 2),
        "stop_reason": reason,
    }
    level = logging.ERROR if reason == "ERROR" else logging.INFO
    log.log(
        level,
        f"job {job.job_id} ended ({reason}): {job.tokens_out} tokens in {decode_ms:.0f} ms",
        extra={"fields": fields},
    )
