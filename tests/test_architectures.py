"""The architectures of issue #21 on tiny random-weight GGUFs: Llama 3 (`llama3` RoPE frequency
factors, tied embeddings, a 128k context), qwen2 with tied embeddings, qwen3 (per-head q/k
RMSNorm, head size from attention.key_length) and phi3 (fused attn_qkv and gate/up ffn_up,
LongRoPE's long/short factors and attention factor).

Each file is written here with the `gguf` package and the tiny tokenizer of tests/ggufgen.py, and
run three ways: the engine's CPU logits against the float64 reference of the same math
(tests/reference.py), against llama.cpp's logits on the same file with greedy continuations
agreeing (tests/agreement.py's rule), and (on a GPU) the CUDA backend against the CPU. The CUDA
kernels' side of these features runs under the simulator in tests/test_cuda_kernels.py
(test_rope_features_equal_the_cpu_backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from agreement import TIE_LOGITS, assert_greedy_agrees, llama_greedy_scored
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from ggufgen import _add_tokenizer, _encode, _padded, gpt2_vocab
from gpu import require_gpu
from reference import reference_logits

from rbees_workerd.engine.config import ARCHITECTURES, ModelConfig
from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.gguf import load_gguf
from rbees_workerd.engine.types import GenerationParams
from rbees_workerd.errors import ModelLoadError

VOCAB = 512
PROMPT = "The quick brown fox jumps over the lazy dog. Hello world! def main():"
PROMPTS = ["The quick brown fox", "Hello there, how are you? I am", "def main():\n    for i in",
           "What is the capital of France? Paris", "the cat sat on the mat, and the dog"]
# Relative error (|ours - ref| / |ref| over all logits) to the float64 reference of the same math and
# rounding, median over PROMPTS. The engine's float32 values and the reference's float64 ones fall on
# either side of an fp16 or int8 rounding boundary now and then (see test_model_reference.py): with
# float weights, whose products are float32-inexact, most prompts meet a few such flips (measured
# 5e-5..4e-4), with Q8_0 ones, whose integer products are exact, a few prompts meet one (up to 9e-3
# on qwen3-q8, whose q/k norms amplify it; the others 4e-8). A flip moves one prompt, a wrong op all.
REFERENCE_BOUND = {Q.F32: 1e-3, Q.F16: 1e-3, Q.Q8_0: 1e-5}
# max |ours - llama.cpp| over every logit of a prompt (logits of spread ~1); llama.cpp sums in other
# orders and computes its RoPE angles in float32. Measured on these files: 0 to 0.003 (to float32
# noise where the weights are Q8_0), a prompt meeting a rounding flip up to 0.05
LLAMA_CPP_BOUND = 0.1


@dataclass(frozen=True)
class Case:
    arch: str
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    qtype: Q
    theta: float
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    fused: bool = False  # phi3's attn_qkv and gate/up ffn_up
    rope: str | None = None  # "llama3" (rope_freqs) or "longrope" (long/short factors)
    context_length: int = 4096
    original_context: int = 0  # LongRoPE's rope.scaling.original_context_length


CASES = {
    "llama3": Case("llama", 128, 4, 2, 32, 256, Q.Q8_0, 500000.0, tied=True, rope="llama3", context_length=131072),
    "qwen2-tied": Case("qwen2", 64, 2, 1, 32, 128, Q.F16, 1e6, tied=True, qkv_bias=True),
    "qwen3": Case("qwen3", 64, 4, 2, 32, 128, Q.F16, 1e6, qk_norm=True),
    "qwen3-q8": Case("qwen3", 64, 4, 2, 32, 128, Q.Q8_0, 1e6, qk_norm=True, tied=True),
    "phi3": Case("phi3", 96, 3, 3, 32, 128, Q.F32, 10000.0, fused=True),
    "phi3-longrope": Case("phi3", 96, 3, 3, 32, 128, Q.Q8_0, 10000.0, fused=True, rope="longrope",
                          context_length=4096, original_context=512),  # fmt: skip
}


def llama3_factors(theta: float, head_dim: int) -> np.ndarray:
    """rope_freqs as llama.cpp's converter computes it from Llama 3.1's rope_scaling
    (factor 8, low_freq_factor 1, high_freq_factor 4, original context 8192)."""
    factor, low, high, old = 8.0, 1.0, 4.0, 8192
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write_case(path: Path, c: Case, seed: int = 0) -> Path:
    """A 2-layer random model of case c, laid out as llama.cpp's converter writes the architecture."""
    v = _padded(gpt2_vocab(), VOCAB)
    rng = np.random.default_rng(seed)
    d, e, qd, kv = c.dim, c.head_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    w = GGUFWriter(path, c.arch)
    w.add_name("tiny random model")  # (llama.cpp treats a name with "phi3" in it to Phi-3's special tokens)
    w.add_block_count(2)
    w.add_context_length(c.context_length)
    w.add_embedding_length(d)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    if qd != d:
        w.add_key_length(e)
        w.add_value_length(e)
    w.add_rope_dimension_count(e)
    w.add_rope_freq_base(c.theta)
    w.add_layer_norm_rms_eps(1e-5 if c.arch == "llama" else 1e-6)
    w.add_vocab_size(VOCAB)
    if c.rope == "longrope":
        scale = c.context_length / c.original_context
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(c.original_context)))
        w.add_rope_scaling_orig_ctx_len(c.original_context)
    _add_tokenizer(w, v, "smollm")

    def matrix(name: str, rows: int, cols: int, gain: float = 1.0) -> None:
        data = _encode(rng, (rows, cols), c.qtype, gain / np.sqrt(cols))
        w.add_tensor(name, data, raw_dtype=None if data.dtype != np.uint8 else c.qtype)

    def vector(name: str, n: int, mean: float, spread: float) -> None:
        w.add_tensor(name, (mean + rng.standard_normal(n) * spread).astype(np.float32))

    matrix("token_embd.weight", VOCAB, d)  # tied or not, logits of spread ~1
    if c.rope == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_factors(c.theta, e))
    elif c.rope == "longrope":  # (real files start near 1 for the fast pairs; these move every pair)
        w.add_tensor("rope_factors_long.weight", rng.uniform(1.0, 16.0, e // 2).astype(np.float32))
        w.add_tensor("rope_factors_short.weight", rng.uniform(1.0, 3.0, e // 2).astype(np.float32))
    for i in range(2):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", d, 1.0, 0.1)
        if c.fused:
            matrix(p + "attn_qkv.weight", qd + 2 * kv, d, 2.0)
        else:
            matrix(p + "attn_q.weight", qd, d, 2.0)
            matrix(p + "attn_k.weight", kv, d, 2.0)
            matrix(p + "attn_v.weight", kv, d)
        if c.qkv_bias:
            vector(p + "attn_q.bias", qd, 0.0, 0.1)
            vector(p + "attn_k.bias", kv, 0.0, 0.1)
            vector(p + "attn_v.bias", kv, 0.0, 0.1)
        if c.qk_norm:
            vector(p + "attn_q_norm.weight", e, 0.6, 0.1)  # scores of spread ~2
            vector(p + "attn_k_norm.weight", e, 0.6, 0.1)
        matrix(p + "attn_output.weight", d, qd)
        vector(p + "ffn_norm.weight", d, 1.0, 0.1)
        if c.fused:
            matrix(p + "ffn_up.weight", 2 * c.ffn_dim, d)
        else:
            matrix(p + "ffn_gate.weight", c.ffn_dim, d)
            matrix(p + "ffn_up.weight", c.ffn_dim, d)
        matrix(p + "ffn_down.weight", d, c.ffn_dim)
    vector("output_norm.weight", d, 1.0, 0.1)
    if not c.tied:
        matrix("output.weight", VOCAB, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("archs")
    return {name: write_case(out / f"{name}.gguf", c) for name, c in CASES.items()}


def _ids(engine: Engine, text: str = PROMPT) -> list[int]:
    return engine.tokenizer.encode(text)


def _forward(engine: Engine, ids: list[int]) -> np.ndarray:
    n = len(ids)
    return engine.model.forward(np.array(ids, np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
                                np.arange(n, dtype=np.int32))  # fmt: skip


def _context(name: str, long: bool) -> int:
    """The context a slot runs with: LongRoPE's long factors past the original context."""
    c = CASES[name]
    return 2 * c.original_context if long else (c.original_context or 256)


RUNS = [("llama3", False), ("qwen2-tied", False), ("qwen3", False), ("qwen3-q8", False), ("phi3", False),
        ("phi3-longrope", False), ("phi3-longrope", True)]  # fmt: skip
RUN_IDS = [f"{n}-long" if long else n for n, long in RUNS]


def test_architectures_are_the_supported_list():
    """rbees-pool accepts what the engine runs (rbees_pool/modelfile.py reads this tuple)."""
    from rbees_pool.modelfile import supported_architectures

    assert set(ARCHITECTURES) == {"llama", "qwen2", "qwen3", "phi3"}
    assert supported_architectures() == ARCHITECTURES


@pytest.mark.parametrize("name", CASES)
def test_config_reads_the_features(files, name):
    c = CASES[name]
    cfg = ModelConfig.from_gguf(load_gguf(files[name]))
    assert (cfg.architecture, cfg.head_dim, cfg.tied_embeddings, cfg.qkv_bias) == (c.arch, c.head_dim, c.tied,
                                                                                     c.qkv_bias)  # fmt: skip
    assert (cfg.qk_norm, cfg.fused_qkv, cfg.fused_gate_up) == (c.qk_norm, c.fused, c.fused)
    assert cfg.rope_neox == (c.arch != "llama")
    assert cfg.context_length == c.context_length
    want = {"llama3": "rope_freqs.weight", "longrope": "longrope", None: None}[c.rope]
    assert cfg.rope_factors == want
    if c.rope == "longrope":
        assert cfg.rope_factors_tensor(c.original_context) == "rope_factors_short.weight"
        assert cfg.rope_factors_tensor(c.original_context + 1) == "rope_factors_long.weight"
        assert cfg.rope_attn_factor > 1.0


@pytest.mark.parametrize(("name", "long"), RUNS, ids=RUN_IDS)
def test_cpu_logits_match_the_reference(files, name, long):
    """The engine's CPU logits against the float64 reference of the same math."""
    ctx = _context(name, long)
    engine = Engine.load(files[name], backend="cpu", context_length=ctx)
    errs = []
    for prompt in PROMPTS:
        ids = _ids(engine, prompt)
        ours = _forward(engine, ids)
        ref = reference_logits(files[name], ids, context_length=ctx)
        errs.append(float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)))
        assert ref.std() > 0.5  # logits of spread ~1: a real comparison, not of near-constant rows
    print(f"{name}{'-long' if long else ''}: relative error to the reference {[f'{e:.1e}' for e in errs]}")
    assert np.median(errs) < REFERENCE_BOUND[CASES[name].qtype], errs


def test_long_rope_factors_change_the_logits(files):
    """The long and the short factors give different logits (the choice is real), each matching
    its own reference (above)."""
    short, long = (Engine.load(files["phi3-longrope"], context_length=_context("phi3-longrope", x)) for x in (0, 1))
    ids = _ids(short)
    assert np.abs(_forward(short, ids) - _forward(long, ids)).max() > 0.5


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the dev-only reference (make dev)")


@pytest.mark.parametrize(("name", "long"), RUNS, ids=RUN_IDS)
def test_llama_cpp_agrees(files, llama_cpp, name, long):
    """llama.cpp on the same file (its n_ctx picking LongRoPE's factors like our context length):
    the same tokens, logits within LLAMA_CPP_BOUND, greedy continuations token for token (8 steps,
    tests/agreement.py's rule for near ties)."""
    ctx = _context(name, long)
    engine = Engine.load(files[name], backend="cpu", context_length=ctx)
    llm = llama_cpp.Llama(str(files[name]), n_ctx=ctx, n_threads=2, verbose=False, logits_all=True)
    try:
        ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
        assert ids == _ids(engine)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        ours = _forward(engine, ids)
        diff = float(np.abs(ours - theirs).max())
        print(f"{name}{'-long' if long else ''}: max |ours - llama.cpp| {diff:.4f}, logits spread {theirs.std():.2f}")
        assert diff < LLAMA_CPP_BOUND
        gaps = theirs.max(axis=1) - theirs[np.arange(len(ids)), ours.argmax(axis=1)]
        assert (gaps <= TIE_LOGITS).all()
        for prompt in PROMPTS:
            assert_greedy_agrees(engine, llm, prompt, n=8)
    finally:
        llm.close()


def test_llama3_long_context(files, llama_cpp):
    """Nothing caps a Llama 3 context: the engine takes a 9k-token slot of a 128k model, and a prompt
    of 8,300 tokens, continued greedily, agrees with llama.cpp's at those positions (where the
    frequency factors matter most)."""
    path, ctx = files["llama3"], 9216
    engine = Engine.load(path, backend="cpu", context_length=ctx)
    assert engine.context_length == ctx
    rng = np.random.default_rng(3)
    ids = [int(i) for i in rng.integers(3, 300, 8300)]  # (byte and merged tokens: no control tokens)
    llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=512, n_threads=2, verbose=False, logits_all=True)
    try:
        theirs, rows = llama_greedy_scored(llm, ids, 4, frozenset(engine.tokenizer.eos_ids))
    finally:
        llm.close()
    ours = engine.generate_all(ids, GenerationParams(max_tokens=len(theirs), temperature=0.0)).token_ids
    for i, (want, got) in enumerate(zip(theirs, ours, strict=True)):
        assert want == got or rows[i][want] - rows[i][got] <= TIE_LOGITS, f"step {i}: {want} != {got}"


def test_a_prompt_longer_than_a_step(files):
    """A prompt of more tokens than a step takes is prefilled in chunks (before the fix, a chunk
    that asked no logits was refused): its greedy pick is the reference's."""
    path = files["llama3"]
    engine = Engine.load(path, backend="cpu", context_length=1024, max_step_tokens=128)
    ids = [int(i) for i in np.random.default_rng(4).integers(3, 300, 300)]
    ref = reference_logits(path, ids)[-1]
    got = engine.generate_all(ids, GenerationParams(max_tokens=1, temperature=0.0)).token_ids
    assert ref.max() - ref[got[0]] <= 1e-3


def test_refused_features_fail_to_load(files, tmp_path):
    """What the engine does not run fails at load with MODEL_LOAD_FAILED and a reason: partial RoPE
    (Phi-4-mini), YaRN scaling."""
    c = CASES["qwen3"]
    path = write_case(tmp_path / "yarn.gguf", c)
    _patch_metadata(path, tmp_path / "yarn2.gguf", {"qwen3.rope.scaling.type": "yarn"})
    with pytest.raises(ModelLoadError, match="yarn"):
        Engine.load(tmp_path / "yarn2.gguf", context_length=64)
    _patch_metadata(path, tmp_path / "partial.gguf", {"qwen3.rope.dimension_count": 16})
    with pytest.raises(ModelLoadError, match="partial RoPE"):
        Engine.load(tmp_path / "partial.gguf", context_length=64)
    assert ModelLoadError("x").code == "MODEL_LOAD_FAILED"


def _patch_metadata(src: Path, dst: Path, changes: dict[str, object]) -> None:
    """Copy a GGUF with some metadata values set (added when absent)."""
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(src)
    w = GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in changes:
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), f.types[0], sub)
    for k, value in changes.items():
        vtype = GGUFValueType.STRING if isinstance(value, str) else GGUFValueType.UINT32
        w.add_key_value(k, value, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=tuple(int(x) for x in reversed(t.shape.tolist())),
                     raw_dtype=Q(t.tensor_type))  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["llama3", "qwen2-tied", "qwen3-q8", "phi3-longrope"])
def test_cuda_matches_cpu(files, name):
    """On a GPU: the CUDA backend's logits for a prompt and a decoded token against the CPU's."""
    require_gpu()
    ctx = _context(name, False)
    cpu, gpu = (Engine.load(files[name], backend=b, context_length=ctx) for b in ("cpu", "cuda"))
    ids = _ids(cpu)
    for n in (len(ids), 1):  # a prompt (tiled attention, the many-token products), then one token
        a, b = _forward(cpu, ids[:n]), _forward(gpu, ids[:n])
        np.testing.assert_allclose(b, a, atol=2e-2 * np.abs(a).max())

