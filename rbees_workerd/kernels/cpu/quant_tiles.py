"""The tile layout of `simd`'s integer kernels: GGUF blocks regrouped per 8 rows (NumPy, load time).

A matrix becomes tiles of TILE_ROWS rows (N padded with zero rows), each tile one contiguous
run of its blocks (32 elements, or 256 for the K-quants), so that decode streams each weight
byte once, in order. Block `tiles[t, b]` holds the 8 rows' fields of that block:

1. the values, per 32-element sub-block s, per 4-byte group g, per row r, 4 bytes i: for the
   4/5/6-bit types the byte holds element 4g+i of the sub-block in its low nibble and element
   16+4g+i in its high one; for Q8_0 (8 groups) the byte is element 4g+i. A 32-byte load is
   8 rows x 4 bytes, and one `vpdpbusd` (or `vpmaddubsw` + `vpmaddwd`) against 4 broadcast
   activation bytes gives each row's sum of 4 products in an int32 lane.
2. the bits above the nibble (1 for Q5_0/Q5_1/Q5_K, 2 for Q6_K), per sub-block, per word
   w < ebits, per row, 4 bytes i: the bits of element 16h+4g+i (half h, group g) sit at bit
   p = ebits*(g+4h) of word p // 8, so one constant shift and mask lifts a group's bits above
   its nibbles (see `simd`).
3. the scales as GGUF stores them: fp16 d[8], then fp16 m[8] (Q4_1/Q5_1's min, Q4_K/Q5_K's
   dmin); the K-quants' integer sub-block scales, per pair of sub-blocks, per row, 2 bytes
   (the int16 pairs `vpmaddwd` takes); Q4_K/Q5_K's mins the same way.

Memory: exactly the GGUF bytes for the 32-element types and Q6_K; Q4_K and Q5_K keep their
12 bytes of packed 6-bit scales and mins as 16 bytes (148 and 180 bytes per 256 weights
against 144 and 176, +2.8% and +2.3%), since unpacking them is not worth doing per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from rbees_workerd.kernels.cpu.quant_pack import Fields

Q = GGMLQuantizationType
TILE_ROWS = 8  # rows per 256-bit vector of int32 sums


@dataclass(frozen=True)
class Format:
    """How one weight type is tiled and scaled; byte offsets are within one tile's block."""

    qtype: Q
    block: int  # elements per block of fp16 scales (32, or 256 for K-quants)
    bits: int  # bits per value: 4, 5, 6, or 8 (Q8_0, int8)
    offset: int  # a value is q - offset (Q4_0: 8, Q5_0: 16, Q6_K: 32)
    has_m: bool  # a second fp16 per block: the min (Q4_1/Q5_1) or dmin (Q4_K/Q5_K)
    sub: int = 0  # elements per integer sub-block scale (Q4_K/Q5_K: 32, Q6_K: 16); 0: none

    @property
    def kquant(self) -> bool:
        """Activations in llama.cpp's Q8_K (per 256) rather than Q8_0/Q8_1 (per 32)."""
        return self.block == 256

    @property
    def subs(self) -> int:
        """32-element sub-blocks per block."""
        return self.block // 32

    @property
    def groups(self) -> int:
        """4-byte groups per row and sub-block."""
        return 8 if self.bits == 8 else 4

    @property
    def ebits(self) -> int:
        """Bits above the nibble."""
        return self.bits - 4 if 4 < self.bits < 8 else 0

    @property
    def pairs(self) -> int:
        """Pairs of integer sub-block scales per block."""
        return self.block // self.sub // 2 if self.sub else 0

    @property
    def ext_at(self) -> int:
        return self.subs * self.groups * 32

    @property
    def d_at(self) -> int:
        return self.ext_at + self.subs * self.ebits * 32

    @property
    def m_at(self) -> int:
        return self.d_at + 16

    @property
    def scales_at(self) -> int:
        return self.d_at + 16 * (1 + self.has_m)

    @property
    def mins_at(self) -> int:
        return self.scales_at + 16 * self.pairs

    @property
    def block_bytes(self) -> int:
        return self.mins_at + (16 * self.pairs if self.has_m and self.kquant else 0)

    @property
    def sums_per(self) -> int:
        """Elements per activation sum the kernel reads (Q6_K's scales cover 16, the rest 32)."""
        return self.sub or 32


FORMATS = {
    f.qtype: f
    for f in (
        Format(Q.Q4_0, 32, 4, 8, False),
        Format(Q.Q4_1, 32, 4, 0, True),
        Format(Q.Q5_0, 32, 5, 16, False),
        Format(Q.Q5_1, 32, 5, 0, True),
        Format(Q.Q8_0, 32, 8, 0, False),
        Format(Q.Q4_K, 256, 4, 0, True, 32),
        Format(Q.Q5_K, 256, 5, 0, True, 32),
        Format(Q.Q6_K, 256, 6, 32, False, 16),
    )
}


def _bit_positions(fmt: Format) -> list[tuple[int, int, int]]:
    """(half, group, bit p) of each 4-element run's extra bits: word p // 8, bit p % 8 (module docstring)."""
    return [(h, g, fmt.ebits * (g + 4 * h)) for h in range(2) for g in range(4)]


