"""Engine stepping on a tiny model: cancellation takes effect at the very next step."""

from __future__ import annotations

from pathlib import Path

import pytest
from ggufgen import write_tiny_model

from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.types import FinishEvent, GenerationParams, TokenEvent


@pytest.mark.parametrize("queues_ahead", [False, True])  # True: a's next token is being computed at the cancel
def test_cancel_ends_the_sequence_at_the_next_step_and_the_others_go_on(tmp_path: Path, queues_ahead: bool) -> None:
    engine = Engine.load(write_tiny_model(tmp_path / "tiny.gguf"), slots=2, context_length=64)
    engine.backend.queues_ahead = queues_ahead
    params = GenerationParams(max_tokens=40, temperature=0.0)
    a, b = engine.submit([1, 2, 3], params), engine.submit([4, 5], params)
    for _ in range(3):
        events = engine.step()
        assert {e.seq_id for e in events if isinstance(e, TokenEvent)} == {a.id, b.id}
    generated = len(a.generated)
    engine.cancel(a.id)
    events = engine.step()
    ends = [e for e in events if isinstance(e, FinishEvent)]
    assert [(e.seq_id, e.stop_reason, e.tokens_out) for e in ends] == [(a.id, "CANCELLED", generated)]
    assert [e.seq_id for e in events if isinstance(e, TokenEvent)] == [b.id]  # no token for a after the cancel
    assert engine.free_slots() == 1 and engine.has_work()
