"""The real Engine over a device whose every step takes a fixed time and does no math, for the benchmarks of
the host's share of serving (bench/engine_step.py, bench/serving_path.py).

The device is a queue as a GPU's is: a step of n tokens launched at t finishes `step_s` + n x `token_s` after t
or after the step before it, whichever is later, and its picks are known then (`Picks.ids()` sleeps until that
moment, the GIL released as a GPU wait releases it). The backend queues ahead and pads steps as the CUDA backend
does, so the engine takes the GPU's path: the next step batched and launched before this one's picks are read.
Each pick is the next id of `cycle` (real token ids of a model, none an end of text, so that a text path decodes
real pieces).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from rbees_workerd.engine.engine import Engine, step_tokens
from rbees_workerd.engine.tokenizer import Tokenizer
from rbees_workerd.kernels.backend import Picks
from rbees_workerd.settings import Settings


class _Picks(Picks):
    def __init__(self, ids: np.ndarray, ready_at: float) -> None:
        super().__init__(ids)
        self._ready_at = ready_at

    def ids(self) -> np.ndarray:
        wait = self._ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self._ids


class TimedBackend:
    """The surface of a backend that the engine's steps and the worker use."""

    name = "timed"
    device = "timed"
    queues_ahead = True
    pads_steps = True

    def __init__(self, step_s: float, cycle: Sequence[int], token_s: float = 0.0) -> None:
        self._step_s, self._token_s = step_s, token_s
        self._cycle = np.asarray(cycle, np.int64)
        self._done_at = 0.0  # when the last launched step finishes
        self._picked = 0

    def launch(self, n_tokens: int) -> None:
        self._done_at = max(time.perf_counter(), self._done_at) + self._step_s + n_tokens * self._token_s

    def sample_async(self, logits: Any, rows: list[Any]) -> Picks:
        at = (self._picked + np.arange(len(rows))) % len(self._cycle)
        self._picked += len(rows)
        return _Picks(self._cycle[at], self._done_at)

    def enter_thread(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0


def timed_engine(
    tokenizer: Any, slots: int, step_s: float, cycle: Sequence[int], context_length: int = 4096,
    token_s: float = 0.0, max_step_tokens: int | None = None,
) -> Engine:  # fmt: skip
    """An Engine of `slots` sequences whose steps take `step_s` plus `token_s` a token each, of at most
    max_step_tokens tokens (default: the engine's step_tokens for the slots)."""
    be = TimedBackend(step_s, cycle, token_s)

    def run(tokens: Any, positions: Any, slots: Any, rows: Any, feed: Any = None, pad: bool = True) -> Any:
        be.launch(len(tokens))
        return rows

    model = SimpleNamespace(
        cfg=None, be=be, slots=slots, context_length=context_length,
        max_step_tokens=max_step_tokens or step_tokens(slots), run=run,
        weight_bytes=0, kv_cache_bytes=0,
    )  # fmt: skip
    return Engine(model, tokenizer, "timed")


def load_timed(
    step_s: float, cycle: Sequence[int], settings: Settings, on_progress: Any, token_s: float = 0.0
) -> Engine:
    """The worker's engine factory (Settings.engine_factory, a partial over step_s and cycle): a timed engine
    with the model's tokenizer, of the worker's slots and step budget, loaded in its engine process."""
    return timed_engine(Tokenizer.from_file(settings.model), settings.slots, step_s, cycle, token_s=token_s,
                        max_step_tokens=settings.step_tokens)  # fmt: skip
