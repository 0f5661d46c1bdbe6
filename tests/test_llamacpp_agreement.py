"""Greedy continuations on the real SmolLM2 agree token for token with llama.cpp's."""

from __future__ import annotations

import pytest

from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.types import GenerationParams

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the dev-only reference (make dev)")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
    "The three primary colors are",
]
N_TOKENS = 16


@pytest.fixture(scope="module")
def reference(model_path):
    llm = llama_cpp.Llama(str(model_path), n_ctx=256, n_threads=2, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine.load(model_path, context_length=256)


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if tok == llm.token_eos() or len(out) == n:
            break
        out.append(tok)
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_llama_cpp(engine, reference, prompt):
    ids = reference.tokenize(prompt.encode(), add_bos=False, special=True)
    expected = _llama_greedy(reference, ids, N_TOKENS)
    ours = engine.generate_all(ids, GenerationParams(max_tokens=len(expected), temperature=0.0)).token_ids
    assert len(expected) >= 8, "llama.cpp stopped too early for a meaningful comparison"
    assert ours == expected


def test_capital_of_france_is_paris(engine):
    ids = engine.tokenizer.encode("The capital of France is")
    result = engine.generate_all(ids, GenerationParams(max_tokens=4, temperature=0.0))
    assert result.text.startswith(" Paris")
