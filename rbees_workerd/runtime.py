"""The worker's lifecycle and its jobs, between the HTTP routes and the engine process.

Starting -> Loading -> Ready (Executing while jobs run) -> Draining -> Stopped. No HTTP here:
the routes call `start_job`/`cancel_job` and turn the errors raised into responses.

The engine runs in a process of its own (engine_process.py); the tokenizer is here, built from the model
file's metadata. A job is known by its job_id everywhere: this table, the scheduler, the engine. The engine
process's reader thread hands each engine step to the event loop in one `call_soon_threadsafe` (`_on_step`);
the output processor (output.py) turns it into frames in each job's outbox, which the job's stream
(stream.py) writes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rbees_workerd import logs
from rbees_workerd.engine.tokenizer import Tokenizer
from rbees_workerd.engine.types import GenerationParams, LoadPhase
from rbees_workerd.engine_process import EngineInfo, EngineProcess
from rbees_workerd.errors import AllSlotsBusy, Draining, FieldInvalid, InvalidParams, JobNotFound, NotReady
from rbees_workerd.metrics import WorkerMetrics
from rbees_workerd.output import OutputProcessor, TextStream, frame
from rbees_workerd.scheduler import Admitted, StepOutput
from rbees_workerd.schemas import ExecuteRequest, WorkerState
from rbees_workerd.settings import Settings

log = logging.getLogger("rbees_workerd.runtime")

# Each loading phase's share of load_progress: the weights by bytes, then the warm-up's two passes. 1.0 is
# reported only once the worker is Ready.
_PHASE_SPAN: dict[LoadPhase, tuple[float, float]] = {
    "loading": (0.0, 0.9),
    "compiling kernels": (0.9, 0.95),
    "warming up": (0.95, 0.99),
}

# A prompt this short is tokenized on the event loop (about 0.25 us a character: 0.25 ms at most): a thread of the
# default executor took 54 us for a 95-character prompt against 24 inline, and 64 or 256 requests arriving at
# once queued on its few threads, their GIL turns slowing the event loop that admits them.
_INLINE_PROMPT_CHARS = 1024


@dataclass(eq=False)
class Job:
    """One /execute request from acceptance to its last frame. Lives on the event loop only.

    Its clocks (perf_counter): accepted (the request admitted by the runtime), admitted (the sequence
    entered the engine), first token (the step that sampled it returned): the one first-token clock of
    the TTFT histogram and of the metrics frame."""

    job_id: str
    text: TextStream
    accepted_at: float = field(default_factory=time.perf_counter)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    # the request's, for the job's log lines: they are written by the output processor, outside the request
    correlation_id: str | None = field(default_factory=logs.correlation_id.get)
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0
    prompt_tokens: int = 0
    tokens_out: int = 0
    deferred: list[tuple[int, str]] = field(default_factory=list)  # token frames kept back: (i, decided text)
    in_engine: bool = False
    cancel_requested: bool = False
    ended: bool = False  # its end (or error) frame was produced
    closed: bool = False  # nothing more goes into its outbox
    hung_up: bool = False  # the client went away: its stream writes nothing more
    _outbox: list[bytes] = field(default_factory=list)
    _wake: asyncio.Future[None] | None = None

    def log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"job_id": self.job_id}
        if self.correlation_id is not None:
            fields["correlation_id"] = self.correlation_id
        return fields

    def send(self, data: bytes) -> None:
        """Queue bytes for the client and wake the stream (once, however many steps come before it runs)."""
        self._outbox.append(data)
        self._wake_stream()

    def hang_up(self) -> None:
        """The client has gone: the stream ends at once, whatever its outbox holds."""
        self.hung_up = True
        self._wake_stream()

    def _wake_stream(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Everything sent so far, in one piece per wake-up, until the job's last frame (or a hang-up)."""
        while not self.hung_up:
            if self._outbox:
                data = self._outbox[0] if len(self._outbox) == 1 else b"".join(self._outbox)
                self._outbox.clear()
                yield data
            elif self.closed:
                return
            else:
                self._wake = asyncio.get_running_loop().create_future()
                try:
                    await self._wake
                finally:
                    self._wake = None


