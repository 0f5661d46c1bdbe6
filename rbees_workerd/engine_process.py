"""The engine in a process of its own (as vLLM v1 runs its engine core), beside the worker's HTTP side.

In one process the engine's thread and the event loop took turns on one GIL: on a GPU at 256 concurrent streams
the serving path delivered some 60% of the engine's tokens/s. Here a child process (spawned, never forked from a
process with threads) loads the engine and runs the Scheduler on it, on the thread that loaded it; the worker
keeps HTTP, the job table, the tokenizer and the metrics. One duplex pipe carries small pickled tuples: each
submit and each cancel one message, each engine step one message with every job's token ids and ends.

`EngineProcess` is what the runtime sees: the Scheduler's interface (submit, cancel, stop, with on_step called
once a step, on its reader thread, and on_fatal when the engine is gone).

Clocks: Admitted.at and StepOutput.at are the child's time.perf_counter(). On Linux that is CLOCK_MONOTONIC, one
clock for every process of the machine, so the worker subtracts its own perf_counter() readings from them.

Failure: the child exits when its engine fails (after sending its jobs' error ends), when the pipe closes, and
on Linux when the worker dies, even by SIGKILL (PR_SET_PDEATHSIG), so that no orphan keeps the GPU. The worker
sees the pipe close at once, ends every job still running with an error as the Scheduler does, and calls
on_fatal.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from rbees_workerd import logs
from rbees_workerd.engine.types import GenerationParams, LoadPhase
from rbees_workerd.errors import Internal, ModelLoadError, RbeesError
from rbees_workerd.scheduler import Admitted, JobOutput, OnStep, Scheduler, StepOutput, error_ends
from rbees_workerd.settings import Settings

if TYPE_CHECKING:
    from rbees_workerd.engine.engine import Engine

log = logging.getLogger("rbees_workerd.engine_process")

OnProgress = Callable[[LoadPhase, float], None]
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class EngineInfo:
    """What the worker needs to know of the loaded engine (its /health, ready callback, metrics and limits)."""

    backend: str
    device: str
    memory_bytes: int  # what the backend holds: weights, KV cache and scratch
    weight_bytes: int
    kv_cache_bytes: int
    slots: int
    context_length: int
    pid: int  # the engine process

    @property
    def vram_bytes(self) -> int:
        return self.memory_bytes if self.backend == "cuda" else 0


class EngineDied(Internal):
    """The engine process exited while the worker still needed it."""


class EngineProcess:
    """The engine's child process, seen as a Scheduler: `submit` and `cancel` may be called from any thread."""

    def __init__(
        self, settings: Settings, on_step: OnStep, on_fatal: Callable[[BaseException], None], on_progress: OnProgress
    ) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._conn, child_end = spawn.Pipe()
        self._process = spawn.Process(target=child_main, args=(child_end, settings, os.getpid()), name="rbees-engine")
        self._child_end = child_end
        self._on_step = on_step
        self._on_fatal = on_fatal
        self._on_progress = on_progress
        self._send_lock = threading.Lock()
        self._start_lock = threading.Lock()  # the child is never started once stop() has begun
        self._pending: dict[str, Future[Admitted]] = {}  # submitted, not yet answered
        self._running: set[str] = set()  # admitted, not yet ended (the reader thread's own)
        self._loaded = threading.Event()
        self.info: EngineInfo | None = None
        self._load_error: BaseException | None = None
        self._closed = False  # the child is gone (or never came): submits are refused at once
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="rbees-engine-reader", daemon=True)

    def start(self) -> None:
        """Start the child, which begins loading the engine at once (see `wait_loaded`)."""
        self._reader.start()

    def wait_loaded(self) -> EngineInfo:
        """Block until the engine is loaded; raises the load's error (ModelLoadError, VramOOM, ...)."""
        self._loaded.wait()
        if self.info is None:
            code = self._process.exitcode
            raise self._load_error or ModelLoadError(f"the engine process exited with code {code} while loading")
        return self.info

    def submit(self, job_id: str, prompt_ids: list[int], params: GenerationParams) -> Future[Admitted]:
        """Send a sequence to the engine; the future resolves to Admitted or to the engine's refusal
        (AllSlotsBusy, InvalidParams: the same class, code and message as raised in the child)."""
        future: Future[Admitted] = Future()
        self._pending[job_id] = future
        if self._closed or not self._send(("submit", job_id, prompt_ids, params)):
            self._refuse(job_id)
        return future

    def cancel(self, job_id: str) -> None:
        """Ask the engine to end a sequence; its FinishEvent(CANCELLED) comes within one step."""
        self._send(("cancel", job_id))

    def stop(self, timeout: float | None = None) -> None:
        """End the child: a loaded one stops its scheduler and exits (waited for up to `timeout`); one still
        loading, or not exiting, is killed."""
        with self._start_lock:
            self._stopping = True
        if self.info is not None and self._send(("stop",)):
            self._reader.join(timeout)  # the reader ends once the child has exited
        if self._reader.is_alive():
            with self._start_lock:
                if self._process.pid is not None:
                    self._process.kill()
            self._reader.join()

    def _send(self, message: tuple[Any, ...]) -> bool:
        """Send to the child; False once it is gone."""
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:
            return False
        return True

    def _refuse(self, job_id: str) -> None:
        future = self._pending.pop(job_id, None)  # whoever pops it answers it, exactly once
        if future is not None:
            future.set_exception(RbeesError("the engine has stopped"))

    # ---- the reader thread: it starts the child and lives as long as the child does ----------
    def _read(self) -> None:
        try:
            with self._start_lock:
                if self._stopping:
                    return
                # from this thread: PR_SET_PDEATHSIG fires when the thread that started the child ends
                self._process.start()
            self._child_end.close()  # this process's copy: the pipe then closes when the child exits
            while True:
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            pass  # the child has exited
        except Exception as e:  # noqa: BLE001 - the child could not start, or a bug here: the engine is lost all the same
            log.exception("the engine process failed", extra={"fields": {"code": "INTERNAL"}})
            self._load_error = e
        finally:
            self._ended()

    def _handle(self, message: tuple[Any, ...]) -> None:
        match message:
            case ("step", at, step_s, slots_in_use, job_ids, token_ids, finishes):
                if any(finishes):
                    self._running.difference_update(f.seq_id for f in finishes if f is not None)
                self._on_step(StepOutput(at, list(map(JobOutput, job_ids, token_ids, finishes)), step_s, slots_in_use))
            case ("admitted", job_id, admitted):
                self._running.add(job_id)
                self._pending.pop(job_id).set_result(admitted)
            case ("refused", job_id, error):
                self._pending.pop(job_id).set_exception(error)
            case ("progress", phase, fraction):
                self._on_progress(phase, fraction)
            case ("ready", info):
                self.info = info
                self._loaded.set()
            case ("failed", error):
                self._load_error = error

    def _ended(self) -> None:
        """The child has exited (or was never started): everyone waiting on it hears of it."""
        if self._process.pid is not None:
            if not self._stopping:
                self._process.kill()  # gone already (its pipe closed), or this thread failed: it must not outlive it
            self._process.join()
        code = self._process.exitcode
        self._closed = True
        for job_id in list(self._pending):
            self._refuse(job_id)
        if self.info is None:
            self._loaded.set()
            return
        if self._stopping:
            return
        error = EngineDied(f"the engine process exited with code {code}")
        log.error(
            f"the engine failed: its process exited with code {code}; failing every active job",
            extra={"fields": {"code": error.code, "exit_code": code, "active_jobs": len(self._running)}},
        )
        ends = error_ends(self._running, error)
        self._running.clear()
        if ends:
            self._on_step(StepOutput(time.perf_counter(), ends))
        self._on_fatal(error)


