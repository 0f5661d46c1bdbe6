"""Queuing the next step before reading this one's tokens (Backend.queues_ahead), and padding steps to a
few sizes (Backend.pads_steps), change no sequence's events.

The CPU backend computes as it is called, so it does neither by itself; these tests turn the
engine's pipelined and padded paths on for a real CPU backend and compare them, event for event,
with the plain path (the GPU tests do the same on the device, where the picks stay on it).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
from ggufgen import write_tiny_model

from rbees_workerd.engine.engine import Engine, step_tokens
from rbees_workerd.engine.model import padded, padded_sizes
from rbees_workerd.engine.types import Event, FinishEvent, GenerationParams, TokenEvent
from rbees_workerd.errors import InvalidParams
from rbees_workerd.kernels.cpu.backend import CpuBackend

GREEDY = GenerationParams(max_tokens=30, temperature=0.0)
# step of the run -> what happens before it: ("submit", name, prompt, params) or ("cancel", name)
SCRIPT: dict[int, list[tuple]] = {
    0: [("submit", "a", [1, 2, 3], GREEDY),
        ("submit", "b", [4, 5, 6, 7, 8], GenerationParams(max_tokens=12, temperature=0.8, seed=7))],
    3: [("submit", "c", list(range(10, 30)), GenerationParams(max_tokens=200, temperature=0.0))],  # to the end
    5: [("cancel", "a")],
    7: [("submit", "d", [9, 9, 9], GenerationParams(max_tokens=10, temperature=0.7, repetition_penalty=1.3, seed=3))],
    9: [("submit", "e", [3, 1, 4, 1, 5], GenerationParams(max_tokens=40, temperature=1.0, seed=11, stop=("e",)))],
    16: [("submit", "f", [2, 7], GenerationParams(max_tokens=1, temperature=0.0))],  # in b's slot
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("pipeline") / "tiny.gguf")


def _run(
    path: Path, queues_ahead: bool, pads: bool = False, warm: bool = False
) -> tuple[dict[str, list[tuple]], int, int, list[tuple[int, int]]]:
    """Play SCRIPT (after the engine's warm-up again, where `warm`); each sequence's events, how many steps
    took their first tokens from picks, how many steps ran padded (more tokens than the engine asked for),
    and every step's (tokens, logit rows) as run."""
    with mock.patch.object(CpuBackend, "pads_steps", pads):  # (the model keeps its pad slot from its load on)
        engine = Engine.load(path, slots=4, context_length=48)
    engine.backend.queues_ahead = queues_ahead
    run, run_step, fed, asked, ran = engine.model.run, engine.backend.run_step, 0, [], []

    def counting_run(tokens, *args, feed=None, pad=False):  # noqa: ANN001, ANN002, ANN202
        nonlocal fed
        fed += feed is not None
        asked.append(len(tokens))
        return run(tokens, *args, feed=feed, pad=pad)

    def recording_run_step(key, step):  # noqa: ANN001, ANN202
        ran.append(key)  # (tokens, logit rows, one sequence)
        return run_step(key, step)

    engine.model.run = counting_run
    engine.backend.run_step = recording_run_step
    if warm:
        engine.warm_up()
    names: dict[int, str] = {}
    events: dict[str, list[tuple]] = {}
    step = 0
    while step <= max(SCRIPT) or engine.has_work():
        for action in SCRIPT.get(step, []):
            if action[0] == "submit":
                seq = engine.submit(action[2], action[3])
                names[seq.id] = action[1]
                events[action[1]] = []
            else:
                engine.cancel(next(i for i, n in names.items() if n == action[1]))
        for e in engine.step():
            events[names[e.seq_id]].append(_plain(e))
        step += 1
        assert step < 500
    limit = engine.model.max_step_tokens
    # padded: every step of several sequences (all slots held or not), to its size; a padded step's one shape,
    # with a logit row a token up to one a slot
    assert all(n == (padded(a, limit) if pads and not one else a) for a, (n, _, one) in zip(asked, ran, strict=True))
    rows_limit = engine.model.max_logit_rows
    assert rows_limit == 4
    assert all(rows == min(n, rows_limit) for a, (n, rows, _) in zip(asked, ran, strict=True) if n > a)
    return events, fed, sum(n > a for a, (n, _, _) in zip(asked, ran, strict=True)), [key[:2] for key in ran]


def _plain(e: Event) -> tuple:
    if isinstance(e, TokenEvent):
        return ("token", e.token_id, e.text, e.index)
    assert isinstance(e, FinishEvent)
    return ("finish", e.stop_reason, e.tokens_out, e.prompt_tokens, e.stop_sequence)


def test_queued_steps_give_every_sequence_the_same_events(tiny: Path) -> None:
    want, fed_plain, _, _ = _run(tiny, queues_ahead=False)
    got, fed, _, _ = _run(tiny, queues_ahead=True)
    assert fed_plain == 0 and fed >= 15  # the pipelined path ran (not while d, whose penalty needs history, runs)
    assert got == want
    reasons = {name: evs[-1][1] for name, evs in want.items()}
    assert reasons["a"] == "CANCELLED" and reasons["c"] == "MAX_TOKENS" and reasons["f"] == "MAX_TOKENS"
    assert reasons["e"] == "STOP_SEQUENCE"
    assert want["c"][-1][2] == 48 - 20 + 1  # c ran to the context's end (its last token is not stored)
    assert len(want["d"]) > 1  # the penalized sequence (never fed) generated



@pytest.mark.parametrize("queues_ahead", [False, True])
def test_padded_steps_give_every_sequence_the_same_events(tiny: Path, queues_ahead: bool) -> None:
    """Steps of several sequences padded to `padded` sizes, as many logit rows as tokens up to the slots (extra
    tokens in the model's pad slot, extra logit rows copies of the last), with and without queued steps, also while
    every slot generates: the same events as unpadded steps."""
    want, _, unpadded, _ = _run(tiny, queues_ahead=False)
    got, _, padded_steps, _ = _run(tiny, queues_ahead=queues_ahead, pads=True)
    assert unpadded == 0 and padded_steps >= 5
    assert got == want


def test_warm_up_runs_every_padded_size_twice_in_the_pad_slot(tiny: Path) -> None:
    """On a backend that captures steps per shape (at a shape's second step), the warm-up runs each padded size
    of a step of several sequences twice, as many logit rows as tokens; the sequences that come after get the
    events of an engine that did not (the pad slot's cache is written before it is read)."""
    want, _, _, _ = _run(tiny, queues_ahead=False)
    got, _, _, ran = _run(tiny, queues_ahead=True, pads=True, warm=True)
    assert got == want
    limit = Engine.load(tiny, slots=4, context_length=48).model.max_step_tokens
    sizes = padded_sizes(limit)
    assert {1, 2, 4, 8, 16, 32, 48, 64, limit} <= set(sizes)
    assert all(ran.count((size, min(size, 4))) >= 2 for size in sizes)


def test_a_step_holds_a_prompt_token_for_every_slot(tiny: Path) -> None:
    """The default step budget of an engine of many slots is eight tokens a slot, up to 2,048: a burst of short
    prompts on every slot is prefilled in one step (with 256 tokens, only the first 128 two-token prompts of 160
    were)."""
    engine = Engine.load(tiny, slots=160, context_length=48)
    assert engine.model.max_step_tokens == 1280
    assert engine.model.max_logit_rows == 192  # (the padded size of 160 rows)
    assert Engine.load(tiny, slots=4, context_length=48).model.max_step_tokens == 256
    assert step_tokens(256) == 2048 and step_tokens(32) == 256
    with pytest.raises(InvalidParams, match="cannot hold a token for each of 64 slots"):
        Engine.load(tiny, slots=64, context_length=48, max_step_tokens=32)
    for i in range(160):
        engine.submit([1 + i % 7, 2], GenerationParams(max_tokens=3, temperature=0.0))
    sampled = {e.seq_id for e in engine.step()}  # (a token, or an end at a first token of end of text)
    assert len(sampled) == 160
