"""The one interface both compute backends implement.

The model (`engine/model.py`) is written once against this interface and never
branches on the backend. Arrays are whatever the backend owns (NumPy arrays on
the CPU, device arrays on CUDA); the model only creates them through the
backend and passes them back to it.

Shapes use these letters: T tokens in the step (prompt tokens of one sequence
during prefill, one token per active sequence during decode, or a mix), D model
width, H query heads, G key/value heads, E head size, N/K output/input
features of a matrix, S slots, C context length, V vocabulary.

All activations are float32. Weight matrices are `[N, K]` (GGUF row-major,
one row per output feature) and stay in their quantized GGUF format.

The ops are the blocks the model is made of, not single kernels: a group of
products over one input (with the RMSNorm before them, their biases, and for
q/k/v the rotation and the KV-cache store after them), the gated feed-forward
block, attention. The records below say what each does; a backend chains its
kernels for them (the CPU) or lowers each to as few launches as it can (CUDA),
without having to rediscover the structure from a stream of smaller ops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = Any  # a backend-owned array; the model treats it as opaque


@dataclass(frozen=True)
class Product:
    """out[T, N] = x[T, K] @ weight[N, K].T (+ bias[N]); with `accumulate`, out += that (a residual add)."""

    weight: Any
    out: Array
    bias: Array | None = None
    accumulate: bool = False


@dataclass(frozen=True)
class Norm:
    """RMSNorm of an input: x[t] / sqrt(mean(x[t]**2) + eps) * weight, written to `out` [T, K] too."""

    weight: Array
    eps: float
    out: Array


@dataclass(frozen=True)
class RopeStore:
    """What follows the q/k/v products: q[T, H, E] and k[T, G, E] (views of the first two products'
    outputs) rotated by position, then k and v stored at (slots[t], positions[t]) of the caches
    cache_k/v[S, C, G, E]. `neox=False` rotates adjacent pairs (2i, 2i+1) (llama GGUF files);
    `neox=True` rotates (i, i + E/2) (qwen2, qwen3, phi3).

    Pair i turns by the angle position * freq_scale * theta^(-2i/E) / freq_factors[i] (the factors:
    Llama 3's rope_freqs, phi3's LongRoPE long or short factors; none: 1), its cos and sin scaled by
    `attn_factor` (LongRoPE's attention scaling): see `rope_table`. With `q_norm` and `k_norm`
    (qwen3), each head of q and k is first RMS-normalized with those [E] weights and `norm_eps`.
    q is multiplied by `q_scale` after its rotation (phi3's graph scales q by 1/sqrt(E) there, in
    float32 before attention rounds it to fp16, and then attends with scale 1)."""

    q: Array
    k: Array
    v: Array
    cache_k: Array
    cache_v: Array
    slots: Array
    positions: Array
    theta: float
    neox: bool
    freq_factors: tuple[float, ...] | None = None
    freq_scale: float = 1.0
    attn_factor: float = 1.0
    q_norm: Array | None = None
    k_norm: Array | None = None
    norm_eps: float = 0.0
    q_scale: float = 1.0

    @property
    def angles_key(self) -> tuple[Any, ...]:
        """What the rotation angles depend on besides the positions and the head size."""
        return (float(self.theta), self.freq_factors, float(self.freq_scale), float(self.attn_factor))


def rope_table(positions: np.ndarray, e: int, theta: float, freq_factors: Sequence[float] | None = None,
               freq_scale: float = 1.0, attn_factor: float = 1.0) -> np.ndarray:  # fmt: skip
    """cos and sin [2, T, E/2] of the RoPE angles of `positions` (see RopeStore), computed in float64
    and rounded to float32; both backends rotate with these values."""
    inv = float(theta) ** (-2.0 * np.arange(e // 2) / e)
    if freq_scale != 1.0:
        inv = inv * freq_scale
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors, np.float64)
    angle = np.asarray(positions, np.float64)[:, None] * inv
    table = np.stack([np.cos(angle), np.sin(angle)])
    if attn_factor != 1.0:
        table *= attn_factor
    return table.astype(np.float32)


@dataclass(frozen=True)
class GatedFFN:
    """out (+= with `accumulate`) down(silu(gate(n)) * up(n)) with n = norm(x): the SwiGLU block.

    `act` [T, F] receives silu(gate(n)) * up(n) and `up_out` [T, F] is scratch of the same shape."""

    norm: Norm
    gate: Any
    up: Any
    down: Any
    act: Array
    up_out: Array
    out: Array
    accumulate: bool = True


@dataclass(frozen=True)
class SamplingRow:
    """What the backend needs to pick the next token of one sequence.

    `uniform` is a random number in [0, 1) drawn on the host from the
    sequence's own seeded generator, so that a seed reproduces a run on any
    backend that implements the same filtering. `history` holds the token ids
    the repetition penalty applies to (prompt and generated, most recent last).
    """

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    uniform: float
    history: np.ndarray  # int32


class Picks:
    """The token ids one `sample_async` call picked, read with `ids()`.

    This base class holds ids that are already on the host (backends that compute as they are
    called); a GPU backend's picks also wait for the device and stay on it for `feed`."""

    def __init__(self, ids: np.ndarray) -> None:
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        """The ids, one per sampled row (waits until they are known)."""
        return self._ids


class Backend(ABC):
    """Memory and math for one device. Ops write into caller-provided `out` arrays."""

    name: str  # "cpu" or "cuda"
    device: str  # a human-readable device description, e.g. "cpu" or "cuda:0 NVIDIA H100"
    # whether calls only queue work on the device: then the engine queues the next step before it
    # reads the tokens of the last one (sample_async, feed); the CPU computes as it is called
    queues_ahead: bool = False
    # whether a step's work is captured per shape (CUDA graphs): the engine then pads steps of a few
    # tokens or more to a few sizes (Transformer.run), so that a server's steps reuse their captures
    pads_steps: bool = False
    # prompt lengths whose steps run kernels compiled apart (CUDA: the tensor-core product's size classes):
    # the engine's warm-up prefills one prompt of each, so that none compiles while requests are in flight
    warm_sizes: tuple[int, ...] = (1,)
    # what the KV cache holds: float16 values in either case (llama.cpp's cache), as float32 (the CPU's
    # kernels read them so) or as their bits (uint16, half the memory and the attention's reads: CUDA)
    kv_dtype: Any = np.float32

    # ---- memory -----------------------------------------------------------------
    @abstractmethod
    def weight(self, qtype: int, shape: tuple[int, int], raw: np.ndarray) -> Any:
        """Prepare a quantized `[N, K]` matrix from its raw GGUF bytes (`uint8[N, row_bytes]`).

        The result stays quantized (a repacking of the same blocks is fine).
        `qtype` is a `gguf.GGMLQuantizationType` value.
        """

    @abstractmethod
    def vector(self, data: np.ndarray) -> Array:
        """A dense float32 array (norm weights, biases) copied to the device."""

    @abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Array:
        """A zero-filled array on the device (scratch buffers, the KV cache)."""

    @abstractmethod
    def upload(self, host: np.ndarray, out: Array) -> None:
        """Copy a host array into an existing device array of the same shape (token ids, positions)."""

    @abstractmethod
    def download(self, a: Array) -> np.ndarray:
        """Copy a device array to the host."""

    def check_fits(self, needed_bytes: int) -> None:
        """Raise VramOOM before allocating when the device cannot hold `needed_bytes` more.

        The engine calls this once with its whole need (weights, KV cache, scratch).
        Host memory is not checked: the CPU backend accepts anything.
        """

    def loaded(self) -> None:
        """Called once every weight is in place: free what loading needed (a GPU's staging buffers)."""

    def enter_thread(self) -> None:
        """Called by a thread before it runs steps on this backend: apply what is per thread (Numba's CPU
        thread count is, so a worker's scheduler thread must set it again)."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes this backend holds for weights, cache and scratch (VRAM on CUDA)."""

    # ---- ops --------------------------------------------------------------------
    @abstractmethod
    def embed(self, table: Any, tokens: Array, out: Array) -> None:
        """out[t, :] = dequantized row tokens[t] of the `[V, D]` embedding table."""

    @abstractmethod
    def products(
        self, x: Array, prods: Sequence[Product], norm: Norm | None = None, rope: RopeStore | None = None
    ) -> None:
        """Every product of `prods` over the one input x[T, K], in one pass where the backend can.

        With `norm`, the input is RMSNorm(x) (also written to `norm.out`). With `rope`, the outputs of
        the first three products are q, k and v: q and k are rotated by position and k and v are then
        stored in the KV cache (see RopeStore). A product's output must not be x, nor the norm's output.
        """

    @abstractmethod
    def gated_ffn(self, x: Array, ffn: GatedFFN) -> None:
        """The SwiGLU feed-forward block: ffn.out (+)= down(silu(gate(n)) * up(n)), n = RMSNorm(x)."""

    @abstractmethod
    def attention(
        self,
        q: Array,
        cache_k: Array,
        cache_v: Array,
        slots: Array,
        positions: Array,
        out: Array,
        one_sequence: bool = False,
        scale: float | None = None,
    ) -> None:
        """out[T, H, E] = causal attention of q[T, H, E] over the cached k/v[S, C, G, E] of each token's slot.

        Token t attends to positions 0..positions[t] of slot slots[t] (the step's own k/v are stored
        already, by `products` with a RopeStore), query head h using key/value head h // (H // G);
        scores q.k times `scale` (None: 1/sqrt(E); 1 where q was scaled already, RopeStore.q_scale).
        `one_sequence` promises that the T tokens are consecutive positions of one slot (a prompt
        chunk), which lets a backend attend a tile of them at a time.
        """

    @abstractmethod
    def gather_rows(self, x: Array, rows: Array, out: Array) -> None:
        """out[r] = x[rows[r]] (the tokens whose logits are needed)."""

    @abstractmethod
    def sample(self, logits: Array, rows: list[SamplingRow]) -> np.ndarray:
        """Pick one token id per logits row; only the ids cross to the host.

        The filtering order is fixed so backends agree: repetition penalty
        (llama.cpp rule: positive logits divided, negative multiplied) on the
        distinct ids of `history`; temperature 0 means argmax (lowest id on
        ties); else logits / temperature, keep the top_k (0 = all), softmax,
        keep the smallest prefix of the sorted probabilities whose sum reaches
        top_p, drop those below min_p * max probability, renormalize, and take
        the first token (in descending probability order) whose cumulative
        probability exceeds `uniform`.
        """

    def sample_async(self, logits: Array, rows: list[SamplingRow]) -> Picks:
        """`sample` without waiting for the ids: they come with the result's `ids()`, and `feed`
        can pass them to a later step on the device before they have crossed to the host."""
        return Picks(self.sample(logits, rows))

    def feed(self, picks: Picks, tokens: Array) -> None:
        """tokens[:len(picks)] = the picked ids, queued after the sampling that picks them.

        Call it before the next sampling of as many rows (a GPU reuses its device ids then)."""
        ids = picks.ids()
        self.upload(ids, tokens[: len(ids)])

    # ---- step execution ----------------------------------------------------------
    def run_step(self, key: Hashable, step: Callable[[], None]) -> None:
        """Run one forward step; `key` identifies its shapes.

        The CPU runs `step` directly. A GPU backend may capture the launches
        the first time a key is seen and replay the capture afterwards, which
        is why a step reads its variable inputs (tokens, positions, slots)
        only from device buffers that `upload` refreshes before each call.
        """
        step()

    def synchronize(self) -> None:
        """Wait until the device has finished queued work (no-op on the CPU)."""
