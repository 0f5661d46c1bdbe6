"""Repacking GGUF quantized blocks into the layout the CPU kernels stream (NumPy, load time only).

Every block type becomes 32-element blocks in "chunk-transposed" order: rows are
grouped in chunks of `CHUNK` and, inside a chunk, the row index is the fastest
axis, so the kernels' innermost loop is a plain contiguous map over the chunk's
rows (what LLVM vectorizes). N is padded to whole chunks. Per 32-block the element values are split as

* `qs[c, b, j, r]` (uint8): element j in the low nibble and element j + 16 in the
  high nibble (4-bit and 5/6-bit types), or two planes j and j + 16 of whole bytes
  (Q8_0, int8 stored as uint8);
* `qh[c, b, :, r]` (uint8): the bits above the nibble (`ebits`: 1 per element for
  the 5-bit types, 2 for Q6_K), those of elements j and j + 16 side by side at bit
  offset `2 * j * ebits`;
* `d[c, s, r]`, `m[c, s, r]` (float32, decoded once here): value = d * q + m, one
  scale per 32-block (`half=1`) or per 16-half-block (`half=2`, Q6_K), or
  value = d * (q + offset) when the type has no min (`m` is then empty).

Memory stays within ~1.35x of the GGUF bytes (fp16 scales widened to fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rbees_workerd.errors import ModelLoadError

CHUNK = 64  # rows per chunk: one iteration of the kernels' vectorized row loop (4 zmm of float32)

KIND_NIBBLE = 0  # 4-bit values in qs
KIND_EXT = 1  # 4 low bits in qs, ebits more in qh
KIND_BYTE = 2  # int8 values (Q8_0)

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Blocks:
    """A matrix in kernel layout; see the module docstring for the arrays' meaning."""

    kind: int
    ebits: int
    half: int
    offset: float
    qs: np.ndarray
    qh: np.ndarray
    d: np.ndarray
    m: np.ndarray


def _split_blocks(raw: np.ndarray, qtype: int) -> np.ndarray:
    """uint8[N, row_bytes] -> uint8[N, blocks_per_row, type_size]."""
    _, type_size = GGML_QUANT_SIZES[Q(qtype)]
    return raw.reshape(raw.shape[0], -1, type_size)


def _k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and mins of Q4_K/Q5_K (12 bytes -> 8 + 8), as in ggml's get_scale_min_k4."""
    sc = sc.reshape(*sc.shape[:-1], 3, 4)
    d, m, md = sc[..., 0, :], sc[..., 1, :], sc[..., 2, :]
    scale = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scale, mins


@dataclass(frozen=True)
class Fields:
    """A block-quantized matrix's GGUF fields, unpacked but not multiplied out (arrays [N, ...]).

    Both layouts are built from these, and `simd`'s tiles keep them as they are (fp16 and 6-bit
    integers), so its kernels apply them as llama.cpp does."""

    values: np.ndarray  # uint8[N, K]: each element's unsigned integer (Q8_0: its int8 bits)
    d: np.ndarray  # float16[N, nb]: the scale of each block (32 elements, or 256 for K-quants)
    m: np.ndarray | None  # float16[N, nb]: Q4_1/Q5_1's min, Q4_K/Q5_K's dmin
    scales: np.ndarray | None  # [N, nb, subs]: K-quant sub-block scales (uint8 6-bit; Q6_K int8 per 16)
    mins: np.ndarray | None  # uint8[N, nb, 8]: Q4_K/Q5_K's 6-bit mins per 32


def _f16(a: np.ndarray) -> np.ndarray:
    n, nblk = a.shape[:2]
    return np.ascontiguousarray(a).view(np.float16).reshape(n, nblk)


