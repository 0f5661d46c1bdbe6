"""A float64 NumPy forward pass of llama / qwen2 GGUF models: the yardstick for the engine's logits.

It shares no code with the engine: it reads the file with `gguf.GGUFReader`,
dequantizes every tensor with `gguf.quants.dequantize`, and spells the math
out once, plainly, for a whole prompt at positions 0..T-1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ARCHITECTURES = ("llama", "qwen2")


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
        self.head_dim = self.dim // self.n_heads
        self.eps = float(self._meta(f"{self.arch}.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(self._meta(f"{self.arch}.rope.freq_base", 10000.0))
        self.neox = self.arch == "qwen2"  # llama.cpp's converter permutes llama q/k to adjacent pairs

    def _meta(self, key: str, default: object = None) -> object:
        field = self._reader.fields.get(key)
        if field is None:
            if default is None:
                raise KeyError(f"metadata key {key} is missing")
            return default
        return field.contents()

    def has(self, name: str) -> bool:
        return name in self._tensors

    def weight(self, name: str) -> np.ndarray:
        """A tensor in float64, NumPy order (a matrix is [N, K])."""
        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, base: float, neox: bool) -> np.ndarray:
    """Rotate x[T, heads, E]: pairs (i, i + E/2) if `neox`, else (2i, 2i + 1); theta_i = base^(-2i/E)."""
    e = x.shape[-1]
    theta = base ** (-np.arange(0, e, 2, dtype=np.float64) / e)  # [E/2]
    angle = positions[:, None, None].astype(np.float64) * theta  # [T, 1, E/2]
    cos, sin = np.cos(angle), np.sin(angle)
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


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal attention of q[T, H, E] over k/v[T, G, E]; query head h reads kv head h // (H // G)."""
    t, h, e = q.shape
    group = h // k.shape[1]
    k = np.repeat(k, group, axis=1)  # [T, H, E], kv head h // group for query head h
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(e)
    scores[:, np.triu(np.ones((t, t), bool), k=1)] = -np.inf
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", scores, v)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def reference_logits(path: str | Path, tokens: list[int], neox: bool | None = None) -> np.ndarray:
    """Logits float64 [T, V] of `tokens` at positions 0..T-1.

    `neox` overrides the architecture's RoPE pairing; tests use it to show
    that a wrong pairing is caught.
    """
    m = ReferenceModel(path)
    neox = m.neox if neox is None else neox
    t = len(tokens)
    positions = np.arange(t)
    h, g, e = m.n_heads, m.n_kv_heads, m.head_dim
    x = m.weight("token_embd.weight")[np.asarray(tokens)]

    def linear(a: np.ndarray, name: str) -> np.ndarray:
        out = a @ m.weight(name + ".weight").T
        if m.has(name + ".bias"):
            out = out + m.weight(name + ".bias")
        return out

    for i in range(m.n_layers):
        p = f"blk.{i}."
        a = rmsnorm(x, m.weight(p + "attn_norm.weight"), m.eps)
        q = rope(linear(a, p + "attn_q").reshape(t, h, e), positions, m.rope_base, neox)
        k = rope(linear(a, p + "attn_k").reshape(t, g, e), positions, m.rope_base, neox)
        v = linear(a, p + "attn_v").reshape(t, g, e)
        x = x + linear(attention(q, k, v).reshape(t, h * e), p + "attn_output")
        a = rmsnorm(x, m.weight(p + "ffn_norm.weight"), m.eps)
        x = x + linear(silu(linear(a, p + "ffn_gate")) * linear(a, p + "ffn_up"), p + "ffn_down")
    x = rmsnorm(x, m.weight("output_norm.weight"), m.eps)
    return x @ m.weight("output.weight" if m.has("output.weight") else "token_embd.weight").T