class WorkerRuntime:
    """Owns the engine (through its process), the tokenizer, the lifecycle state and the table of active jobs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics()
        self.metrics.slots.set(settings.slots)
        self.load_progress = 0.0
        self.load_phase: LoadPhase | None = None  # what loading is doing now; None outside Loading
        self.info: EngineInfo | None = None  # set once the engine is loaded
        self.tokenizer: Tokenizer | None = None
        self.jobs: dict[str, Job] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop the jobs live on (see start_loading)
        self._engine: EngineProcess | None = None  # from the start of loading
        self.output = OutputProcessor(self, self.metrics)
        self._state = WorkerState.STARTING
        self._idle = asyncio.Event()
        self._idle.set()
        self._set_state(WorkerState.STARTING)

    # ---- state
    @property
    def state(self) -> WorkerState:
        return WorkerState.EXECUTING if self._state is WorkerState.READY and self.jobs else self._state

    def _set_state(self, state: WorkerState) -> None:
        self._state = state
        self.metrics.set_state(self.state)

    def _jobs_changed(self) -> None:
        """A job entered or left the table: Ready and Executing (and the drain's wait) change only as the table
        empties or stops being empty, so the state's series are set then, not at each of 256 streams' starts."""
        if len(self.jobs) > 1:
            return
        if self.jobs:
            self._idle.clear()
        else:
            self._idle.set()
        self.metrics.set_state(self.state)

    @property
    def slots_free(self) -> int:
        return self.settings.slots - len(self.jobs) if self.info is not None else 0

    # ---- loading
    def load(self, on_fatal: Callable[[BaseException], None]) -> None:
        """Start the engine process, build the tokenizer while it loads the model, and wait for it (blocking:
        run it off the event loop). `on_fatal` is called, on another thread, if the engine dies later."""
        self._set_state(WorkerState.LOADING)
        self._progress("loading", 0.0)  # (starting the engine process is part of it)
        s = self.settings
        t0 = time.perf_counter()
        self._engine = EngineProcess(s, self._on_step, on_fatal, self._progress)
        self._engine.start()
        self.tokenizer = Tokenizer.from_file(s.model)
        info = self._engine.wait_loaded()
        self.metrics.model_bytes.set(info.weight_bytes)
        self.metrics.kv_cache_bytes.set(info.kv_cache_bytes)
        self.metrics.vram_bytes.set(info.vram_bytes)
        self.metrics.engine_pid = info.pid
        gc.collect()  # the heap the start leaves (modules, the app, the tokenizer) frozen, as rbees-orcd's:
        gc.freeze()  # the collections while serving then walk only what the jobs make
        self.info = info
        self.load_progress, self.load_phase = 1.0, None
        self.metrics.load_progress.set(1.0)
        self._set_state(WorkerState.READY)
        log.info(
            f"model {s.model_ref} loaded on {info.device} in {time.perf_counter() - t0:.1f}s",
            extra={
                "fields": {
                    "model_ref": s.model_ref,
                    "memory_bytes": info.memory_bytes,
                    "slots": info.slots,
                    "context_length": info.context_length,
                    "engine_pid": info.pid,
                }
            },
        )

    def _progress(self, phase: LoadPhase, fraction: float) -> None:
        low, high = _PHASE_SPAN[phase]
        self.load_phase = phase
        self.load_progress = max(self.load_progress, low + (high - low) * max(0.0, min(1.0, fraction)))
        self.metrics.load_progress.set(self.load_progress)

    def loading_status(self) -> str:
        """Where loading stands, for a refusal's message: `the model is loading (compiling kernels, 90%)`."""
        return f"the model is loading ({self.load_phase or 'starting'}, {self.load_progress:.0%})"

    def ready_payload(self) -> dict[str, object]:
        s, info = self.settings, self.info
        assert info is not None, "sent once loaded"
        return {
            "worker_id": s.worker_id,
            "url": s.url,
            "model_ref": s.model_ref,
            "backend": info.backend,
            "device": info.device,
            "vram_bytes": info.vram_bytes,
            "slots_total": info.slots,
        }

    # ---- jobs
    async def start_job(self, req: ExecuteRequest) -> Job:
        """Admit a job into a slot; raises NotReady, Draining, FieldInvalid, AllSlotsBusy."""
        if self._state in (WorkerState.DRAINING, WorkerState.STOPPED):
            raise Draining("the worker is shutting down and takes no new jobs")
        info, tokenizer, engine = self.info, self.tokenizer, self._engine
        if info is None or tokenizer is None or engine is None:
            raise NotReady(self.loading_status())
        if req.job_id in self.jobs:
            raise FieldInvalid("job_id", "unique", "a job with this id is already running on this worker")
        context = info.context_length
        if req.max_tokens > context:
            raise FieldInvalid("max_tokens", f"le={context}", "max_tokens exceeds the model context")
        loop = asyncio.get_running_loop()
        job = Job(req.job_id, TextStream(tokenizer.stream_decoder(continuation=True), tuple(req.stop)))
        self.jobs[job.job_id] = job  # reserve the id while the prompt is tokenized and submitted
        self._jobs_changed()
        future: Future[Admitted] | None = None
        admission: asyncio.Future[Admitted] = loop.create_future()
        try:
            if len(req.prompt) <= _INLINE_PROMPT_CHARS:
                ids = tokenizer.encode(req.prompt)
            else:
                ids = await asyncio.to_thread(tokenizer.encode, req.prompt)
            if len(ids) >= context:
                raise FieldInvalid(
                    "prompt", f"tokens<{context}", f"the prompt has {len(ids)} tokens; the context holds {context}"
                )
            future = engine.submit(job.job_id, ids, _params(req))
            # called on the engine process's reader thread as the engine admits the job: queued on the loop
            # before that step's output, so the job is set up (and its started frame first) before any token
            future.add_done_callback(lambda f: _call_soon(loop, self._admitted, job, f, admission))
            await admission
        except BaseException as e:
            self.forget(job)
            if future is not None and future.done() and not future.cancelled() and future.exception() is None:
                engine.cancel(job.job_id)  # admitted just as the client went away
            if isinstance(e, AllSlotsBusy | FieldInvalid):
                self.metrics.jobs_rejected.labels(e.code).inc()
            if isinstance(e, InvalidParams) and not isinstance(e, FieldInvalid):
                raise FieldInvalid("prompt", "engine", e.message) from e
            raise
        if job.cancel_requested:
            engine.cancel(job.job_id)
        return job

    def _admitted(self, job: Job, future: Future[Admitted], admission: asyncio.Future[Admitted]) -> None:
        """On the loop: the engine took the job (or refused it)."""
        error = future.exception()
        if error is not None:
            if not admission.done():
                admission.set_exception(error)
            return
        admitted = future.result()
        job.admitted_at, job.prompt_tokens, job.in_engine = admitted.at, admitted.prompt_tokens, True
        self.metrics.jobs_started.inc()
        self.metrics.prompt_tokens.inc(admitted.prompt_tokens)
        started = {
            "type": "started",
            "job_id": job.job_id,
            "model": self.settings.model_ref,
            "started_at": job.started_at,
            "prompt_tokens": job.prompt_tokens,
        }
        job.send(frame(started))
        log.info(
            f"job {job.job_id} started with {job.prompt_tokens} prompt tokens",
            extra={"fields": {**job.log_fields(), "tokens_in": job.prompt_tokens}},
        )
        if not admission.done():
            admission.set_result(admitted)

    def _on_step(self, step: StepOutput) -> None:
        """On the engine process's reader thread: the step goes to the loop in one wake-up, its frames built there."""
        if self.loop is not None:
            _call_soon(self.loop, self.output.process, step)

    def cancel_job(self, job_id: str) -> None:
        """Cancel a running job; its stream ends with CANCELLED within one step."""
        job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no active job with id {job_id}")
        job.cancel_requested = True
        self.cancel_in_engine(job)

    def cancel_in_engine(self, job: Job) -> None:
        """End the job's sequence at the engine's next step (a stop string matched, or nobody listens)."""
        if job.in_engine and self._engine is not None:
            self._engine.cancel(job.job_id)

    def abandon_job(self, job: Job) -> None:
        """The client went away mid-stream: cancel the sequence so its slot frees at the next step. The job
        stays in the table (its slot still counted as busy) until the engine reports the sequence ended."""
        self.cancel_in_engine(job)

    def forget(self, job: Job) -> None:
        if self.jobs.get(job.job_id) is job:
            del self.jobs[job.job_id]
            self._jobs_changed()

    # ---- shutdown
    async def drain(self, timeout_s: float) -> None:
        """Refuse new jobs, let running ones finish for up to `timeout_s`, then cancel the rest."""
        if self._state in (WorkerState.DRAINING, WorkerState.STOPPED):
            return
        self._set_state(WorkerState.DRAINING)
        log.info(
            f"draining {len(self.jobs)} job(s), waiting up to {timeout_s:.0f}s",
            extra={"fields": {"active_jobs": len(self.jobs)}},
        )
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning(
                f"drain timed out; cancelling {len(self.jobs)} job(s)",
                extra={"fields": {"active_jobs": len(self.jobs)}},
            )
            for job_id in list(self.jobs):
                self.cancel_job(job_id)
            # cancelled streams end within one step; do not wait forever on a stuck engine
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 10.0)

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.stop(timeout=10.0)
        self._set_state(WorkerState.STOPPED)


def _params(req: ExecuteRequest) -> GenerationParams:
    return GenerationParams(
        max_tokens=req.max_tokens,
        temperature=float(req.temperature),
        top_p=float(req.top_p),
        top_k=req.top_k,
        min_p=float(req.min_p),
        repetition_penalty=float(req.repetition_penalty),
        seed=req.seed,
        stop=tuple(req.stop),
    )


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
        loop.call_soon_threadsafe(callback, *args)


def start_loading(runtime: WorkerRuntime, on_fatal: Callable[[BaseException], None]) -> asyncio.Future[None]:
    """Load in a daemon thread (not the default executor) so that a SIGTERM mid-load can exit at once."""
    loop = asyncio.get_running_loop()
    runtime.loop = loop
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        try:
            runtime.load(on_fatal)
        except BaseException as e:  # noqa: BLE001 - handed to the event loop, which reports it
            _call_soon(loop, settle, e)
        else:
            _call_soon(loop, settle, None)

    threading.Thread(target=run, name="rbees-load", daemon=True).start()
    return done