# ---- the child --------------------------------------------------------------------------------------
def child_main(conn: Connection, settings: Settings, parent_pid: int) -> None:
    """The engine process: load the engine, say ready, then feed the parent's submits and cancels to the
    Scheduler until told to stop or the parent is gone."""
    _die_with_parent(parent_pid)
    for sig in (signal.SIGTERM, signal.SIGINT):  # the worker drains on these (rbees-pool signals the whole
        signal.signal(sig, signal.SIG_IGN)  # process group): it says when the engine stops
    logs.configure(settings.worker_id, settings.log_level)
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:  # from this thread and the pipe's (`_forward`)
        with lock:
            conn.send(message)

    try:
        engine = _load_engine(settings, lambda phase, fraction: send(("progress", phase, fraction)))
    except Exception as e:  # noqa: BLE001 - every load failure goes to the worker, which reports it
        send(("failed", _portable(e, ModelLoadError)))
        return
    gc.collect()  # the heap the load leaves (modules, kernels, tokenizer) frozen, as rbees-orcd's start-up:
    gc.freeze()  # the collections while serving then walk only what the jobs make
    send(("ready", _info(engine)))
    scheduler = Scheduler(engine, lambda step: send(_pack(step)), _exit_on_fatal)
    threading.Thread(target=_forward, args=(conn, scheduler, send), name="rbees-engine-pipe", daemon=True).start()
    # The steps run on this thread, the one that loaded the engine. Numba's CPU kernels run on OpenMP, which
    # gives every thread that starts parallel work a team of threads of its own: with the loading thread's
    # team still alive beside the stepping thread's (more threads than cores), libgomp sleeps at its barriers
    # instead of spinning, and a step took 3 times as long (SmolLM2-135M, 2 cores: 60 tokens/s against 175).
    scheduler.run()


