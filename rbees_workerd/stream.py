"""The SSE stream of one job: engine events in, `data: {json}` frames out, each token as it arrives."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rbees_workerd.engine.types import FinishEvent, TokenEvent
from rbees_workerd.runtime import Job, WorkerRuntime

log = logging.getLogger("rbees_workerd.jobs")


def frame(payload: dict[str, object]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _end_frames(job: Job, end: FinishEvent, first_token_at: float | None) -> list[str]:
    decode_s = end.decode_time_ms / 1000
    # the first token comes out of the prefill; the decode rate counts the ones after it
    rate = (end.tokens_out - 1) / decode_s if end.tokens_out > 1 and decode_s > 0 else 0.0
    ttft_ms = ((first_token_at or time.perf_counter()) - job.accepted_at) * 1000
    frames = [
        frame(
            {
                "type": "metrics",
                "tokens_per_sec": round(rate, 2),
                "time_to_first_token_ms": round(ttft_ms, 2),
                "prefill_time_ms": round(end.prefill_time_ms, 2),
                "prompt_tokens": end.prompt_tokens,
                "tokens_out": end.tokens_out,
            }
        )
    ]
    if end.stop_reason == "ERROR":
        frames.append(
            frame({"type": "error", "code": "INTERNAL", "message": end.error or "generation failed", "retriable": True})
        )
    else:
        payload: dict[str, object] = {
            "type": "end",
            "tokens_out": end.tokens_out,
            "decode_time_ms": round(end.decode_time_ms, 2),
            "stop_reason": end.stop_reason,
        }
        if end.stop_sequence is not None:
            payload["stop_sequence_matched"] = end.stop_sequence
        frames.append(frame(payload))
    return frames


class JobStream(StreamingResponse):
    """The SSE response of one job. However the response ends before the job does (a client gone
    mid-stream, or before the first frame was even produced), the job is cancelled so its slot
    frees at once."""

    def __init__(self, runtime: WorkerRuntime, job: Job, model: str) -> None:
        super().__init__(
            job_frames(job, model),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._runtime, self._job = runtime, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._job.ended:
                log.info(
                    f"job {self._job.job_id}: client disconnected, cancelling",
                    extra={"fields": {"job_id": self._job.job_id}},
                )
                self._runtime.abandon_job(self._job)


async def job_frames(job: Job, model: str) -> AsyncIterator[str]:
    """Yield the job's frames as its events arrive (`JobStream` cancels the job if they stop being read).
    The job leaves the runtime's table when the engine reports its end, not here."""
    first_token_at: float | None = None
    log.info(
        f"job {job.job_id} started with {job.prompt_tokens} prompt tokens",
        extra={"fields": {"job_id": job.job_id, "tokens_in": job.prompt_tokens}},
    )
    yield frame(
        {
            "type": "started",
            "job_id": job.job_id,
            "model": model,
            "started_at": job.started_at,
            "prompt_tokens": job.prompt_tokens,
        }
    )
    while True:
        event = await job.events.get()
        if isinstance(event, TokenEvent):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            yield frame({"type": "token", "t": event.text, "i": event.index})
            continue
        job.ended = True
        _log_end(job, event)
        for text in _end_frames(job, event, first_token_at):
            yield text
        return


def _log_end(job: Job, end: FinishEvent) -> None:
    fields = {
        "job_id": job.job_id,
        "tokens_in": end.prompt_tokens,
        "tokens_out": end.tokens_out,
        "decode_time_ms": round(end.decode_time_ms, 2),
        "prefill_time_ms": round(end.prefill_time_ms, 2),
        "stop_reason": end.stop_reason,
    }
    level = logging.ERROR if end.stop_reason == "ERROR" else logging.INFO
    log.log(
        level,
        f"job {job.job_id} ended ({end.stop_reason}): {end.tokens_out} tokens in {end.decode_time_ms:.0f} ms",
        extra={"fields": fields},
    )
