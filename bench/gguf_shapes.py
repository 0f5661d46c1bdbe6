"""Random-weight GGUF models at real model shapes, in llama.cpp's per-tensor quant mixes.

Inference speed does not depend on weight values, so the benchmarks run files with a real
model's tensor shapes and the exact types `llama-quantize` would give each tensor, written
from random bytes in seconds instead of downloaded:

    python bench/gguf_shapes.py --shape llama-3.1-8b --mix q4_k_m --out /tmp/llama8b-q4km.gguf
    python bench/gguf_shapes.py --shape qwen2.5-0.5b --mix q8_0 --out m.gguf --layers 2 --vocab 4096
    python bench/gguf_shapes.py --vocab-only --out vocab.gguf   # the tokenizer alone, for --vocab-from elsewhere

`plan()` is the type rule of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp, as
vendored by llama-cpp-python 0.3.36) for dense llama/qwen2 models other than 70B ones, applied
to the file as written: with `--layers N` the layers that get more bits are those of N layers.
Every block's fp16 scales are set so that each matrix has element spread ~1/sqrt(row length):
a forward pass keeps its activations of order one through every layer and ends in logits of
spread ~1. The tokenizer is copied from another GGUF (`--vocab-from`) and padded with unused
`[PAD<i>]` tokens to the shape's vocabulary, as llama.cpp's converter pads Qwen's. The metadata
is what llama.cpp writes for these models, less Llama 3's RoPE scaling (no rope_freqs.weight).
The same seed gives the same bytes for any thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, TokenType

Q = GGMLQuantizationType
DEFAULT_VOCAB_FROM = Path(__file__).resolve().parent.parent / "models-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Shape:
    """A model's hyperparameters, as its config.json gives them."""

    arch: str  # GGUF architecture: "llama" or "qwen2"
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: int
    rope_theta: float
    norm_eps: float
    context_length: int
    qkv_bias: bool = False
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


SHAPES: dict[str, Shape] = {
    "llama-3.1-8b": Shape("llama", 32, 4096, 32, 8, 14336, 128256, 500000.0, 1e-5, 131072),
    "llama-3.2-1b": Shape("llama", 16, 2048, 32, 8, 8192, 128256, 500000.0, 1e-5, 131072, tied_embeddings=True),
    "qwen2.5-7b": Shape("qwen2", 28, 3584, 28, 4, 18944, 152064, 1e6, 1e-6, 32768, qkv_bias=True),
    "qwen2.5-0.5b": Shape("qwen2", 24, 896, 14, 2, 4864, 151936, 1e6, 1e-6, 32768, qkv_bias=True, tied_embeddings=True),
}
# mix name -> (llama_ftype as general.file_type records it, the ftype's default tensor type)
MIXES: dict[str, tuple[int, GGMLQuantizationType]] = {
    "q8_0": (7, Q.Q8_0),
    "q4_k_m": (15, Q.Q4_K),
    "q5_k_m": (17, Q.Q5_K),
    "q6_k": (18, Q.Q6_K),
}
# llama.cpp's tensor_type_fallback for a row length that is not a whole number of blocks
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

Plan = dict[str, tuple[GGMLQuantizationType, tuple[int, ...]]]
Fields = dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]  # key: (value, type, array item type)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits in *_K_M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fallback(qtype: GGMLQuantizationType, ne0: int) -> GGMLQuantizationType:
    if ne0 % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if ne0 % GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def tensor_type(name: str, ne0: int, shape: Shape, mix: str) -> GGMLQuantizationType:
    """The type llama-quantize gives the 2-D tensor `name` (rows of `ne0`) of a `mix` file of `shape`."""
    default = MIXES[mix][1]
    kind = name.removesuffix(".weight").rsplit(".", 1)[-1]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    qtype = default
    if name == "output.weight" or (name == "token_embd.weight" and shape.tied_embeddings):
        if ne0 % GGML_QUANT_SIZES[default][0]:
            qtype = Q.Q8_0
        elif default != Q.Q8_0:
            qtype = Q.Q6_K
    elif kind in ("attn_v", "ffn_down") and mix in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, shape.n_layers):
        qtype = Q.Q6_K
    return _fallback(qtype, ne0)


