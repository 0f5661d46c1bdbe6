"""The one thread that owns the engine (in the worker, inside the engine process: engine_process.py).

The engine is not thread-safe, so nothing else touches it: submissions and cancels come
through a queue, and this thread runs `engine.step()` (one batched forward over every active sequence)
for as long as there is work. It deals in token ids only: each step's tokens and ends, for every job
at once, go out as one `StepOutput` to one callback (sent to the worker, which hands it to its event
loop in one wake-up; detokenizing, stop strings, metrics and SSE frames happen there, see output.py). A request
that arrives mid-generation is submitted between two steps and joins the next one.

Sequences are named by the caller's id (the worker's job_id) all the way into the engine.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from rbees_workerd.engine.types import FinishEvent, GenerationParams, TokenEvent
from rbees_workerd.errors import Internal, RbeesError

log = logging.getLogger("rbees_workerd.scheduler")


@dataclass(slots=True)
class JobOutput:
    """One job's part of one step: the token ids it sampled (in order) and its end, if it ended."""

    job_id: str
    token_ids: list[int] = field(default_factory=list)
    finish: FinishEvent | None = None


@dataclass
class StepOutput:
    """Everything one engine step produced, stamped when the step returned (perf_counter: CLOCK_MONOTONIC on
    Linux, so a stamp taken in the engine process compares with the worker's own clock)."""

    at: float
    jobs: list[JobOutput]
    step_s: float = 0.0  # the engine's own time for the step
    slots_in_use: int = 0


@dataclass(frozen=True)
class Admitted:
    """A submission the engine took: its prompt length and when it entered the engine (perf_counter, as
    StepOutput.at)."""

    prompt_tokens: int
    at: float


OnStep = Callable[[StepOutput], None]


def error_ends(job_ids: Iterable[str], error: BaseException) -> list[JobOutput]:
    """The error end of every job still in an engine that failed: each one's stream ends with an error frame,
    of the error's code and message where it is an RbeesError (a CUDA_ERROR reaches the client as one)."""
    failure = error if isinstance(error, RbeesError) else Internal(f"the engine failed ({type(error).__name__})")
    return [
        JobOutput(
            job_id,
            finish=FinishEvent(
                seq_id=job_id,
                stop_reason="ERROR",
                tokens_out=0,
                prompt_tokens=0,
                prefill_time_ms=0.0,
                decode_time_ms=0.0,
                error=failure,
            ),
        )
        for job_id in job_ids
    ]


@dataclass
class _Submit:
    job_id: str
    prompt_ids: list[int]
    params: GenerationParams
    future: Future[Admitted] = field(default_factory=Future)


@dataclass
class _Cancel:
    job_id: str


class _Stop:
    pass


class Scheduler:
    """Runs the engine in a thread of its own (`start`) or the caller's (`run`); `submit` and `cancel` may be
    called from any thread. `on_step` is called on that thread once per step that produced tokens or ends."""

    def __init__(self, engine: Any, on_step: OnStep, on_fatal: Callable[[BaseException], None]) -> None:
        self._engine = engine
        self._on_step = on_step
        self._on_fatal = on_fatal
        self._commands: queue.SimpleQueue[_Submit | _Cancel | _Stop] = queue.SimpleQueue()
        self._running: set[str] = set()  # job ids in the engine (no state: the engine and the runtime keep it)
        self._thread = threading.Thread(target=self.run, name="rbees-scheduler", daemon=True)
        self._stopped = threading.Event()

    @property
    def active_jobs(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job_id: str, prompt_ids: list[int], params: GenerationParams) -> Future[Admitted]:
        """Queue a sequence; the future resolves to Admitted or to its refusal (AllSlotsBusy,
        InvalidParams) once the scheduler thread has tried it, before the next step."""
        command = _Submit(job_id, prompt_ids, params)
        if self._stopped.is_set():
            command.future.set_exception(RbeesError("the scheduler has stopped"))
        else:
            self._commands.put(command)
        return command.future

    def cancel(self, job_id: str) -> None:
        """Ask the engine to end a sequence; its FinishEvent(CANCELLED) comes within one step."""
        self._commands.put(_Cancel(job_id))

    def stop(self, timeout: float | None = None) -> None:
        self._commands.put(_Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the scheduler thread ------------------------------------------------------------
    def run(self) -> None:
        """Step the engine on the calling thread until `stop` (or the engine fails)."""
        try:
            self._engine.backend.enter_thread()
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the engine failed; every job must hear of it
            code = e.code if isinstance(e, RbeesError) else Internal.code
            log.exception("the engine failed; failing every active job", extra={"fields": {"code": code}})
            self._fail_all(e)
            self._on_fatal(e)
        finally:
            self._stopped.set()
            self._fail_queued()

    def _loop(self) -> None:
        while True:
            if not self._engine.has_work() and not self._handle(self._commands.get()):
                return  # idle: block until a command arrives
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if not self._handle(command):
                    return
            if self._engine.has_work():
                self._step()

    def _handle(self, command: _Submit | _Cancel | _Stop) -> bool:
        if isinstance(command, _Stop):
            return False
        if isinstance(command, _Cancel):
            if command.job_id in self._running:
                self._engine.cancel(command.job_id)
            return True
        if not command.future.set_running_or_notify_cancel():
            return True
        try:
            seq = self._engine.submit(command.prompt_ids, command.params, seq_id=command.job_id, detokenize=False)
        except Exception as e:  # noqa: BLE001 - refusals go back to the caller, who maps them to HTTP
            command.future.set_exception(e)
            return True
        self._running.add(command.job_id)
        command.future.set_result(Admitted(seq.prompt_tokens, seq.t_start))
        return True

    def _step(self) -> None:
        t0 = time.perf_counter()
        events = self._engine.step()
        now = time.perf_counter()
        if not events:
            return  # a step of prompt chunks only
        outputs: dict[str, JobOutput] = {}
        for event in events:
            out = outputs.get(event.seq_id)
            if out is None:
                out = outputs[event.seq_id] = JobOutput(event.seq_id)
            if isinstance(event, TokenEvent):
                out.token_ids.append(event.token_id)
            else:
                out.finish = event
                self._running.discard(event.seq_id)
        self._on_step(StepOutput(now, list(outputs.values()), now - t0, len(self._running)))

    def _fail_all(self, error: BaseException) -> None:
        ends = error_ends(self._running, error)
        self._running.clear()
        if ends:
            self._on_step(StepOutput(time.perf_counter(), ends))

    def _fail_queued(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Submit) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(RbeesError("the scheduler has stopped"))
