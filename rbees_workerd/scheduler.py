"""The one thread that owns the engine.

The engine is not thread-safe, so the HTTP side never touches it: it sends submissions and
cancels through a queue, and this thread runs `engine.step()` (one batched forward over every
active sequence) for as long as there is work, handing each event to the job's sink. A request
that arrives mid-generation is submitted between two steps and joins the next one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from rbees_workerd.engine.types import Event, FinishEvent, GenerationParams, TokenEvent
from rbees_workerd.errors import RbeesError
from rbees_workerd.metrics import WorkerMetrics

log = logging.getLogger("rbees_workerd.scheduler")

Sink = Callable[[Event], None]


@dataclass
class _Submit:
    prompt_ids: list[int]
    params: GenerationParams
    sink: Sink
    future: Future[Any] = field(default_factory=Future)


@dataclass
class _Cancel:
    seq_id: int


class _Stop:
    pass


@dataclass
class _Active:
    sink: Sink
    prompt_tokens: int
    submitted: float
    last_token: float | None = None
    tokens_out: int = 0


class Scheduler:
    """Runs the engine in a dedicated thread; `submit` and `cancel` may be called from any thread."""

    def __init__(self, engine: Any, metrics: WorkerMetrics, on_fatal: Callable[[BaseException], None]) -> None:
        self._engine = engine
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._commands: queue.SimpleQueue[_Submit | _Cancel | _Stop] = queue.SimpleQueue()
        self._active: dict[int, _Active] = {}
        self._thread = threading.Thread(target=self._run, name="rbees-scheduler", daemon=True)
        self._stopped = threading.Event()

    @property
    def active_jobs(self) -> int:
        return len(self._active)

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: GenerationParams, sink: Sink) -> Future[Any]:
        """Queue a sequence; the future resolves to the engine's Sequence or to its refusal
        (AllSlotsBusy, InvalidParams) once the scheduler thread has tried it, before the next step."""
        command = _Submit(prompt_ids, params, sink)
        if self._stopped.is_set():
            command.future.set_exception(RbeesError("the scheduler has stopped"))
        else:
            self._commands.put(command)
        return command.future

    def cancel(self, seq_id: int) -> None:
        """Ask the engine to end a sequence; its sink then gets FinishEvent(CANCELLED) within one step."""
        self._commands.put(_Cancel(seq_id))

    def stop(self, timeout: float | None = None) -> None:
        self._commands.put(_Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the scheduler thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._engine.backend.enter_thread()
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the engine failed; every job must hear of it
            log.exception("the engine failed; failing every active job", extra={"fields": {"code": "INTERNAL"}})
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
            if command.seq_id in self._active:
                self._engine.cancel(command.seq_id)
            return True
        if not command.future.set_running_or_notify_cancel():
            return True
        try:
            seq = self._engine.submit(command.prompt_ids, command.params)
        except Exception as e:  # noqa: BLE001 - refusals go back to the caller, who maps them to HTTP
            command.future.set_exception(e)
            return True
        self._active[seq.id] = _Active(command.sink, seq.prompt_tokens, time.perf_counter())
        self._metrics.jobs_started.inc()
        self._metrics.prompt_tokens.inc(seq.prompt_tokens)
        self._metrics.slots_in_use.set(len(self._active))
        command.future.set_result(seq)
        return True

    def _step(self) -> None:
        events = self._engine.step()
        now = time.perf_counter()
        for event in events:
            job = self._active.get(event.seq_id)
            if job is None:
                continue
            if isinstance(event, TokenEvent):
                if event.index >= job.tokens_out:  # not the text flushed at the end for the last token
                    self._record_token(job, now)
            else:
                self._record_finish(event)
                del self._active[event.seq_id]
            job.sink(event)
        self._metrics.slots_in_use.set(len(self._active))

    def _record_token(self, job: _Active, now: float) -> None:
        m = self._metrics
        m.tokens_generated.inc()
        if job.last_token is None:
            m.time_to_first_token.observe(now - job.submitted)
        else:
            m.token_latency.observe(now - job.last_token)
        job.last_token = now
        job.tokens_out += 1

    def _record_finish(self, event: FinishEvent) -> None:
        m = self._metrics
        if event.stop_reason == "CANCELLED":
            m.jobs_cancelled.inc()
        elif event.stop_reason == "ERROR":
            m.jobs_failed.inc()
        else:
            m.jobs_completed.labels(event.stop_reason).inc()

    def _fail_all(self, error: BaseException) -> None:
        for seq_id, job in list(self._active.items()):
            self._metrics.jobs_failed.inc()
            job.sink(
                FinishEvent(
                    seq_id=seq_id,
                    stop_reason="ERROR",
                    tokens_out=job.tokens_out,
                    prompt_tokens=job.prompt_tokens,
                    prefill_time_ms=0.0,
                    decode_time_ms=0.0,
                    error=f"the engine failed ({type(error).__name__})",
                )
            )
        self._active.clear()
        self._metrics.slots_in_use.set(0)

    def _fail_queued(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Submit) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(RbeesError("the scheduler has stopped"))