def _forward(conn: Connection, scheduler: Scheduler, send: Callable[[tuple[Any, ...]], None]) -> None:
    """The engine process's pipe reader: the worker's submits and cancels to the scheduler, until the worker
    says stop or is gone."""
    try:
        while True:
            match conn.recv():
                case ("submit", job_id, prompt_ids, params):
                    scheduler.submit(job_id, prompt_ids, params).add_done_callback(partial(_answer, send, job_id))
                case ("cancel", job_id):
                    scheduler.cancel(job_id)
                case ("stop",):
                    return
    except (EOFError, OSError):
        return  # the worker is gone
    finally:
        scheduler.stop()


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when the worker dies, however it dies (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the worker died before the prctl
        os._exit(1)


def _load_engine(settings: Settings, on_progress: OnProgress) -> Engine:
    if settings.engine_factory is not None:
        return settings.engine_factory(settings, on_progress)
    from rbees_workerd.engine.engine import Engine

    s = settings
    return Engine.load(
        s.model,
        backend=s.backend,
        gpu=s.gpu,
        threads=s.threads,
        slots=s.slots,
        context_length=s.context_length,
        max_step_tokens=s.step_tokens,
        on_progress=on_progress,
    )


def _info(engine: Engine) -> EngineInfo:
    return EngineInfo(
        backend=engine.backend.name,
        device=engine.backend.device,
        memory_bytes=engine.backend.memory_bytes(),
        weight_bytes=engine.model.weight_bytes,
        kv_cache_bytes=engine.model.kv_cache_bytes,
        slots=engine.slots,
        context_length=engine.context_length,
        pid=os.getpid(),
    )


def _pack(step: StepOutput) -> tuple[Any, ...]:
    """A step as plain lists, which pickle in 13 us where the dataclasses took 181 (256 jobs, on the thread that
    steps the engine); unpickled and made dataclasses again in the worker in 52 us against their 93."""
    jobs = step.jobs
    return ("step", step.at, step.step_s, step.slots_in_use,
            [j.job_id for j in jobs], [j.token_ids for j in jobs], [j.finish for j in jobs])  # fmt: skip


def _answer(send: Callable[[tuple[Any, ...]], None], job_id: str, future: Future[Admitted]) -> None:
    error = future.exception()
    if error is None:
        send(("admitted", job_id, future.result()))
    else:
        send(("refused", job_id, _portable(error, Internal)))


def _portable(error: BaseException, fallback: type[RbeesError]) -> RbeesError:
    """The error as the worker can take it: an RbeesError as it is (it pickles), any other one (whose class
    may not) as `fallback` naming it, logged here with its traceback."""
    if isinstance(error, RbeesError):
        return error
    log.error(f"the engine raised {type(error).__name__}", exc_info=error, extra={"fields": {"code": fallback.code}})
    return fallback(f"{type(error).__name__}: {error}")


def _exit_on_fatal(error: BaseException) -> None:
    """The engine failed (the Scheduler has logged it and sent its jobs' error ends): the process ends, and
    its closed pipe tells the worker."""
    os._exit(1)
