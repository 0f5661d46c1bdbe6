"""Greedy continuations on the real SmolLM2 agree token for token with llama.cpp's.

Our CPU kernels round activations the way llama.cpp does (int8 blocks for the
quantized products, fp16 for the KV cache and attention weights), and every op
matches llama.cpp's to ~1e-7 relative when fed llama.cpp's own inputs (checked
with its eval callback while writing this). What remains are float32 summation
orders: a 1-ulp difference now and then moves an activation across an int8
rounding boundary, which moves the logits by ~0.1-0.3. llama.cpp itself shows
the same effect: the same tokens evaluated as one batch or one at a time give
logits up to ~0.7 apart. So free-running greedy continuations agree exactly
until the top two candidates are within that noise: the tests accept a
divergence only there (TIE_LOGITS, by llama.cpp's own logits), require most of
PROMPTS to agree for all 16 tokens, and check teacher-forced argmaxes step by step.

The reference is built for one x86-64 level (`make dev`: AVX2, no AVX-512), so that it
computes the same logits on every CI machine: its AVX-512 kernels sum in another order,
enough to move the near tie of the Rome prompt past TIE_LOGITS (0.272 there).
"""

from __future__ import annotations

import pytest
from agreement import (
    N_TOKENS,
    PROMPTS,
    TIE_LOGITS,
    assert_greedy_agrees,
    count_full_agreements,
    teacher_forced_gaps,
)

from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.types import GenerationParams

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the dev-only reference (make dev)")

# prompts whose free-running continuations met a near tie early when this was written
NEAR_TIE_PROMPTS = [
    "The three primary colors are",
    "Le chat est",
    "日本の首都は",
    "import numpy as np\n",
    "<|im_start|>user\nTell me about the history of Rome.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def reference(model_path):
    llm = llama_cpp.Llama(str(model_path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine.load(model_path, context_length=256)


@pytest.mark.parametrize("prompt", PROMPTS + NEAR_TIE_PROMPTS)
def test_greedy_matches_llama_cpp(engine, reference, prompt):
    """Token for token, up to the first step where llama.cpp's top two are within TIE_LOGITS."""
    assert_greedy_agrees(engine, reference, prompt)


def test_most_prompts_agree_for_all_16_tokens(engine, reference):
    agree = count_full_agreements(engine, reference, PROMPTS)
    assert agree >= len(PROMPTS) // 2, f"only {agree} of {len(PROMPTS)} prompts agree for {N_TOKENS} tokens"


@pytest.mark.parametrize("prompt", PROMPTS[:3] + NEAR_TIE_PROMPTS)
def test_teacher_forced_argmax(engine, reference, prompt):
    """Fed llama.cpp's greedy tokens, our argmax equals its pick at every step but near ties."""
    gaps = teacher_forced_gaps(engine, reference, prompt)
    assert (gaps == 0).mean() >= 0.75, "more than near ties differ"
    for step, gap in enumerate(gaps):
        assert gap <= TIE_LOGITS, f"step {step}: our pick is {gap:.3f} logits below llama.cpp's choice"


def test_capital_of_france_is_paris(engine):
    ids = engine.tokenizer.encode("The capital of France is")
    result = engine.generate_all(ids, GenerationParams(max_tokens=4, temperature=0.0))
    assert result.text.startswith(" Paris")
