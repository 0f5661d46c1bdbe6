"""Greedy agreement of an engine with llama.cpp, token for token up to near ties.

rbees rounds activations the way llama.cpp does, but float32 sums in another order
now and then move an activation across a rounding boundary, which moves logits by
~0.1-0.3 (llama.cpp itself gives logits ~0.7 apart for the same tokens as one batch
or one at a time). So greedy continuations agree exactly until llama.cpp's top two
are within that noise: a different pick is accepted only where llama.cpp's own
logit for it is within TIE_LOGITS of its top. Used by tests/test_llamacpp_agreement.py
and tests/test_requantized_agreement.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.types import GenerationParams

N_TOKENS = 16
# a different argmax is accepted only where llama.cpp's own logit for our pick is this close to its top
TIE_LOGITS = 0.25
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
    "Photosynthesis is the process",
    "1, 2, 3, 4,",
]
_STOPPED = -1  # our pick where the engine stopped on an end-of-generation token


def llama_greedy_scored(
    llm: Any, ids: list[int], n: int, stop: frozenset[int] | None = None
) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy picks, n of them or up to and with the first of `stop` (default: its EOS),
    and for each the logits row it was picked from."""
    stop = stop or frozenset({llm.token_eos()})
    llm.reset()
    picks: list[int] = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if len(picks) == n:
            break
        picks.append(tok)
        if tok in stop:
            break
    return picks, np.array(llm.scores[len(ids) - 1 : len(ids) - 1 + len(picks)])


def llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    """llama.cpp's greedy tokens, n of them or up to its EOS."""
    picks, _ = llama_greedy_scored(llm, ids, n)
    return picks[:-1] if picks and picks[-1] == llm.token_eos() else picks


def greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    return engine.generate_all(ids, GenerationParams(max_tokens=n, temperature=0.0)).token_ids


def greedy_gap(engine: Engine, llm: Any, prompt: str, n: int = N_TOKENS) -> tuple[int | None, float]:
    """(first step where our greedy picks differ from llama.cpp's, or None; llama.cpp's logit gap there).

    The gap is taken in the very logits llama.cpp chose from (one token at a time, as we decode).
    Both stop on the engine's end-of-generation tokens; where we stopped, our pick counts as the
    one of them that llama.cpp ranks highest."""
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    stop = engine.tokenizer.eos_ids
    theirs, rows = llama_greedy_scored(llm, ids, n, stop)
    result = engine.generate_all(ids, GenerationParams(max_tokens=n, temperature=0.0))
    ours = result.token_ids + ([_STOPPED] if result.stop_reason == "EOS" else [])
    for i, (want, got) in enumerate(zip(theirs, ours, strict=False)):
        if want == got or (got == _STOPPED and want in stop):
            continue
        row = rows[i]
        assert int(row.argmax()) == want
        return i, float(row[want] - (row[sorted(stop)].max() if got == _STOPPED else row[got]))
    assert len(theirs) == len(ours)
    return None, 0.0


def assert_greedy_agrees(engine: Engine, llm: Any, prompt: str, n: int = N_TOKENS) -> None:
    """Token for token, up to the first step where llama.cpp's top two are within TIE_LOGITS."""
    i, gap = greedy_gap(engine, llm, prompt, n)
    assert i is None or gap <= TIE_LOGITS, f"step {i}: llama.cpp prefers its token to ours by {gap:.3f} logits"


def count_full_agreements(engine: Engine, llm: Any, prompts: list[str], n: int = N_TOKENS) -> int:
    """How many of `prompts` give the same n greedy tokens as llama.cpp."""
    agree = 0
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        agree += greedy(engine, ids, n) == llama_greedy(llm, ids, n)
    return agree


def teacher_forced_gaps(engine: Engine, llm: Any, prompt: str, n: int = N_TOKENS) -> np.ndarray:
    """Fed llama.cpp's greedy tokens in one batch: at each step, how far below llama.cpp's top
    (in llama.cpp's logits) our argmax is (0 where we pick the same)."""
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    seq = ids + llama_greedy(llm, ids, n)
    llm.reset()
    llm.eval(seq)
    theirs = np.array(llm.scores[len(ids) - 1 : len(seq) - 1])
    t = len(seq) - 1
    ours = engine.model.forward(np.array(seq[:t], np.int32), np.arange(t, dtype=np.int32), np.zeros(t, np.int32),
                                np.arange(len(ids) - 1, t, dtype=np.int32))  # fmt: skip
    picks = ours.argmax(axis=1)
    return theirs.max(axis=1) - theirs[np.arange(len(picks)), picks]
