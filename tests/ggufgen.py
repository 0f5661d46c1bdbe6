"""Write tiny random-weight GGUF models for tests, laid out exactly as llama.cpp writes them.

    from ggufgen import write_tiny_model   # tests/ is on sys.path under pytest
    path = write_tiny_model(tmp_path / "m.gguf", arch="qwen2", qtype=GGMLQuantizationType.Q8_0)

The tokenizer in the metadata is a real (tiny) BPE trained here on a fixed corpus:
`tokenizer="gpt2"` (byte-level BPE, pre-tokenizer named by `pre`) or `tokenizer="llama"`
(SentencePiece-style: scores, `<0xNN>` byte-fallback tokens, add_space_prefix).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

from rbees_workerd.engine.tokenizer import CHATML_TEMPLATE, bytes_to_unicode

_CORPUS = """The quick brown fox jumps over the lazy dog. The cat sat on the mat, and the dog sat there too.
Hello world! Hello there, how are you? I am fine, thank you. What is the capital of France? Paris is.
def main():
    for i in range(10):
        print("hello", i)
    return 42
"""
_SPM_SPACE = "\u2581"
_KQUANT_SCALES = {  # K-quant block: byte offsets of its fp16 super-block scales, their range
    GGMLQuantizationType.Q4_K: ((0, 2), (1e-4, 3e-4)),
    GGMLQuantizationType.Q5_K: ((0, 2), (1e-4, 3e-4)),
    GGMLQuantizationType.Q6_K: ((208,), (2e-5, 6e-5)),
}


@dataclass(frozen=True)
class TinyVocab:
    """A tokenizer as GGUF metadata stores it."""

    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int
    eos_id: int
    eot_id: int | None
    add_bos: bool


def _train_merges(words: Counter[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training (most frequent pair first, ties by text) so the vocab is deterministic."""
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def gpt2_vocab(n_merges: int = 80) -> TinyVocab:
    """Byte-level BPE: 3 control tokens, the 256 byte characters, then the merged tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    b2u = bytes_to_unicode()
    pieces = re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", _CORPUS)
    words = Counter(tuple(b2u[b] for b in p.encode()) for p in pieces)
    merges = _train_merges(words, n_merges)
    tokens = specials + [b2u[b] for b in range(256)]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    types = [TokenType.CONTROL] * len(specials) + [TokenType.NORMAL] * (len(tokens) - len(specials))
    return TinyVocab(
        "gpt2",
        tokens,
        [int(t) for t in types],
        None,
        [f"{a} {b}" for a, b in merges],
        bos_id=1,
        eos_id=0,
        eot_id=2,
        add_bos=False,
    )


def llama_vocab(n_merges: int = 80) -> TinyVocab:
    """SentencePiece-style BPE: <unk> <s> </s>, 256 byte tokens, the corpus characters, merged
    pieces scored by merge order (earlier merge = higher score), as SentencePiece BPE models are."""
    text = _SPM_SPACE + _CORPUS.replace(" ", _SPM_SPACE)
    words = Counter(tuple(w) for w in re.findall(f"{_SPM_SPACE}?[^{_SPM_SPACE}]+", text))
    merges = _train_merges(words, n_merges)
    chars = sorted({c for w in words for c in w})
    merged = list(dict.fromkeys(a + b for a, b in merges))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + merged + chars
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (len(merged) + len(chars))
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(merged) + len(chars))]
    return TinyVocab(
        "llama", tokens, [int(t) for t in types], scores, None, bos_id=1, eos_id=2, eot_id=None, add_bos=True
    )


def _padded(v: TinyVocab, vocab: int | None) -> TinyVocab:
    """Pad the vocab with unused control tokens up to `vocab` entries (the embedding's rows)."""
    if vocab is None or vocab == len(v.tokens):
        return v
    if vocab < len(v.tokens):
        raise ValueError(f"vocab={vocab} is smaller than the tiny tokenizer ({len(v.tokens)} tokens)")
    extra = vocab - len(v.tokens)
    return TinyVocab(
        v.model,
        v.tokens + [f"<pad_{i}>" for i in range(extra)],
        v.types + [int(TokenType.CONTROL)] * extra,
        None if v.scores is None else v.scores + [0.0] * extra,
        v.merges,
        v.bos_id,
        v.eos_id,
        v.eot_id,
        v.add_bos,
    )


def _add_tokenizer(w: GGUFWriter, v: TinyVocab, pre: str) -> None:
    w.add_tokenizer_model(v.model)
    if v.model == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(v.merges or [])
    else:
        w.add_add_space_prefix(True)
        w.add_token_scores(v.scores or [])
        w.add_unk_token_id(0)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_bos_token_id(v.bos_id)
    w.add_eos_token_id(v.eos_id)
    if v.eot_id is not None:
        w.add_eot_token_id(v.eot_id)
    w.add_add_bos_token(v.add_bos)
    w.add_chat_template(CHATML_TEMPLATE)


def _encode(rng: np.random.Generator, shape: tuple[int, ...], qtype: GGMLQuantizationType, scale: float) -> np.ndarray:
    """Random weights of `shape` (numpy order) stored as `qtype`: floats, or the quantized bytes."""
    values = (rng.standard_normal(shape) * scale).astype(np.float32)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qtype.name} block ({block})")
    if qtype == GGMLQuantizationType.F32:
        return values
    if qtype == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    if qtype not in _KQUANT_SCALES:
        return quantize(values, qtype)
    # gguf cannot quantize K-quants: random blocks with small, finite fp16 super-block scales
    n_blocks = values.size // block
    data = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    offsets, (lo, hi) = _KQUANT_SCALES[qtype]
    for at in offsets:
        d = rng.uniform(lo, hi, size=n_blocks).astype(np.float16)
        data[:, at : at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return data.reshape(*shape[:-1], shape[-1] // block * type_size)


def write_tiny_model(
    path: str | Path,
    arch: str = "llama",
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    n_layers: int = 2,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn_dim: int = 96,
    vocab: int | None = None,
    context_length: int = 128,
    seed: int = 0,
    tokenizer: str = "gpt2",
    pre: str = "smollm",
    tied_embeddings: bool = True,
) -> Path:
    """Write a random-weight `arch` model ("llama" or "qwen2"); matrices in `qtype`, norms and
    biases F32 (as llama.cpp stores them). `vocab` defaults to the tokenizer's size and pads it."""
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unknown arch {arch!r}")
    v = _padded(gpt2_vocab() if tokenizer == "gpt2" else llama_vocab(), vocab)
    n_vocab = len(v.tokens)
    rng = np.random.default_rng(seed)
    head_dim = dim // n_heads
    kv = n_kv_heads * head_dim
    path = Path(path)
    w = GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    w.add_vocab_size(n_vocab)
    _add_tokenizer(w, v, pre)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = _encode(rng, (rows, cols), qtype, 0.5 / np.sqrt(cols))
        w.add_tensor(name, data, raw_dtype=None if data.dtype != np.uint8 else qtype)

    def vector(name: str, n: int, mean: float, spread: float) -> None:
        w.add_tensor(name, (mean + rng.standard_normal(n) * spread).astype(np.float32))

    matrix("token_embd.weight", n_vocab, dim)
    for i in range(n_layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", dim, 1.0, 0.1)
        matrix(p + "attn_q.weight", n_heads * head_dim, dim)
        matrix(p + "attn_k.weight", kv, dim)
        matrix(p + "attn_v.weight", kv, dim)
        if arch == "qwen2":
            vector(p + "attn_q.bias", n_heads * head_dim, 0.0, 0.1)
            vector(p + "attn_k.bias", kv, 0.0, 0.1)
            vector(p + "attn_v.bias", kv, 0.0, 0.1)
        matrix(p + "attn_output.weight", dim, n_heads * head_dim)
        vector(p + "ffn_norm.weight", dim, 1.0, 0.1)
        matrix(p + "ffn_gate.weight", ffn_dim, dim)
        matrix(p + "ffn_up.weight", ffn_dim, dim)
        matrix(p + "ffn_down.weight", dim, ffn_dim)
    vector("output_norm.weight", dim, 1.0, 0.1)
    if not tied_embeddings:
        matrix("output.weight", n_vocab, dim)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
