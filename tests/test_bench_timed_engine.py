"""bench/timed_engine.py: the real Engine over a device that only takes time, as bench/engine_step.py and
bench/serving_path.py run it: every sequence gets its tokens from the cycle and ends as asked, on the path a
GPU takes (the next step queued before this one's picks are read)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import engine_step  # noqa: E402
from timed_engine import timed_engine  # noqa: E402

from rbees_workerd.engine.types import FinishEvent, GenerationParams, TokenEvent  # noqa: E402


def test_every_sequence_gets_the_cycle_s_tokens_and_ends_at_max_tokens() -> None:
    engine = timed_engine(SimpleNamespace(eos_ids=frozenset({0})), slots=3, step_s=0.0, cycle=[7, 8, 9, 10])
    ids = [engine.submit([1, 2], GenerationParams(max_tokens=n, temperature=0.0), detokenize=False).id
           for n in (2, 5, 9)]  # fmt: skip
    tokens: dict[object, list[int]] = {i: [] for i in ids}
    ends = {}
    steps = 0
    while engine.has_work():
        steps += 1
        for e in engine.step():
            if isinstance(e, TokenEvent):
                tokens[e.seq_id].append(e.token_id)
            else:
                assert isinstance(e, FinishEvent)
                ends[e.seq_id] = (e.stop_reason, e.tokens_out)
    assert ends == {ids[0]: ("MAX_TOKENS", 2), ids[1]: ("MAX_TOKENS", 5), ids[2]: ("MAX_TOKENS", 9)}
    assert all(len(tokens[i]) == n and set(tokens[i]) <= {7, 8, 9, 10} for i, n in zip(ids, (2, 5, 9), strict=True))
    assert engine.backend.queues_ahead and steps <= 9 + 2


def test_engine_step_times_every_step() -> None:
    times = engine_step.measure(streams=8, steps=20)
    assert len(times) == 20 and all(t > 0 for t in times)
