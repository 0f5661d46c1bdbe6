"""A float64 NumPy forward pass of llama / qwen2 / qwen3 / phi3 GGUF models: the yardstick for the engine's logits.

It shares no code with the engine: it reads the file with `gguf.GGUFReader`,
dequantizes every tensor with `gguf.quants.dequantize`, and spells the math
out once, plainly, for a whole prompt at positions 0..T-1. The architectures' features are
read from the file as llama.cpp reads them: RoPE frequency factors (rope_freqs, or phi3's
LongRoPE long/short pair chosen by the context length), linear RoPE scaling and the
attention factor, qwen3's per-head q/k RMSNorm, phi3's fused attn_qkv and gate/up ffn_up.

With `llama_rounding` (the default) it also rounds where llama.cpp's CPU path
rounds, as the engine does: each matrix product's input to int8 blocks of 32
(Q8_0 for Q4_0/Q5_0/Q8_0 weights; Q8_1, whose fp16 block sums feed the mins, for
Q4_1/Q5_1), to Q8_K's int8 blocks of 256 (K-quant weights) or to fp16 (F16
weights), and q, the KV cache and the attention weights to fp16. Everything else
stays float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3")
_Q8_0_INPUT = (Q.Q4_0, Q.Q5_0, Q.Q8_0)
_Q8_1_INPUT = (Q.Q4_1, Q.Q5_1)  # their blocks start with fp16 d, fp16 m
_Q8_K_INPUT = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


class ReferenceModel:
    """Hyperparameters from the metadata; weights dequantized to float64 when first used."""

    def __init__(self, path: str | Path) -> None:
        self._reader = GGUFReader(path, "r")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.arch = self._meta("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"reference model: unsupported architecture {self.arch!r}")
        self.n_layers = int(self._meta(f"{self.arch}.block_count"))
        self.n_heads = int(self._meta(f"{self.arch}.attention.head_count"))
        self.n_kv_heads = int(self._meta(f"{self.arch}.attention.head_count_kv", self.n_heads))
        self.dim = int(self._meta(f"{self.arch}.embedding_length"))
        self.head_dim = int(self._meta(f"{self.arch}.attention.key_length", self.dim // self.n_heads))
        self.ffn_dim = int(self._meta(f"{self.arch}.feed_forward_length"))
        self.eps = float(self._meta(f"{self.arch}.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(self._meta(f"{self.arch}.rope.freq_base", 10000.0))
        self.neox = self.arch != "llama"  # llama.cpp's converter permutes llama q/k to adjacent pairs
        self.context_length = int(self._meta(f"{self.arch}.context_length"))
        self.original_context = int(self._meta(f"{self.arch}.rope.scaling.original_context_length",
                                               self.context_length))  # fmt: skip
        scaling = str(self._meta(f"{self.arch}.rope.scaling.type", "linear"))
        factor = float(self._meta(f"{self.arch}.rope.scaling.factor", 0.0))
        self.freq_scale = 1.0 / factor if scaling == "linear" and factor else 1.0
        self.attn_factor = float(self._meta(f"{self.arch}.rope.scaling.attn_factor", 1.0))

    def rope_factors(self, context_length: int) -> np.ndarray | None:
        """llama.cpp's get_rope_factors: rope_freqs, else LongRoPE's long factors when the context
        exceeds the original one, else its short ones; None without any."""
        if self.has("rope_freqs.weight"):
            return self.weight("rope_freqs.weight")
        if self.has("rope_factors_long.weight"):
            long = context_length > self.original_context
            return self.weight("rope_factors_long.weight" if long else "rope_factors_short.weight")
        return None

    def _meta(self, key: str, default: object = None) -> object:
        field = self._reader.fields.get(key)
        if field is None:
            if default is None:
                raise KeyError(f"metadata key {key} is missing")
            return default
        return field.contents()

    def has(self, name: str) -> bool:
        return name in self._tensors

    def qtype(self, name: str) -> Q:
        return Q(self._tensors[name].tensor_type)

    def mins(self, name: str) -> np.ndarray:
        """The fp16 block minimums m[N, K/32] of a Q4_1/Q5_1 matrix, in float64."""
        t = self._tensors[name]
        n = int(t.shape[-1])
        raw = np.ascontiguousarray(np.asarray(t.data, np.uint8).reshape(n, -1, GGML_QUANT_SIZES[self.qtype(name)][1]))
        return raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)

    def weight(self, name: str) -> np.ndarray:
        """A tensor in float64, NumPy order (a matrix is [N, K])."""
        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)


def fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


def round_q8(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a[T, K] through int8 blocks of 32 as llama.cpp's quantize_row_q8_0/q8_1 do (float32 steps).

    Returns the rounded values q * fp16(d) and Q8_1's block sums fp16(d * sum(q)) [T, K/32].
    """
    b = np.asarray(a, np.float32).reshape(a.shape[0], -1, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    inv = (np.float32(127) / np.where(amax == 0, np.float32(1), amax)) * (amax != 0)
    q = np.rint(b * inv.astype(np.float32))
    rounded = (q * fp16(d)).reshape(a.shape)
    return rounded, fp16(d[..., 0] * q.sum(axis=-1))


def round_q8k(a: np.ndarray) -> np.ndarray:
    """a[T, K] through llama.cpp's Q8_K blocks of 256 (quantize_row_q8_K_ref, float32 steps): the first
    element of largest magnitude `big` sets iscale = -127 / big; q = min(127, rint(iscale * a)); q / iscale."""
    b = np.asarray(a, np.float32).reshape(a.shape[0], -1, 256)
    big = np.take_along_axis(b, np.abs(b).argmax(axis=-1)[..., None], axis=-1)
    iscale = np.float32(-127) / np.where(big == 0, np.float32(1), big)
    q = np.minimum(np.float32(127), np.rint(b * iscale))  # an all-zero block stays zero
    return (q * (np.float32(1) / iscale)).astype(np.float64).reshape(a.shape)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    base: float,
    neox: bool,
    factors: np.ndarray | None = None,
    freq_scale: float = 1.0,
    attn_factor: float = 1.0,
) -> np.ndarray:
    """Rotate x[T, heads, E]: pairs (i, i + E/2) if `neox`, else (2i, 2i + 1), by the angles
    position * freq_scale * theta_i / factors[i], theta_i = base^(-2i/E), and scale by attn_factor
    (ggml's rope_ext without YaRN: cos and sin times its mscale)."""
    e = x.shape[-1]
    theta = freq_scale * base ** (-np.arange(0, e, 2, dtype=np.float64) / e)  # [E/2]
    if factors is not None:
        theta = theta / factors
    angle = positions[:, None, None].astype(np.float64) * theta  # [T, 1, E/2]
    cos, sin = attn_factor * np.cos(angle), attn_factor * np.sin(angle)
    if neox:
        a, b = x[..., : e // 2], x[..., e // 2 :]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if neox:
        out[..., : e // 2], out[..., e // 2 :] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, rounding: bool, prescale: bool = False) -> np.ndarray:
    """Causal attention of q[T, H, E] over k/v[T, G, E]; query head h reads kv head h // (H // G).
    With `prescale` (phi3's graph), q is scaled by 1/sqrt(E) in float32 before its rounding."""
    t, h, e = q.shape
    if prescale:
        q = np.asarray(q, np.float32) * (np.float32(1) / np.sqrt(np.float32(e)))
    if rounding:
        q, k, v = fp16(q), fp16(k), fp16(v)
    group = h // k.shape[1]
    k = np.repeat(k, group, axis=1)  # [T, H, E], kv head h // group for query head h
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / (1.0 if prescale else np.sqrt(e))
    scores[:, np.triu(np.ones((t, t), bool), k=1)] = -np.inf
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    if rounding:
        scores = fp16(scores)
    return np.einsum("hts,shd->thd", scores, v)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def reference_logits(
    path: str | Path,
    tokens: list[int],
    neox: bool | None = None,
    llama_rounding: bool = True,
    context_length: int | None = None,
) -> np.ndarray:
    """Logits float64 [T, V] of `tokens` at positions 0..T-1.

    `neox` overrides the architecture's RoPE pairing; tests use it to show
    that a wrong pairing is caught. `llama_rounding`: see the module docstring.
    `context_length` (default: the model's) picks LongRoPE's factors as llama.cpp's n_ctx does.
    """
    m = ReferenceModel(path)
    neox = m.neox if neox is None else neox
    factors = m.rope_factors(context_length or m.context_length)
    t = len(tokens)
    positions = np.arange(t)
    h, g, e = m.n_heads, m.n_kv_heads, m.head_dim
    x = m.weight("token_embd.weight")[np.asarray(tokens)]

    def head_norm(x: np.ndarray, name: str) -> np.ndarray:
        return rmsnorm(x, m.weight(name), m.eps) if m.has(name) else x

    def rotate(x: np.ndarray) -> np.ndarray:
        return rope(x, positions, m.rope_base, neox, factors, m.freq_scale, m.attn_factor)

    def linear(a: np.ndarray, name: str) -> np.ndarray:
        qtype = m.qtype(name + ".weight")
        if llama_rounding and qtype in _Q8_0_INPUT + _Q8_1_INPUT:
            rounded, sums = round_q8(a)
            out = rounded @ m.weight(name + ".weight").T
            if qtype in _Q8_1_INPUT:  # llama.cpp applies the mins to the fp16 block sums, not to sum(rounded)
                exact = rounded.reshape(len(a), -1, 32).sum(axis=-1)
                out += (sums - exact) @ m.mins(name + ".weight").T
        elif llama_rounding and qtype in _Q8_K_INPUT:
            out = round_q8k(a) @ m.weight(name + ".weight").T
        else:
            out = (fp16(a) if llama_rounding and qtype == Q.F16 else a) @ m.weight(name + ".weight").T
        if m.has(name + ".bias"):
            out = out + m.weight(name + ".bias")
        return out

    for i in range(m.n_layers):
        p = f"blk.{i}."
        a = rmsnorm(x, m.weight(p + "attn_norm.weight"), m.eps)
        if m.has(p + "attn_qkv.weight"):  # phi3: q, k and v rows in one matrix
            q, k, v = np.split(linear(a, p + "attn_qkv"), [h * e, (h + g) * e], axis=1)
        else:
            q, k, v = (linear(a, p + f"attn_{n}") for n in "qkv")
        q = rotate(head_norm(q.reshape(t, h, e), p + "attn_q_norm.weight"))
        k = rotate(head_norm(k.reshape(t, g, e), p + "attn_k_norm.weight"))
        v = v.reshape(t, g, e)
        x = x + linear(attention(q, k, v, llama_rounding, m.arch == "phi3").reshape(t, h * e), p + "attn_output")
        a = rmsnorm(x, m.weight(p + "ffn_norm.weight"), m.eps)
        if m.has(p + "ffn_gate.weight"):
            gate, up = linear(a, p + "ffn_gate"), linear(a, p + "ffn_up")
        else:  # phi3: gate and up in one matrix, gate first (llama.cpp's swiglu of the halves)
            gate, up = np.split(linear(a, p + "ffn_up"), 2, axis=1)
        x = x + linear(silu(gate) * up, p + "ffn_down")
    x = rmsnorm(x, m.weight("output_norm.weight"), m.eps)
    return linear(x, "output" if m.has("output.weight") else "token_embd")