def gguf_fields(qtype: int, raw: np.ndarray) -> Fields:
    """Unpack the GGUF bytes uint8[N, row_bytes] of a block-quantized `[N, K]` matrix."""
    blk = _split_blocks(raw, qtype)
    n, nblk, _ = blk.shape
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        has_min = qtype in (Q.Q4_1, Q.Q5_1)
        d = _f16(blk[..., 0:2])
        m = _f16(blk[..., 2:4]) if has_min else None
        pos = 4 if has_min else 2
        if qtype == Q.Q8_0:
            return Fields(np.ascontiguousarray(blk[..., 2:]).reshape(n, -1), d, None, None, None)
        if qtype in (Q.Q5_0, Q.Q5_1):
            qh = np.ascontiguousarray(blk[..., pos : pos + 4]).view(np.uint32)  # [n, nblk, 1]
            hbits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
            pos += 4
        else:
            hbits = np.zeros((n, nblk, 32), np.uint8)
        qs = blk[..., pos : pos + 16]
        vals = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | hbits
        return Fields(vals.reshape(n, -1), d, m, None, None)
    if qtype in (Q.Q4_K, Q.Q5_K):
        sc, mn = _k_scale_min(blk[..., 4:16])
        qs = blk[..., -128:].reshape(n, nblk, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
        vals = (qs & 0x0F).reshape(n, nblk, 8, 32)
        if qtype == Q.Q5_K:
            qh = blk[..., 16:48].reshape(n, nblk, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
            vals = vals | ((qh & 1) << 4)
        return Fields(vals.reshape(n, -1), _f16(blk[..., 0:2]), _f16(blk[..., 2:4]), sc, mn)
    if qtype == Q.Q6_K:
        ql = blk[..., 0:128].reshape(n, nblk, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
        qh = blk[..., 128:192].reshape(n, nblk, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
        vals = (ql & 0x0F).reshape(n, nblk, 8, 32) | ((qh & 3).reshape(n, nblk, 8, 32) << 4)
        sc = np.ascontiguousarray(blk[..., 192:208]).view(np.int8)  # [n, nblk, 16]
        return Fields(vals.reshape(n, -1), _f16(blk[..., 208:210]), None, sc, None)
    raise ModelLoadError(f"quant type {qtype} has no CPU kernel")


def _values_and_scales(qtype: int, blk: Fields) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """Element-ordered integer values uint8[N, K] and per-(half-)block d, m (or None) and offset."""
    n = blk.values.shape[0]
    d = blk.d.astype(np.float32)
    m = None if blk.m is None else blk.m.astype(np.float32)
    if qtype in (Q.Q4_K, Q.Q5_K):
        return blk.values, (d[..., None] * blk.scales).reshape(n, -1), (-(m[..., None] * blk.mins)).reshape(n, -1), 0.0
    if qtype == Q.Q6_K:
        return blk.values, (d[..., None] * blk.scales).reshape(n, -1), None, -32.0
    offset = {Q.Q4_0: -8.0, Q.Q5_0: -16.0}.get(Q(qtype), 0.0)
    return blk.values, d, m, offset


def _chunked(a: np.ndarray, dtype: type) -> np.ndarray:
    """[N, ...] -> [N/CHUNK, ..., CHUNK] with rows padded with zeros to a whole chunk."""
    n = a.shape[0]
    nc = -(-n // CHUNK)
    pad = np.zeros((nc * CHUNK, *a.shape[1:]), dtype)
    pad[:n] = a
    pad = pad.reshape(nc, CHUNK, *a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(pad, 1, -1))


def pack_blocks(qtype: int, raw: np.ndarray) -> Blocks:
    """Repack the GGUF bytes of a block-quantized `[N, K]` matrix; `raw` is not kept."""
    n = raw.shape[0]
    vals, d, m, offset = _values_and_scales(qtype, gguf_fields(qtype, raw))
    nb = vals.shape[1] // 32
    v = vals.reshape(n, nb, 32)
    half = d.shape[1] // nb
    empty_qh = np.zeros((-(-n // CHUNK), nb, 0, CHUNK), np.uint8)
    if qtype == Q.Q8_0:
        return Blocks(
            KIND_BYTE,
            0,
            1,
            0.0,
            _chunked(v, np.uint8),
            empty_qh,
            _chunked(d, np.float32),
            _chunked(np.zeros((n, 0), np.float32), np.float32),
        )
    qs = (v[..., :16] & 0x0F) | ((v[..., 16:] & 0x0F) << 4)
    ebits = {Q.Q5_0: 1, Q.Q5_1: 1, Q.Q5_K: 1, Q.Q6_K: 2}.get(Q(qtype), 0)
    if ebits:
        # the extra bits of elements j and j + 16 side by side: pair j at bit 2*j*ebits of a
        # little-endian 4*ebits-byte word
        ext = (v >> 4).astype(np.uint32)
        pair = ext[..., :16] | (ext[..., 16:] << ebits)
        per_word = 16 // ebits
        shifts = (np.arange(16, dtype=np.uint32) % per_word) * (2 * ebits)
        words = (pair << shifts).reshape(n, nb, ebits, per_word).sum(axis=-1, dtype=np.uint32)
        qh = _chunked(np.ascontiguousarray(words).view(np.uint8).reshape(n, nb, 4 * ebits), np.uint8)
        kind = KIND_EXT
    else:
        qh, kind = empty_qh, KIND_NIBBLE
    mm = np.zeros((n, 0), np.float32) if m is None else m
    return Blocks(
        kind, ebits, half, offset, _chunked(qs, np.uint8), qh, _chunked(d, np.float32), _chunked(mm, np.float32)
    )


def pack_dense(qtype: int, raw: np.ndarray) -> np.ndarray:
    """F32 -> float32[N/CHUNK, K, CHUNK]; F16/BF16 -> their uint16 bits in the same layout."""
    dtype = np.float32 if qtype == Q.F32 else np.uint16
    w = np.ascontiguousarray(raw).view(dtype)
    return _chunked(w, dtype)