def tensor_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor of the file, NumPy order (rows, row length), in the order it is written."""
    d, kv = shape.dim, shape.n_kv_heads * shape.head_dim
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (shape.vocab, d)}
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = (d,)
        out[p + "attn_q.weight"] = (d, d)
        out[p + "attn_k.weight"] = (kv, d)
        out[p + "attn_v.weight"] = (kv, d)
        if shape.qkv_bias:
            out |= {p + "attn_q.bias": (d,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)}
        out[p + "attn_output.weight"] = (d, d)
        out[p + "ffn_norm.weight"] = (d,)
        out[p + "ffn_gate.weight"] = (shape.ffn_dim, d)
        out[p + "ffn_up.weight"] = (shape.ffn_dim, d)
        out[p + "ffn_down.weight"] = (d, shape.ffn_dim)
    out["output_norm.weight"] = (d,)
    if not shape.tied_embeddings:
        out["output.weight"] = (shape.vocab, d)
    return out


def plan(shape: Shape, mix: str) -> Plan:
    """{tensor name: (type, NumPy shape)} of a `mix` file of `shape`; 1-D tensors are F32 as converted."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r} (known: {', '.join(MIXES)})")
    return {
        name: (Q.F32 if len(dims) == 1 else tensor_type(name, dims[-1], shape, mix), dims)
        for name, dims in tensor_shapes(shape).items()
    }


