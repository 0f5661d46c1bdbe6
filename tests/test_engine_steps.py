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


def test_a_sequence_cancelled_while_its_prompt_is_in_chunks_stops_taking_them(tmp_path: Path) -> None:
    """A prompt longer than a step goes in over several steps; cancelled midway, it ends at the next step, takes
    no more chunks, and its slot serves a new sequence, whose tokens are those of the same prompt alone."""
    engine = Engine.load(write_tiny_model(tmp_path / "tiny.gguf"), slots=2, context_length=64, max_step_tokens=8)
    params = GenerationParams(max_tokens=4, temperature=0.0)
    long_prompt = list(range(1, 30))
    a = engine.submit(long_prompt, params)
    assert engine.step() == [] and 0 < a.cached < len(long_prompt)  # a chunk of the prompt, nothing sampled
    cached = a.cached
    engine.cancel(a.id)
    events = engine.step()
    assert [(e.seq_id, e.stop_reason) for e in events] == [(a.id, "CANCELLED")] and a.cached == cached
    assert not engine.has_work() and engine.free_slots() == 2
    alone = [e.token_id for e in engine.generate([4, 5, 6], params) if isinstance(e, TokenEvent)]
    b = engine.submit([4, 5, 6], params)
    got = []
    while engine.has_work():
        got += [e.token_id for e in engine.step() if isinstance(e, TokenEvent) and e.seq_id == b.id]
    assert got == alone and len(got) == 4
