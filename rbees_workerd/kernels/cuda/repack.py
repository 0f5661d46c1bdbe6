"""Host-side repacking of GGUF weight blocks into the device layout the matmul kernels read.

Every quantization type becomes groups of 32 consecutive elements of a row, each
group a fixed number of uint32 words plus float32 scales. The quantized values
are the GGUF ones, bit for bit; only their arrangement changes (K-quant
sub-blocks become their own groups, f16 scales are widened to the float32 value
the CPU kernels compute from them). Formats:

- NIB4 (4 words): element e < 16 in the low nibble of byte e, e >= 16 in the high
  nibble of byte e - 16; w = (q + off) * d + m.  Q4_0, Q4_1, Q4_K.
- NIB5 (5 words): word 0 holds bit 4 of element e at bit e, then NIB4's words.  Q5_0, Q5_1, Q5_K.
- Q6 (6 words): NIB4's words, then bits 4-5 of element e at bits 2(e%16) of word 4 + e//16;
  w = (q - 32) * d[e // 16] (two scales per group).  Q6_K.
- Q8 (8 words): int8 values in order; w = q * d.  Q8_0.
- F16, BF16 (16 words, two halves per word, low half first) and F32 (32 words): the raw bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K

from rbees_workerd.errors import ModelLoadError

NIB4, NIB5, Q6, Q8, F16, BF16, F32 = range(7)
WORDS = {NIB4: 4, NIB5: 5, Q6: 6, Q8: 8, F16: 16, BF16: 16, F32: 32}
SCALES = {Q6: 2}  # scales per group where not one


@dataclass
class Packed:
    """One weight matrix in device layout (host arrays, uploaded by the backend)."""

    fmt: int
    off: float  # added to the integer value before scaling (-8 for Q4_0, -16 for Q5_0)
    words: np.ndarray  # uint32[N, groups * WORDS[fmt]]
    d: np.ndarray  # float32[N, groups * scales per group]
    m: np.ndarray  # float32[N, groups] (zeros where the type has no min)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [..., 32] -> NIB4 words [..., 4]."""
    b = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)
    return np.ascontiguousarray(b.astype(np.uint8)).view(np.uint32)


def _bits(q: np.ndarray, shift: int, width: int) -> np.ndarray:
    """Field (q >> shift) of `width` bits of 32 elements, packed element e at bit width*e, -> words."""
    per_word = 32 // width
    f = ((q.astype(np.uint32) >> shift) & ((1 << width) - 1)).reshape(*q.shape[:-1], 32 // per_word, per_word)
    shifts = width * np.arange(per_word, dtype=np.uint32)
    return np.bitwise_or.reduce(f << shifts, axis=-1).astype(np.uint32)


def _words(*parts: np.ndarray) -> np.ndarray:
    """Concatenate per-group word arrays [N, G, w_i] and flatten to [N, G * sum(w_i)]."""
    w = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(w.reshape(w.shape[0], -1))


def _legacy(blocks: np.ndarray, has_min: bool, five: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0/Q4_1/Q5_0/Q5_1 blocks [N, G, bytes] -> (words, d, m)."""
    d = _f16(blocks[..., 0:2])
    at = 2
    m = np.zeros_like(d)
    if has_min:
        m = _f16(blocks[..., 2:4])
        at = 4
    qs = np.ascontiguousarray(blocks[..., at + (4 if five else 0) :])
    nib = qs.view(np.uint32)
    if five:
        qh = np.ascontiguousarray(blocks[..., at : at + 4]).view(np.uint32)
        return _words(qh, nib), d, m
    return _words(nib), d, m


def _kquant(blocks: np.ndarray, five: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-blocks [N, B, bytes] -> per-32 groups (words, d * sc, -dmin * m)."""
    n, nb, _ = blocks.shape
    flat = blocks.reshape(n * nb, -1)
    d = _f16(flat[:, 0:2])[:, None]
    dmin = _f16(flat[:, 2:4])[:, None]
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(flat[:, 4:16]))
    scale = (d * sc.reshape(n * nb, 8).astype(np.float32)).reshape(n, nb * 8)
    mins = -(dmin * mn.reshape(n * nb, 8).astype(np.float32)).reshape(n, nb * 8)
    at = 16 + (32 if five else 0)
    ql = flat[:, at : at + 128].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (ql & 15).reshape(n, nb * 8, 32)
    if not five:
        return _words(_nibbles(q)), scale, mins
    qh = flat[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = q | ((qh & 1).reshape(n, nb * 8, 32) << 4)
    return _words(_bits(q, 4, 1), _nibbles(q)), scale, mins


def _q6k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, nb, _ = blocks.shape
    flat = blocks.reshape(n * nb, -1)
    ql = flat[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = flat[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((ql & 15).reshape(n, nb * 8, 32)) | ((qh & 3).reshape(n, nb * 8, 32) << 4)
    scales = flat[:, 192:208].view(np.int8).astype(np.float32)
    d = (_f16(flat[:, 208:210])[:, None] * scales).reshape(n, nb * 16)
    return _words(_nibbles(q), _bits(q, 4, 2)), d, np.zeros((n, nb * 8), np.float32)


def pack(qtype: int, shape: tuple[int, int], raw: np.ndarray) -> Packed:
    """Repack raw GGUF bytes `uint8[N, row_bytes]` of an `[N, K]` matrix; K must be a multiple of 32."""
    n, k = shape
    if k % 32:
        raise ModelLoadError(f"the CUDA backend needs rows of a multiple of 32 elements, got {k}")
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)
    g = k // 32
    ones, zeros = np.ones((n, g), np.float32), np.zeros((n, g), np.float32)
    qt = Q(qtype)
    if qt in (Q.F32, Q.F16, Q.BF16):
        fmt = {Q.F32: F32, Q.F16: F16, Q.BF16: BF16}[qt]
        return Packed(fmt, 0.0, np.ascontiguousarray(raw).view(np.uint32).copy(), ones, zeros)
    if qt == Q.Q8_0:
        b = raw.reshape(n, g, 34)
        words = _words(np.ascontiguousarray(b[..., 2:]).view(np.uint32))
        return Packed(Q8, 0.0, words, _f16(b[..., :2]), zeros)
    legacy = {Q.Q4_0: (18, False, False, -8.0), Q.Q4_1: (20, True, False, 0.0),
              Q.Q5_0: (22, False, True, -16.0), Q.Q5_1: (24, True, True, 0.0)}  # fmt: skip
    if qt in legacy:
        size, has_min, five, off = legacy[qt]
        words, d, m = _legacy(raw.reshape(n, g, size), has_min, five)
        return Packed(NIB5 if five else NIB4, off, words, d, m)
    if qt in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        if k % 256:
            raise ModelLoadError(f"{qt.name} rows must be a multiple of 256 elements, got {k}")
        nb = k // 256
        if qt == Q.Q6_K:
            return Packed(Q6, 0.0, *_q6k(raw.reshape(n, nb, 210)))
        five = qt == Q.Q5_K
        return Packed(NIB5 if five else NIB4, 0.0, *_kquant(raw.reshape(n, nb, 176 if five else 144), five))
    raise ModelLoadError(f"the CUDA backend does not support the quantization type {qt.name}")