def tensor_bytes(qtype: GGMLQuantizationType, dims: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(dims) // block * size


# ---- random blocks

# Per type: (byte offset, factor) of each fp16 scale field, its value being d * factor, and the
# spread of the dequantized values for d = 1 with every other byte uniformly random. The offsets
# (m of Q4_1 and Q5_1, dmin of Q4_K and Q5_K) cancel the quants' mean, so values average ~0.
_SCALE_FIELDS: dict[GGMLQuantizationType, tuple[tuple[tuple[int, float], ...], float]] = {
    Q.Q8_0: (((0, 1.0),), math.sqrt((256**2 - 1) / 12)),  # int8 quants
    Q.Q4_0: (((0, 1.0),), math.sqrt((16**2 - 1) / 12)),  # q - 8
    Q.Q5_0: (((0, 1.0),), math.sqrt((32**2 - 1) / 12)),  # q - 16
    Q.Q4_1: (((0, 1.0), (2, -7.5)), math.sqrt((16**2 - 1) / 12)),  # d*q + m
    Q.Q5_1: (((0, 1.0), (2, -15.5)), math.sqrt((32**2 - 1) / 12)),
    # d*sc*q - dmin*m with 6-bit sc, m: E[(sc*q - 7.5*m)^2] = 1333.5*77.5 - 15*31.5*7.5*31.5 + 56.25*1333.5
    Q.Q4_K: (((0, 1.0), (2, 7.5)), math.sqrt(66727.5)),
    Q.Q5_K: (((0, 1.0), (2, 15.5)), math.sqrt(1333.5 * 325.5 - 31 * 31.5 * 15.5 * 31.5 + 240.25 * 1333.5)),
    Q.Q6_K: (((208, 1.0),), math.sqrt(5461.5 * 341.5)),  # d * int8 sub-scale * (q - 32)
}
_CHUNK_BYTES = 16 << 20  # one task's share: large enough for fast generation, small enough to spread


def _random_chunk(seed: tuple[int, ...], qtype: GGMLQuantizationType, n: int, spread: float) -> np.ndarray:
    """`n` elements of `qtype` (n whole blocks) whose dequantized values have standard deviation ~`spread`."""
    rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence(seed)))
    if qtype in (Q.F32, Q.F16):
        return (rng.standard_normal(n, dtype=np.float32) * spread).astype(np.float32 if qtype == Q.F32 else np.float16)
    block, size = GGML_QUANT_SIZES[qtype]
    fields, unit = _SCALE_FIELDS[qtype]
    n_blocks = n // block
    raw = rng.bit_generator.random_raw(-(-n_blocks * size // 8)).view(np.uint8)
    blocks = raw[: n_blocks * size].reshape(n_blocks, size)
    # |d| in [0.75, 1.25) * spread / unit, of random sign: uniform quants average -d/2 (Q5_0: q - 16 in
    # [-16, 15]), a bias shared by every row that would build a common direction up through the layers
    u = rng.random(n_blocks, dtype=np.float32)
    d = (spread / unit) * np.where(u < 0.5, -0.75 - u, 0.25 + u)
    for offset, factor in fields:
        blocks[:, offset : offset + 2] = (d * factor).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def _spread(name: str, row_length: int) -> tuple[float, float]:
    """(mean, standard deviation) of a tensor's values. Matrices 1/sqrt(row length), so that each
    product of a normalized input has outputs of spread ~1 (logits too); attn_q and attn_k twice
    that, for attention scores of spread ~4: with spread 1 attention averages nearly uniformly and
    every position drifts to the same state. Norm weights ~1, biases small."""
    if name.endswith("_norm.weight"):
        return 1.0, 0.05
    if name.endswith(".bias"):
        return 0.0, 0.05
    gain = 2.0 if name.endswith(("attn_q.weight", "attn_k.weight")) else 1.0
    return 0.0, gain / math.sqrt(row_length)


def _tensor_data(
    pool: ThreadPoolExecutor, seed: int, index: int, name: str, qtype: GGMLQuantizationType, dims: tuple[int, ...]
) -> np.ndarray:
    """The tensor's bytes, generated in chunks of whole rows on `pool` (the same bytes for any thread count)."""
    mean, spread = _spread(name, dims[-1])
    row_bytes = tensor_bytes(qtype, dims[-1:])
    rows = math.prod(dims[:-1])
    step = max(1, _CHUNK_BYTES // row_bytes)
    out = np.empty(rows * row_bytes, np.uint8)

    def fill(chunk: int) -> None:
        r0, r1 = chunk * step, min(rows, (chunk + 1) * step)
        data = _random_chunk((seed, index, chunk), qtype, (r1 - r0) * dims[-1], spread)
        if mean:
            data += np.asarray(mean, data.dtype)
        out[r0 * row_bytes : r1 * row_bytes] = data.view(np.uint8)

    list(pool.map(fill, range(-(-rows // step))))
    return out


# ---- tokenizer


@functools.lru_cache(maxsize=2)
def _source_fields(path: Path) -> Fields:
    """The tokenizer.* keys of a GGUF file (read once: a 150k-token vocabulary takes seconds)."""
    return {
        k: (f.contents(), f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
        for k, f in GGUFReader(path).fields.items()
        if k.startswith("tokenizer.")
    }


def tokenizer_fields(vocab_from: str | Path, n_vocab: int) -> Fields:
    """Every tokenizer.* key of `vocab_from`, its vocabulary padded with unused `[PAD<i>]` tokens
    to `n_vocab` (or cut there, with the merges that make a cut token)."""
    fields = dict(_source_fields(Path(vocab_from).resolve()))
    tokens: list[str] = fields["tokenizer.ggml.tokens"][0]
    n_src = len(tokens)
    if n_vocab < n_src and "tokenizer.ggml.merges" in fields:
        kept = set(tokens[:n_vocab])
        merges, vtype, sub_type = fields["tokenizer.ggml.merges"]
        merges = [m for m in merges if {*m.split(" ", 1), m.replace(" ", "", 1)} <= kept]
        fields["tokenizer.ggml.merges"] = (merges, vtype, sub_type)
    pad = range(n_src, n_vocab)
    fillers = {
        "tokenizer.ggml.tokens": [f"[PAD{i}]" for i in pad],
        "tokenizer.ggml.token_type": [int(TokenType.UNUSED)] * len(pad),
        "tokenizer.ggml.scores": [0.0] * len(pad),
    }
    for key, extra in fillers.items():
        if key in fields:
            value, vtype, sub_type = fields[key]
            fields[key] = (list(value)[:n_vocab] + extra, vtype, sub_type)
    for key, (value, _, _) in fields.items():
        if key.endswith("_token_id") and int(value) >= n_vocab:
            raise ValueError(f"{key} = {value} of {vocab_from} is outside a vocabulary of {n_vocab} tokens")
    return fields


# ---- the file


@dataclass(frozen=True)
class Written:
    """A file `write` made, its size and the seconds it took."""

    path: Path
    n_bytes: int
    seconds: float


def write(
    path: str | Path,
    shape: Shape,
    mix: str,
    vocab_from: str | Path = DEFAULT_VOCAB_FROM,
    seed: int = 0,
    threads: int | None = None,
) -> Written:
    """Write a random-weight `mix` GGUF of `shape` to `path`, streaming one tensor at a time."""
    t0 = time.perf_counter()
    tensors = plan(shape, mix)
    path = Path(path)
    w = GGUFWriter(path, shape.arch)
    w.add_name(f"random {shape.arch} {shape.n_layers}x{shape.dim} {mix}")
    w.add_file_type(MIXES[mix][0])
    w.add_quantization_version(2)
    w.add_block_count(shape.n_layers)
    w.add_context_length(shape.context_length)
    w.add_embedding_length(shape.dim)
    w.add_feed_forward_length(shape.ffn_dim)
    w.add_head_count(shape.n_heads)
    w.add_head_count_kv(shape.n_kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.norm_eps)
    w.add_vocab_size(shape.vocab)
    for key, (value, vtype, sub_type) in tokenizer_fields(vocab_from, shape.vocab).items():
        w.add_key_value(key, value, vtype, sub_type)
    for name, (qtype, dims) in tensors.items():
        w.add_tensor_info(name, dims, np.dtype(np.float32), tensor_bytes(qtype, dims), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool, ThreadPoolExecutor(1) as ahead:
        # the next tensor is generated while this one is written: at most two are in memory
        pending: deque[Future[np.ndarray]] = deque()
        for i, (name, (qtype, dims)) in enumerate(tensors.items()):
            pending.append(ahead.submit(_tensor_data, pool, seed, i, name, qtype, dims))
            if len(pending) == 2:
                w.write_tensor_data(pending.popleft().result())
        while pending:
            w.write_tensor_data(pending.popleft().result())
    w.close()
    return Written(path, path.stat().st_size, time.perf_counter() - t0)


def write_vocab_only(path: str | Path, vocab_from: str | Path = DEFAULT_VOCAB_FROM) -> int:
    """A GGUF of `vocab_from`'s tokenizer keys alone (no tensors; ~1.7 MB for SmolLM2's): the `--vocab-from`
    of a machine that should not receive the whole model. Returns its size."""
    fields = _source_fields(Path(vocab_from).resolve())
    w = GGUFWriter(Path(path), str(GGUFReader(vocab_from).fields["general.architecture"].contents()))
    for key, (value, vtype, sub_type) in fields.items():
        w.add_key_value(key, value, vtype, sub_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return Path(path).stat().st_size


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-only", action="store_true", help="write only --vocab-from's tokenizer to --out")
    ap.add_argument("--shape", choices=SHAPES)
    ap.add_argument("--mix", choices=MIXES)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--vocab-from", type=Path, default=DEFAULT_VOCAB_FROM, help="GGUF whose tokenizer is copied")
    ap.add_argument("--layers", type=int, help="write only the first N layers (block_count = N)")
    ap.add_argument("--vocab", type=int, help="vocabulary size (embedding rows) instead of the shape's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="generator threads (default: every CPU)")
    args = ap.parse_args(argv)
    if args.vocab_only:
        print(f"{args.out}: {write_vocab_only(args.out, args.vocab_from)} bytes, the tokenizer of {args.vocab_from}")
        return
    if not (args.shape and args.mix):
        ap.error("--shape and --mix are required (or --vocab-only)")
    shape = SHAPES[args.shape]
    shape = dataclasses.replace(shape, n_layers=args.layers or shape.n_layers, vocab=args.vocab or shape.vocab)
    done = write(args.out, shape, args.mix, args.vocab_from, args.seed, args.threads)
    counts = Counter(qtype.name for qtype, _ in plan(shape, args.mix).values())
    mix = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    print(f"{done.path}: {done.n_bytes / 2**30:.3f} GiB ({done.n_bytes} bytes) in {done.seconds:.1f} s; {mix}")


if __name__ == "__main__":
    main()
