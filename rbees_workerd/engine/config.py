"""Model hyperparameters, read from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass

from rbees_workerd.engine.gguf import GGUFFile
from rbees_workerd.errors import ModelLoadError

ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_neox: bool  # qwen2 rotates halves; llama GGUF files rotate adjacent pairs
    norm_eps: float
    qkv_bias: bool
    tied_embeddings: bool

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
        embd = f.tensors.get("token_embd.weight")
        if embd is None:
            raise ModelLoadError("tensor token_embd.weight is missing")
        vocab = int(md.get(f"{arch}.vocab_size", embd.shape[0]))
        return cls(
            architecture=arch,
            n_layers=int(get("block_count")),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=dim // n_heads,
            ffn_dim=int(get("feed_forward_length")),
            vocab_size=vocab,
            context_length=int(get("context_length")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_neox=arch == "qwen2",
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            qkv_bias="blk.0.attn_q.bias" in f.tensors,
            tied_embeddings="output.weight" not in f.tensors,
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward pass reads, with the shape the metadata implies."""
        d, e, kv = self.dim, self.head_dim, self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, d),
            "output_norm.weight": (d,),
        }
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        for i in range(self.n_layers):
            p = f"blk.{i}."
            shapes |= {
                p + "attn_norm.weight": (d,),
                p + "attn_q.weight": (self.n_heads * e, d),
                p + "attn_k.weight": (kv, d),
                p + "attn_v.weight": (kv, d),
                p + "attn_output.weight": (d, self.n_heads * e),
                p + "ffn_norm.weight": (d,),
                p + "ffn_gate.weight": (self.ffn_dim, d),
                p + "ffn_up.weight": (self.ffn_dim, d),
                p + "ffn_down.weight": (d, self.ffn_dim),
            }
            if self.qkv_bias:
                shapes |= {
                    p + "attn_q.bias": (self.n_heads * e,),
                    p + "attn_k.bias": (kv,),
                    p + "attn_v.bias": (kv,),
                }
        return shapes

    def check_tensors(self, f: GGUFFile) -> None:
        """Raise ModelLoadError if a tensor is missing or its shape disagrees with the metadata."""
        for name, shape in self.expected_shapes().items():
            t = f.tensors.get(name)
            if t is None:
                raise ModelLoadError(f"tensor {name} is missing")
            if tuple(t.shape) != shape:
                raise ModelLoadError(f"tensor {name} has shape {t.shape}, metadata implies {shape}")
