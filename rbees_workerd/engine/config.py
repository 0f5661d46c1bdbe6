"""Model hyperparameters, read from GGUF metadata.

Each architecture is a set of explicit features of one transformer (see docs/internals.md,
"Architectures"): the RoPE pairing, biases on q/k/v, per-head q/k norms, fused q/k/v and
gate/up matrices (split by rows at load), RoPE frequency factors, tied embeddings. The model
reads these flags; nothing downstream looks at the architecture's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rbees_workerd.engine.gguf import GGUFFile
from rbees_workerd.errors import ModelLoadError

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3")
# llama.cpp's rope type per architecture: NEOX rotates (i, i + E/2), NORM adjacent pairs (2i, 2i + 1)
_NEOX = {"llama": False, "qwen2": True, "qwen3": True, "phi3": True}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.x: per-pair frequency divisors ("llama3" RoPE scaling)
ROPE_LONG, ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"  # phi3 LongRoPE


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # attention.key_length where given (qwen3: n_heads * head_dim may differ from dim)
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_neox: bool  # qwen2/qwen3/phi3 rotate halves; llama GGUF files rotate adjacent pairs
    norm_eps: float
    qkv_bias: bool
    tied_embeddings: bool
    qk_norm: bool = False  # qwen3: RMSNorm of each q and k head (attn_q_norm/attn_k_norm [E]) before RoPE
    fused_qkv: bool = False  # phi3: one attn_qkv [H*E + 2*G*E, D], split by rows at load into q, k, v
    fused_gate_up: bool = False  # phi3: one ffn_up [2F, D], first half gate, second half up
    rope_freq_scale: float = 1.0  # linear RoPE scaling: angles * freq_scale (1 / rope.scaling.factor)
    rope_attn_factor: float = 1.0  # rope.scaling.attn_factor: cos and sin scaled by it (LongRoPE's mscale)
    rope_factors: str | None = None  # rope_freqs.weight, or "longrope" when phi3's long/short pair is present
    rope_original_context: int = 0  # rope.scaling.original_context_length: LongRoPE's long/short threshold
    q_prescaled: bool = False  # phi3: q times 1/sqrt(E) after RoPE (float32, before fp16), attention scale 1

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        arch = f.architecture
        if arch not in ARCHITECTURES:
            raise ModelLoadError(f"unknown architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
        md = f.metadata

        def get(key: str, default: object = None) -> object:
            value = md.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"metadata key {arch}.{key} is missing")
            return value

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        if n_heads <= 0 or dim % n_heads:
            raise ModelLoadError(f"embedding_length {dim} is not a multiple of head_count {n_heads}")
        n_kv_heads = int(get("attention.head_count_kv", n_heads))
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ModelLoadError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
        head_dim = int(get("attention.key_length", dim // n_heads))
        if int(get("attention.value_length", head_dim)) != head_dim:
            raise ModelLoadError("attention.value_length differs from attention.key_length")
        if head_dim <= 0 or head_dim % 2:
            raise ModelLoadError(f"head size {head_dim} is not a positive even number")
        n_rot = int(get("rope.dimension_count", head_dim))
        if n_rot != head_dim:
            raise ModelLoadError(f"partial RoPE (rope.dimension_count {n_rot} of head size {head_dim}) "
                                 "is not supported")  # fmt: skip
        embd = f.tensors.get("token_embd.weight")
        if embd is None:
            raise ModelLoadError("tensor token_embd.weight is missing")
        vocab = int(md.get(f"{arch}.vocab_size", embd.shape[0]))
        context = int(get("context_length"))

        # llama.cpp's reading: the type defaults to linear, whose factor (absent: 1) divides the angles
        scaling = str(get("rope.scaling.type", "linear")).lower()
        factor = float(get("rope.scaling.factor", get("rope.scale_linear", 0.0)))
        if scaling not in ("none", "linear"):
            raise ModelLoadError(f"RoPE scaling {scaling!r} is not supported (linear, and llama3's and LongRoPE's "
                                 "frequency factors are)")  # fmt: skip
        if not math.isfinite(factor) or factor < 0:
            raise ModelLoadError(f"rope.scaling.factor {factor} is not a positive number")
        freq_scale = 1.0 / factor if scaling == "linear" and factor != 0.0 else 1.0
        t = f.tensors
        rope_factors = None
        if ROPE_FREQS in t:
            rope_factors = ROPE_FREQS
        elif ROPE_LONG in t or ROPE_SHORT in t:
            if not (ROPE_LONG in t and ROPE_SHORT in t):
                raise ModelLoadError(f"LongRoPE needs both {ROPE_LONG} and {ROPE_SHORT}")
            rope_factors = "longrope"
        fused_gate_up = "blk.0.ffn_gate.weight" not in t and arch == "phi3"
        return cls(
            architecture=arch,
            n_layers=int(get("block_count")),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")),
            vocab_size=vocab,
            context_length=context,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_neox=_NEOX[arch],
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            qkv_bias="blk.0.attn_q.bias" in t,
            tied_embeddings="output.weight" not in t,
            qk_norm="blk.0.attn_q_norm.weight" in t,
            fused_qkv="blk.0.attn_qkv.weight" in t,
            fused_gate_up=fused_gate_up,
            rope_freq_scale=freq_scale,
            rope_attn_factor=float(get("rope.scaling.attn_factor", 1.0)),
            rope_factors=rope_factors,
            rope_original_context=int(get("rope.scaling.original_context_length", context)),
            q_prescaled=arch == "phi3",
        )

    def rope_factors_tensor(self, context_length: int) -> str | None:
        """The tensor of per-pair frequency divisors the model runs with at `context_length` tokens a slot:
        rope_freqs (Llama 3), or LongRoPE's long factors past the original context, else its short ones
        (llama.cpp's rule, llama_model::get_rope_factors)."""
        if self.rope_factors == "longrope":
            return ROPE_LONG if context_length > self.rope_original_context else ROPE_SHORT
        return self.rope_factors

    def rope_freq_factors(self, f: GGUFFile, context_length: int) -> tuple[float, ...] | None:
        """The divisors of RoPE's pair frequencies (theta_i / factor_i) at `context_length`, or None."""
        name = self.rope_factors_tensor(context_length)
        if name is None:
            return None
        factors = f.tensors[name].as_float32().reshape(-1)
        if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
            raise ModelLoadError(f"tensor {name} holds a factor that is not a positive number")
        return tuple(float(x) for x in factors)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward pass reads, with the shape the metadata implies."""
        d, e, kv, qd = self.dim, self.head_dim, self.n_kv_heads * self.head_dim, self.n_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, d),
            "output_norm.weight": (d,),
        }
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        if self.rope_factors == ROPE_FREQS:
            shapes[ROPE_FREQS] = (e // 2,)
        elif self.rope_factors == "longrope":
            shapes[ROPE_LONG] = shapes[ROPE_SHORT] = (e // 2,)
        for i in range(self.n_layers):
            p = f"blk.{i}."
            shapes[p + "attn_norm.weight"] = (d,)
            if self.fused_qkv:
                shapes[p + "attn_qkv.weight"] = (qd + 2 * kv, d)
            else:
                shapes |= {p + "attn_q.weight": (qd, d), p + "attn_k.weight": (kv, d), p + "attn_v.weight": (kv, d)}
            shapes |= {p + "attn_output.weight": (d, qd), p + "ffn_norm.weight": (d,)}
            if self.fused_gate_up:
                shapes[p + "ffn_up.weight"] = (2 * self.ffn_dim, d)
            else:
                shapes |= {p + "ffn_gate.weight": (self.ffn_dim, d), p + "ffn_up.weight": (self.ffn_dim, d)}
            shapes[p + "ffn_down.weight"] = (d, self.ffn_dim)
            if self.qkv_bias:
                shapes |= {
                    p + "attn_q.bias": (qd,),
                    p + "attn_k.bias": (kv,),
                    p + "attn_v.bias": (kv,),
                }
            if self.qk_norm:
                shapes |= {p + "attn_q_norm.weight": (e,), p + "attn_k_norm.weight": (e,)}
        return shapes

    def check_tensors(self, f: GGUFFile) -> None:
        """Raise ModelLoadError if a tensor is missing or its shape disagrees with the metadata,
        or if the file holds a tensor of the architecture that the forward pass would ignore."""
        for name, shape in self.expected_shapes().items():
            t = f.tensors.get(name)
            if t is None:
                raise ModelLoadError(f"tensor {name} is missing")
            if tuple(t.shape) != shape:
                raise ModelLoadError(f"tensor {name} has shape {t.shape}, metadata implies {shape}")
        ignored = [n for n in ("output.bias", "blk.0.attn_output.bias", "blk.0.attn_qkv.bias", "blk.0.attn_norm.bias",
                               "blk.0.ffn_up.bias", "blk.0.ffn_down.bias") if n in f.tensors]  # fmt: skip
        if ignored:
            raise ModelLoadError(f"tensor {ignored[0]} (a bias this engine does not apply) is not supported")
        if self.fused_qkv and self.qkv_bias:
            raise ModelLoadError("separate q/k/v biases beside a fused attn_qkv are not supported")
        if not math.isfinite(self.rope_attn_factor) or self.rope_attn_factor <= 0:
            raise ModelLoadError(f"rope.scaling.attn_factor {self.rope_attn_factor} is not a positive number")
