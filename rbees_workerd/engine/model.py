"""The transformer forward pass (llama, qwen2, qwen3, phi3), written once against the Backend interface.

One `run` call is one step over a flat batch of tokens: the prompt tokens of a
sequence being prefilled, one token for each sequence being decoded, or both.
Each token carries its KV-cache slot and position, so prefill and batched
decode are the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rbees_workerd.engine.config import ModelConfig
from rbees_workerd.engine.gguf import GGUFFile
from rbees_workerd.kernels.backend import Array, Backend, GatedFFN, Norm, Picks, Product, RopeStore


@dataclass
class Layer:
    attn_norm: Array
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    bq: Array | None
    bk: Array | None
    bv: Array | None
    q_norm: Array | None  # per-head RMSNorm weights [E] of q and k (qwen3)
    k_norm: Array | None
    ffn_norm: Array
    w_gate: Any
    w_up: Any
    w_down: Any
    cache_k: Array  # [slots, context, G, E] of Backend.kv_dtype
    cache_v: Array


class Scratch:
    """Activation buffers for up to `t_max` tokens; steps use their first T rows."""

    def __init__(self, cfg: ModelConfig, be: Backend, t_max: int) -> None:
        h, g, e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.ids = be.zeros((4 * t_max,), np.int32)  # a step's tokens, positions, slots and logit rows, in one upload
        self.x = be.zeros((t_max, cfg.dim))
        self.h = be.zeros((t_max, cfg.dim))
        self.q = be.zeros((t_max, h, e))
        self.k = be.zeros((t_max, g, e))
        self.v = be.zeros((t_max, g, e))
        self.att = be.zeros((t_max, h, e))
        self.gate = be.zeros((t_max, cfg.ffn_dim))
        self.up = be.zeros((t_max, cfg.ffn_dim))
        self.last = be.zeros((t_max, cfg.dim))


def scratch_bytes(cfg: ModelConfig, t_max: int) -> int:
    """What `Scratch` allocates, for the up-front memory check."""
    per_token = 4 * (4 + 3 * cfg.dim + 2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim)
    return t_max * (per_token + 8 * cfg.ffn_dim)


# the sizes steps of three tokens or more are padded to: powers of two, and 1.5 times them from 48
_PAD_SIZES = sorted({1 << k for k in range(2, 24)} | {3 << k for k in range(4, 23)})


def padded(n: int, limit: int) -> int:
    """The size a step of n tokens is padded to, at most `limit`: n itself up to 2 (the
    one-token products run a token per block row), then 4, 8, 16, 32, 48, 64, 96, 128, 192, ...: a few
    shapes, and at most half of a step's tokens padding."""
    if n <= 2:
        return n
    return min(next(size for size in _PAD_SIZES if size >= n), limit)


def padded_sizes(limit: int) -> list[int]:
    """Every size `padded` gives a step, at most `limit`: 1, 2, 4, 8, ..."""
    return sorted({padded(n, limit) for n in range(1, limit + 1)})


def cache_slots(slots: int, be: Backend) -> int:
    """The slots the K and V caches hold for `slots` sequences: on a backend that pads steps, one more
    (Transformer.pad_slot)."""
    return slots + int(be.pads_steps)


def kv_cache_bytes(cfg: ModelConfig, slots: int, context_length: int, itemsize: int = 4) -> int:
    """The K and V caches of `slots` cache slots (cache_slots), of `itemsize` bytes a value (Backend.kv_dtype's)."""
    return 2 * itemsize * cfg.n_layers * slots * context_length * cfg.n_kv_heads * cfg.head_dim