def to_tiles(fmt: Format, f: Fields) -> np.ndarray:
    """Fields of an [N, K] matrix -> uint8[ceil(N/8), K/block, block_bytes] (module docstring).

    Each field moves as units of its run per row (4 bytes of values or bit words, 2 of a scale or
    a pair), so the transposing copies move a quarter or half as many items as bytes."""
    n, k = f.values.shape
    nt, nb = -(-n // TILE_ROWS), k // fmt.block
    v = f.values.reshape(n, nb, fmt.subs, 32)
    if fmt.bits == 8:
        parts = [v.reshape(n, nb, fmt.subs, 8, 4)]
    else:
        parts = [((v[..., :16] & 0x0F) | ((v[..., 16:] & 0x0F) << 4)).reshape(n, nb, fmt.subs, 4, 4)]
    if fmt.ebits:
        ext = (v >> 4).reshape(n, nb, fmt.subs, 2, 4, 4)  # [.., half, group, i]
        words = np.zeros((n, nb, fmt.subs, fmt.ebits, 4), np.uint8)
        for h, g, p in _bit_positions(fmt):
            words[:, :, :, p // 8] |= ext[:, :, :, h, g] << (p % 8)
        parts.append(words)
    parts += [half.reshape(n, nb, 1).view(np.uint8).reshape(n, nb, 1, 2) for half in (f.d, f.m) if half is not None]
    parts += [ints.reshape(n, nb, fmt.pairs, 2) for ints in (f.scales, f.mins) if ints is not None]
    tiles = np.empty((nt, nb, fmt.block_bytes), np.uint8)
    at = 0
    for part in parts:  # [N, nb, *lead, width]: rows of `width` bytes -> [nt, nb, *lead, TILE_ROWS] units
        *lead, width = part.shape[2:]
        units = np.ascontiguousarray(part).view(f"<u{width}")[..., 0]
        size = units[0].size * TILE_ROWS * width // nb
        if n < nt * TILE_ROWS:  # zero rows up to a whole tile
            units = np.concatenate([units, np.zeros((nt * TILE_ROWS - n, *units.shape[1:]), units.dtype)])
        dst = tiles[:, :, at : at + size].view(units.dtype).reshape(nt, nb, *lead, TILE_ROWS)
        np.moveaxis(dst, -1, 1)[...] = units.reshape(nt, TILE_ROWS, nb, *lead)
        at += size
    assert at == fmt.block_bytes
    return tiles


def rows_fields(fmt: Format, tiles: np.ndarray, ids: np.ndarray) -> Fields:
    """The fields of rows `ids` of a tiled matrix (the inverse of `to_tiles`, for a few rows)."""
    n, nb = len(ids), tiles.shape[1]
    blk = tiles[ids // TILE_ROWS]  # [n, nb, block_bytes]

    def field(at: int, end: int, shape: tuple[int, ...], dtype: type = np.uint8) -> np.ndarray:
        """blk[:, :, at:end] as [n, nb, *shape, TILE_ROWS, last] -> [n, nb, *shape, last] of this row."""
        a = np.ascontiguousarray(blk[:, :, at:end]).view(dtype).reshape(n, nb, *shape, TILE_ROWS, -1)
        return np.moveaxis(a, -2, 1)[np.arange(n), ids % TILE_ROWS]

    if fmt.bits == 8:
        v = field(0, fmt.ext_at, (fmt.subs, 8)).reshape(n, nb, fmt.subs, 32)
    else:
        nib = field(0, fmt.ext_at, (fmt.subs, 4)).reshape(n, nb, fmt.subs, 16)
        v = np.concatenate([nib & 0x0F, nib >> 4], axis=-1)
    if fmt.ebits:
        words = field(fmt.ext_at, fmt.d_at, (fmt.subs, fmt.ebits))
        v = v.reshape(n, nb, fmt.subs, 2, 4, 4)
        for h, g, p in _bit_positions(fmt):
            v[:, :, :, h, g] |= ((words[:, :, :, p // 8] >> (p % 8)) & ((1 << fmt.ebits) - 1)) << 4
    values = np.ascontiguousarray(v).reshape(n, -1)
    ints = np.int8 if fmt.qtype == Q.Q6_K else np.uint8
    pairs = (fmt.pairs,)
    return Fields(
        values,
        field(fmt.d_at, fmt.d_at + 16, (), np.float16)[..., 0],
        field(fmt.m_at, fmt.m_at + 16, (), np.float16)[..., 0] if fmt.has_m else None,
        field(fmt.scales_at, fmt.mins_at, pairs, ints).reshape(n, nb, -1) if fmt.sub else None,
        field(fmt.mins_at, fmt.block_bytes, pairs).reshape(n, nb, -1) if fmt.sub and fmt.has_m else None,
    )


def dequantize(fmt: Format, f: Fields) -> np.ndarray:
    """float32[n, K] of these fields, computed as ggml's dequantize_row_* computes it."""
    n, k = f.values.shape
    nb = k // fmt.block
    q = (f.values.view(np.int8) if fmt.bits == 8 else f.values).astype(np.float32) - np.float32(fmt.offset)
    d = f.d.astype(np.float32)[..., None]  # [n, nb, 1]
    if fmt.sub:
        q = q.reshape(n, nb, -1, fmt.sub)
        out = (d * f.scales)[..., None] * q
        if f.mins is not None:
            out -= (f.m.astype(np.float32)[..., None] * f.mins)[..., None]
    else:
        q = q.reshape(n, nb, fmt.block)
        out = d * q
        if f.m is not None:
            out += f.m.astype(np.float32)[..., None]
    return out.reshape(n, k)
