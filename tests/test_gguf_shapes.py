"""bench/gguf_shapes.py: llama.cpp's type mixes, and random-weight files that rbees and llama.cpp both run.

The type plans are checked against llama.cpp's own quantizer (`llama_model_quantize` on files
written here, and on the real SmolLM2) and, for the benchmark shapes, against assignments
worked out by hand from `llama_tensor_get_type`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from agreement import TIE_LOGITS
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize

from rbees_workerd.engine.engine import Engine
from rbees_workerd.engine.gguf import load_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gguf_shapes as gs  # noqa: E402

PROMPT = "The capital of France is"


def _types(plan: gs.Plan) -> Counter[str]:
    return Counter(qtype.name for qtype, _ in plan.values())


def _shape(name: str, **changes: object) -> gs.Shape:
    return dataclasses.replace(gs.SHAPES[name], **changes)


def test_shapes_are_the_models_configs():
    """config.json of each model: hidden_size, layers, heads, KV heads, intermediate_size, vocab_size."""
    got = {k: (s.arch, s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.ffn_dim, s.vocab) for k, s in gs.SHAPES.items()}
    assert got == {
        "llama-3.1-8b": ("llama", 4096, 32, 32, 8, 14336, 128256),
        "llama-3.2-1b": ("llama", 2048, 16, 32, 8, 8192, 128256),
        "qwen2.5-7b": ("qwen2", 3584, 28, 28, 4, 18944, 152064),
        "qwen2.5-0.5b": ("qwen2", 896, 24, 14, 2, 4864, 151936),
    }
    assert [k for k, s in gs.SHAPES.items() if s.tied_embeddings] == ["llama-3.2-1b", "qwen2.5-0.5b"]
    assert [k for k, s in gs.SHAPES.items() if s.qkv_bias] == ["qwen2.5-7b", "qwen2.5-0.5b"]


def test_q4_k_m_by_hand():
    """llama_tensor_get_type for Q4_K_M: Q4_K, but Q6_K for output (and a tied token_embd), and for
    attn_v and ffn_down in the layers use_more_bits picks; a row that is not whole 256-blocks
    falls back to Q5_0 (Q4_K), Q8_0 (Q6_K, and output)."""
    plan = gs.plan(gs.SHAPES["llama-3.1-8b"], "q4_k_m")
    more_bits = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # n/8, 7n/8, (i - n/8) % 3 == 2
    assert [i for i in range(32) if plan[f"blk.{i}.attn_v.weight"][0] == Q.Q6_K] == more_bits
    assert [i for i in range(32) if plan[f"blk.{i}.ffn_down.weight"][0] == Q.Q6_K] == more_bits
    assert plan["token_embd.weight"] == (Q.Q4_K, (128256, 4096))
    assert plan["output.weight"] == (Q.Q6_K, (128256, 4096))
    assert plan["blk.0.ffn_down.weight"] == (Q.Q6_K, (4096, 14336))
    assert plan["blk.0.attn_k.weight"] == (Q.Q4_K, (1024, 4096))
    assert _types(plan) == {"Q4_K": 193, "Q6_K": 33, "F32": 65}

    plan = gs.plan(gs.SHAPES["llama-3.2-1b"], "q4_k_m")
    assert "output.weight" not in plan
    assert plan["token_embd.weight"] == (Q.Q6_K, (128256, 2048))  # tied: quantized as the output
    assert _types(plan) == {"Q4_K": 96, "Q6_K": 17, "F32": 33}

    plan = gs.plan(gs.SHAPES["qwen2.5-7b"], "q4_k_m")  # 3584 and 18944 are whole 256-blocks
    assert plan["blk.0.attn_q.bias"] == (Q.F32, (3584,))
    assert _types(plan) == {"Q4_K": 169, "Q6_K": 29, "F32": 141}

    plan = gs.plan(gs.SHAPES["qwen2.5-0.5b"], "q4_k_m")  # rows of 896 = 3.5 blocks of 256
    assert plan["token_embd.weight"] == (Q.Q8_0, (151936, 896))
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert plan[f"blk.3.{kind}.weight"][0] == Q.Q5_0
    assert plan["blk.0.attn_v.weight"] == (Q.Q8_0, (128, 896))  # Q6_K -> Q8_0
    assert plan["blk.3.attn_v.weight"][0] == Q.Q5_0
    assert plan["blk.0.ffn_down.weight"] == (Q.Q6_K, (896, 4864))  # its rows of 4864 are 19 blocks of 256
    assert plan["blk.3.ffn_down.weight"][0] == Q.Q4_K
    assert _types(plan) == {"Q5_0": 132, "Q8_0": 13, "Q4_K": 12, "Q6_K": 12, "F32": 121}


def test_q8_0_and_q6_k_by_hand():
    assert set(_types(gs.plan(gs.SHAPES["llama-3.1-8b"], "q8_0"))) == {"Q8_0", "F32"}
    assert _types(gs.plan(gs.SHAPES["llama-3.1-8b"], "q6_k")) == {"Q6_K": 226, "F32": 65}
    plan = gs.plan(gs.SHAPES["qwen2.5-0.5b"], "q6_k")
    assert plan["token_embd.weight"][0] == Q.Q8_0
    assert plan["blk.0.attn_q.weight"][0] == Q.Q8_0
    assert plan["blk.0.ffn_down.weight"][0] == Q.Q6_K


# small shapes that exercise every rule: real 0.5B rows (fall-backs), 32 layers of whole blocks, untied
# rows of 288 (fall-backs on every matrix and output.weight), 24 tied layers
QUANTIZE_CASES = {
    "qwen2.5-0.5b-x2": _shape("qwen2.5-0.5b", n_layers=2, vocab=4096),
    "narrow-llama-32": gs.Shape("llama", 32, 256, 4, 2, 512, 4096, 1e4, 1e-5, 4096),
    "narrow-qwen2-28": gs.Shape("qwen2", 28, 288, 4, 2, 544, 4096, 1e6, 1e-6, 4096, qkv_bias=True),
    "narrow-tied-24": gs.Shape("qwen2", 24, 160, 5, 1, 320, 4096, 1e6, 1e-6, 4096, qkv_bias=True, tied_embeddings=True),
}


@pytest.fixture(scope="module")
def q8_sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return {name: gs.write(out / f"{name}.gguf", shape, "q8_0").path for name, shape in QUANTIZE_CASES.items()}


@pytest.mark.parametrize("mix", gs.MIXES)
@pytest.mark.parametrize("case", QUANTIZE_CASES)
def test_plan_is_what_llama_cpp_quantizes(q8_sources, tmp_path, case, mix):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the dev-only reference (make dev)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gs.MIXES[mix][0]
    params.allow_requantize = True
    out = tmp_path / "out.gguf"
    assert llama_cpp.llama_model_quantize(str(q8_sources[case]).encode(), str(out).encode(), ctypes.byref(params)) == 0
    got = {t.name: Q(t.tensor_type) for t in GGUFReader(out).tensors}
    assert got == {name: qtype for name, (qtype, _) in gs.plan(QUANTIZE_CASES[case], mix).items()}


@pytest.mark.parametrize("mix", gs.MIXES)
def test_plan_is_what_llama_cpp_made_of_smollm2(requantized, mix):
    """The real model (30 layers of 576, tied embeddings) as llama.cpp requantizes it."""
    smollm2 = gs.Shape("llama", 30, 576, 9, 3, 1536, 49152, 1e5, 1e-5, 8192, tied_embeddings=True)
    got = {name: t.qtype for name, t in load_gguf(requantized(mix)).tensors.items()}
    assert got == {name: qtype for name, (qtype, _) in gs.plan(smollm2, mix).items()}


@pytest.mark.parametrize("qtype", list(gs._SCALE_FIELDS), ids=lambda q: q.name)
def test_random_blocks_have_the_asked_spread(qtype):
    block = {Q.Q4_K: 256, Q.Q5_K: 256, Q.Q6_K: 256}.get(qtype, 32)
    n = block * 4096
    raw = gs._random_chunk((0, 1, 2), qtype, n, 0.01)
    values = dequantize(raw, qtype)
    assert values.size == n and np.isfinite(values).all()
    assert values.std() == pytest.approx(0.01, rel=0.1)
    assert abs(values.mean()) < 0.001


# Qwen2.5-0.5B's vocabulary padded (50000 > SmolLM2's 49152 tokens), Llama-3.2-1B's cut to 4096 tokens
FILES = {
    "qwen": _shape("qwen2.5-0.5b", n_layers=2, vocab=50000),
    "llama": _shape("llama-3.2-1b", n_layers=2, vocab=4096),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_path):
    """Two small q4_k_m files of real shapes, the first written through the command line."""
    out = tmp_path_factory.mktemp("written")
    qwen = out / "qwen.gguf"
    gs.main(["--shape", "qwen2.5-0.5b", "--mix", "q4_k_m", "--out", str(qwen), "--layers", "2", "--vocab", "50000",
             "--vocab-from", str(model_path)])  # fmt: skip
    return {"qwen": qwen, "llama": gs.write(out / "llama.gguf", FILES["llama"], "q4_k_m", model_path).path}


def test_the_command_line_prints_size_time_and_types(files, capsys):
    out = files["qwen"].with_name("q8.gguf")
    gs.main(["--shape", "qwen2.5-0.5b", "--mix", "q8_0", "--out", str(out), "--layers", "1", "--vocab", "4096"])
    line = capsys.readouterr().out
    assert "GiB" in line and " s; " in line and "Q8_0" in line


def test_a_vocabulary_only_file_gives_the_same_tokenizer(files, model_path, tmp_path):
    """--vocab-only writes the tokenizer alone (no tensors, a few MB), and a model written from it
    has the same tokenizer keys as one written from the whole source file."""
    vocab = tmp_path / "vocab.gguf"
    gs.main(["--vocab-only", "--out", str(vocab), "--vocab-from", str(model_path)])
    assert load_gguf(vocab).tensors == {} and vocab.stat().st_size < 4 << 20
    assert gs.tokenizer_fields(vocab, 50000) == gs.tokenizer_fields(model_path, 50000)
    with pytest.raises(SystemExit):
        gs.main(["--out", str(tmp_path / "x.gguf")])  # neither --vocab-only nor a shape and a mix


@pytest.mark.parametrize("which", FILES)
def test_file_has_the_plan_and_the_vocabulary(files, model_path, which):
    path, shape = files[which], FILES[which]
    f = load_gguf(path)
    assert {name: (t.qtype, t.shape) for name, t in f.tensors.items()} == gs.plan(shape, "q4_k_m")
    assert f.metadata[f"{shape.arch}.block_count"] == 2
    tokens, types = f.metadata["tokenizer.ggml.tokens"], f.metadata["tokenizer.ggml.token_type"]
    source = load_gguf(model_path).metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == len(types) == shape.vocab
    n = min(len(source), shape.vocab)
    assert tokens[:n] == source[:n]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, shape.vocab)]
    assert set(types[n:]) <= {TokenType.UNUSED}


@pytest.mark.parametrize("which", FILES)
def test_rbees_and_llama_cpp_run_it_alike(files, which):
    """Both load it, tokenize alike, give finite logits of spread ~1, and pick the same next
    token at every position of a prompt but near ties (in llama.cpp's logits)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the dev-only reference (make dev)")
    path, shape = files[which], FILES[which]
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    try:
        assert llm.n_vocab() == shape.vocab
        ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    engine = Engine.load(path, backend="cpu", context_length=64)
    assert engine.tokenizer.vocab_size == shape.vocab
    assert engine.tokenizer.encode(PROMPT) == ids
    n = len(ids)
    ours = engine.model.forward(np.array(ids, np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
                                np.arange(n, dtype=np.int32))  # fmt: skip
    for logits in (theirs, ours):
        assert np.isfinite(logits).all()
        assert logits.std(axis=1).min() > 0.5 and logits.std(axis=1).max() < 2.0
    gaps = theirs.max(axis=1) - theirs[np.arange(n), ours.argmax(axis=1)]
    assert (gaps <= TIE_LOGITS).all(), f"llama.cpp prefers its picks to ours by {gaps.round(3).tolist()} logits"