class Transformer:
    def __init__(
        self,
        cfg: ModelConfig,
        f: GGUFFile,
        be: Backend,
        slots: int,
        context_length: int,
        max_step_tokens: int = 256,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        self.cfg, self.be = cfg, be
        self.slots, self.context_length, self.max_step_tokens = slots, context_length, max_step_tokens
        # on a backend that pads steps, one slot more in the caches, which no sequence holds: their extra tokens
        self.pad_slot = slots if be.pads_steps else None
        # a padded step's logit rows: one a slot at most (a step samples each sequence once), as many as its tokens
        # below that (so that each padded size is one shape)
        self.max_logit_rows = padded(max(slots, 3), max_step_tokens)
        n_cache = cache_slots(slots, be)
        t = f.tensors

        self.weight_bytes = 0  # what the backend holds for the weights (the file holds sum(raw.nbytes))
        self.kv_cache_bytes = 0
        file_bytes = sum(tensor.raw.nbytes for tensor in t.values()) or 1
        read = 0  # file bytes prepared so far, for on_progress

        def held(make: Callable[[], Any], name: str, part: float = 1.0) -> Any:
            nonlocal read
            before = be.memory_bytes()
            out = make()
            self.weight_bytes += be.memory_bytes() - before
            read += t[name].raw.nbytes * part
            if on_progress:
                on_progress(min(read / file_bytes, 1.0))
            return out

        def mat(name: str) -> Any:
            return held(lambda: be.weight(int(t[name].qtype), t[name].shape, t[name].raw), name)

        def mats(name: str, rows: list[int]) -> list[Any]:
            """A fused matrix split by rows into matrices of `rows` rows each (phi3's attn_qkv and
            ffn_up): each row of a quantized matrix is blocks of its own, so the parts are slices."""
            w, n = t[name], sum(rows)
            if w.shape[0] != n:
                raise ValueError(f"{name} has {w.shape[0]} rows, not {n}")
            bounds = np.cumsum([0, *rows])
            return [held(lambda a=a, b=b: be.weight(int(w.qtype), (b - a, w.shape[1]), w.raw[a:b]), name, (b - a) / n)
                    for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # fmt: skip

        def vec(name: str) -> Array | None:
            return held(lambda: be.vector(t[name].as_float32()), name) if name in t else None

        def cache() -> Array:
            before = be.memory_bytes()
            out = be.zeros((n_cache, context_length, cfg.n_kv_heads, cfg.head_dim), be.kv_dtype)
            self.kv_cache_bytes += be.memory_bytes() - before
            return out

        self.token_embd = mat("token_embd.weight")
        self.output = self.token_embd if cfg.tied_embeddings else mat("output.weight")
        self.output_norm = vec("output_norm.weight")
        self.rope_freq_factors = cfg.rope_freq_factors(f, context_length)
        qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.layers: list[Layer] = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            if cfg.fused_qkv:
                wq, wk, wv = mats(p + "attn_qkv.weight", [qd, kvd, kvd])
            else:
                wq, wk, wv = (mat(p + f"attn_{x}.weight") for x in "qkv")
            if cfg.fused_gate_up:
                w_gate, w_up = mats(p + "ffn_up.weight", [cfg.ffn_dim, cfg.ffn_dim])  # llama.cpp's swiglu: gate first
            else:
                w_gate, w_up = mat(p + "ffn_gate.weight"), mat(p + "ffn_up.weight")
            self.layers.append(
                Layer(
                    attn_norm=vec(p + "attn_norm.weight"),
                    wq=wq,
                    wk=wk,
                    wv=wv,
                    wo=mat(p + "attn_output.weight"),
                    bq=vec(p + "attn_q.bias"),
                    bk=vec(p + "attn_k.bias"),
                    bv=vec(p + "attn_v.bias"),
                    q_norm=vec(p + "attn_q_norm.weight") if cfg.qk_norm else None,
                    k_norm=vec(p + "attn_k_norm.weight") if cfg.qk_norm else None,
                    ffn_norm=vec(p + "ffn_norm.weight"),
                    w_gate=w_gate,
                    w_up=w_up,
                    w_down=mat(p + "ffn_down.weight"),
                    cache_k=cache(),
                    cache_v=cache(),
                )
            )
            f.release_pages()
        be.loaded()
        self.scratch = Scratch(cfg, be, max_step_tokens)
        self._logits: dict[int, Array] = {}  # per count of logit rows
        self._views: dict[tuple[int, int, int], tuple[Array, ...]] = {}  # see _step_views

    def run(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        logit_rows: np.ndarray,
        feed: Picks | None = None,
        pad: bool = False,
    ) -> Array:
        """One step; returns the backend's logits [len(logit_rows), V] for the requested token rows.

        With `feed`, the step's first len(feed) tokens are those picks (the values in `tokens`
        there are ignored): a GPU passes them on the device, before the host has read them.
        A step that asks no rows (a chunk of a prompt longer than a step, before its last) gets
        the last token's: one row of the output product keeps every step's shapes non-empty.

        With `pad` on a backend that captures steps per shape, a step of several sequences is padded to
        one of a few sizes (`padded`), with as many logit rows as tokens up to `max_logit_rows` (a padded
        slot count: a larger step, which holds prompt tokens, samples no more): the extra tokens are token 0 at
        position 0 of `pad_slot`, which no sequence holds (so a step is padded when every slot generates,
        too), the extra logit rows copies of the last; every row is computed on its own, so the real rows'
        logits are those of the unpadded step. (Padding the rows to sizes of their own made a pair of
        sizes a step's shape: at 256 streams most steps then came in shapes seen once or twice, each run
        launch by launch before its graph was captured; so did the steps of a full worker while the pad
        slot was a free one: 256 streams on 256 slots, H100, 2026-12-06. A row a token to 2,048 would
        take the output product 2,048 rows and the logits 1.2 GB on a 152k vocabulary.)"""
        if len(logit_rows) == 0:
            logit_rows = np.array([len(tokens) - 1], np.int32)
        n, r = len(tokens), len(logit_rows)
        if not 0 < n <= self.max_step_tokens or not 0 < r <= n:
            raise ValueError(f"a step takes 1..{self.max_step_tokens} tokens and up to T logit rows")
        tokens, logit_rows = np.asarray(tokens, np.int32), np.asarray(logit_rows, np.int32)
        slots, positions = np.asarray(slots, np.int32), np.asarray(positions, np.int32)
        one_seq = bool(n > 1 and np.all(slots == slots[0]) and np.all(np.diff(positions) == 1))
        if pad and self.pad_slot is not None and not one_seq:
            big_n = padded(n, self.max_step_tokens)
            extra = big_n - n
            tokens, positions = np.pad(tokens, (0, extra)), np.pad(positions, (0, extra))
            slots = np.concatenate([slots, np.full(extra, self.pad_slot, np.int32)])
            rows = min(big_n, self.max_logit_rows) if r <= self.max_logit_rows else big_n
            logit_rows = np.pad(logit_rows, (0, rows - r), mode="edge")
        views = self._step_views(len(tokens), len(logit_rows), r)
        self.be.upload(np.concatenate([tokens, positions, slots, logit_rows]), views[0])
        if feed is not None:
            if len(feed) > n:
                raise ValueError(f"{len(feed)} fed tokens for a step of {n}")
            self.be.feed(feed, views[1])
        self.be.run_step((len(tokens), len(logit_rows), one_seq), lambda: self._step(*views[1:-1], one_seq))
        return views[-1]

    def prepare_padded_steps(self) -> None:
        """On a backend that captures steps per shape, run each padded size of a step of several sequences twice
        (all its tokens at position 0 of `pad_slot`): it captures a shape at its
        second step, so a server's steps replay from the first request on. (Measured on the H100, 0.5B shape,
        256 streams: most steps then ran launch by launch from Python, in shapes seen once or twice.) The sizes
        include one and two tokens, the decode steps of the first streams of a burst: captured while serving
        instead, at a later burst, the two-token step's graph held up the engine for 115-123 ms (H100)."""
        if self.pad_slot is None:
            return
        for size in padded_sizes(self.max_step_tokens):
            zeros = np.zeros(size, np.int32)  # (positions all 0: not one sequence's consecutive tokens)
            for _ in range(2):
                self.run(zeros, zeros, np.full(size, self.pad_slot, np.int32), zeros[:1], pad=True)

    def _step_views(self, n: int, r: int, wanted: int) -> tuple[Array, ...]:
        """The device views of a step of n tokens and r logit rows: ids, tokens, positions, slots, rows,
        the logits, and the first `wanted` rows of the logits (slicing device arrays costs tens of
        microseconds: once per shape)."""
        views = self._views.get((n, r, wanted))
        if views is None:
            if r not in self._logits:
                self._logits[r] = self.be.zeros((r, self.cfg.vocab_size))
            ids, logits = self.scratch.ids, self._logits[r]
            views = self._views[(n, r, wanted)] = (ids[: 3 * n + r], ids[:n], ids[n : 2 * n], ids[2 * n : 3 * n],
                                                   ids[3 * n : 3 * n + r], logits,
                                                   logits if wanted == r else logits[:wanted])  # fmt: skip
        return views

    def forward(
        self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray, logit_rows: np.ndarray
    ) -> np.ndarray:
        """`run`, with the logits copied to the host (tests and tools)."""
        return self.be.download(self.run(tokens, positions, slots, logit_rows))

    def _step(self, tokens: Array, positions: Array, slots: Array, rows: Array, logits: Array, one_seq: bool) -> None:
        cfg, be, s = self.cfg, self.be, self.scratch
        n, r = tokens.shape[0], rows.shape[0]
        x, h = s.x[:n], s.h[:n]
        q, k, v, att = s.q[:n], s.k[:n], s.v[:n], s.att[:n]
        q2, k2, v2, att2 = (a.reshape(n, -1) for a in (q, k, v, att))

        # phi3's graph scales q before attention (llama.cpp rounds q to fp16 after that scaling)
        q_scale, att_scale = (float(np.float32(1) / np.sqrt(np.float32(cfg.head_dim))), 1.0) if cfg.q_prescaled \
            else (1.0, None)  # fmt: skip
        be.embed(self.token_embd, tokens, x)
        for layer in self.layers:
            rope = RopeStore(q, k, v, layer.cache_k, layer.cache_v, slots, positions, cfg.rope_theta, cfg.rope_neox,
                             self.rope_freq_factors, cfg.rope_freq_scale, cfg.rope_attn_factor, layer.q_norm,
                             layer.k_norm, cfg.norm_eps, q_scale)  # fmt: skip
            qkv = [Product(layer.wq, q2, layer.bq), Product(layer.wk, k2, layer.bk), Product(layer.wv, v2, layer.bv)]
            be.products(x, qkv, Norm(layer.attn_norm, cfg.norm_eps, h), rope)
            be.attention(q, layer.cache_k, layer.cache_v, slots, positions, att, one_seq, att_scale)
            be.products(att2, [Product(layer.wo, x, accumulate=True)])
            ffn = Norm(layer.ffn_norm, cfg.norm_eps, h)
            be.gated_ffn(x, GatedFFN(ffn, layer.w_gate, layer.w_up, layer.w_down, s.gate[:n], s.up[:n], x))
        last = s.last[:r]
        be.gather_rows(x, rows, last)
        be.products(last, [Product(self.output, logits)], Norm(self.output_norm, cfg.norm_eps, s.h[:r]))
