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

import numpy as np
import pytest

from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.types import GenerationParams

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the dev-only reference (make dev)")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
    "Photosynthesis is the process",
    "1, 2, 3, 4,",
]
# prompts whose free-running continuations met a near tie early when this was written
NEAR_TIE_PROMPTS = [
    "The three primary colors are",
    "Le chat est",
    "日本の首都は",
    "import numpy as np\n",
    "<|im_start|>user\nTell me about the history of Rome.<|im_end|>\n<|im_start|>assistant\n",
]
N_TOKENS = 16
# a different argmax is accepted only where llama.cpp's own logit for our pick is this close to its top
TIE_LOGITS = 0.25


@pytest.fixture(scope="module")
def reference(model_path):
    llm = llama_cpp.Llama(str(model_path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine.load(model_path, context_length=256)


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    return _llama_greedy_scored(llm, ids, n)[0]


def _llama_greedy_scored(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy tokens and, for each, the logits row it picked that token from."""
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if tok == llm.token_eos() or len(out) == n:
            break
        out.append(tok)
    return out, np.array(llm.scores[len(ids) - 1 : len(ids) - 1 + len(out)])


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


@pytest.mark.parametrize("prompt", PROMPTS + NEAR_TIE_PROMPTS)
def test_greedy_matches_llama_cpp(engine, reference, prompt):
    """Token for token, up to the first step where llama.cpp's top two are within TIE_LOGITS."""
    ids = reference.tokenize(prompt.encode(), add_bos=False, special=True)
    expected, scores = _llama_greedy_scored(reference, ids, N_TOKENS)
    ours = engine.generate_all(ids, GenerationParams(max_tokens=len(expected), temperature=0.0)).token_ids
    assert len(ours) == len(expected) == N_TOKENS, "a prompt with a 16-token answer is needed"
    i = _first_difference(ours, expected)
    if i is None:
        return
    # the gap in the very logits llama.cpp chose from (one token at a time, as we decode): the same
    # tokens re-evaluated as one batch give llama.cpp logits up to ~0.7 apart (see the module docstring)
    row = scores[i]
    assert int(row.argmax()) == expected[i]
    gap = float(row[expected[i]] - row[ours[i]])
    assert gap <= TIE_LOGITS, f"step {i}: llama.cpp prefers {expected[i]} to our {ours[i]} by {gap:.3f} logits"


def test_most_prompts_agree_for_all_16_tokens(engine, reference):
    agree = 0
    for prompt in PROMPTS:
        ids = reference.tokenize(prompt.encode(), add_bos=False, special=True)
        expected = _llama_greedy(reference, ids, N_TOKENS)
        agree += engine.generate_all(ids, GenerationParams(max_tokens=N_TOKENS, temperature=0.0)).token_ids == expected
    assert agree >= len(PROMPTS) // 2, f"only {agree} of {len(PROMPTS)} prompts agree for {N_TOKENS} tokens"


@pytest.mark.parametrize("prompt", PROMPTS[:3] + NEAR_TIE_PROMPTS)
def test_teacher_forced_argmax(engine, reference, prompt):
    """Fed llama.cpp's greedy tokens, our argmax equals its pick at every step but near ties."""
    ids = reference.tokenize(prompt.encode(), add_bos=False, special=True)
    forced = _llama_greedy(reference, ids, N_TOKENS)
    seq = ids + forced
    reference.reset()
    reference.eval(seq)
    theirs = np.array(reference.scores[len(ids) - 1 : len(seq) - 1])
    n = len(seq) - 1
    model = engine.model
    ours = model.forward(np.array(seq[:n], np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
                         np.arange(len(ids) - 1, n, dtype=np.int32))  # fmt: skip
    picks = ours.argmax(axis=1)
    assert (picks == theirs.argmax(axis=1)).mean() >= 0.75, "more than near ties differ"
    for step, (pick, row) in enumerate(zip(picks, theirs, strict=True)):
        gap = row.max() - row[pick]
        assert gap <= TIE_LOGITS, f"step {step}: we pick {pick}, {gap:.3f} logits below llama.cpp's choice"


def test_capital_of_france_is_paris(engine):
    ids = engine.tokenizer.encode("The capital of France is")
    result = engine.generate_all(ids, GenerationParams(max_tokens=4, temperature=0.0))
    assert result.text.startswith(" Paris")
