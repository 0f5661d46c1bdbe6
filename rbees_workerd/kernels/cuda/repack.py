"""GGUF weight blocks into the VRAM layout of `formats`, on the device.

The raw bytes of a matrix are copied to the GPU as the file holds them (one read of its pages,
no host copy kept), and `repack_kernel` rearranges them there, a thread per group of 32: the
values stay the GGUF's bit for bit, the scales keep their width (see `formats`).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda, uint32

from rbees_workerd.kernels.cuda.device import DEVICE, JIT
from rbees_workerd.kernels.cuda.formats import (
    KQUANTS,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    QUANTIZED,
    WORDS,
    fifth_bit,
    fifth_pos,
    six_pos,
)  # fmt: skip

THREADS = 128
# bytes of one GGUF block and the groups of 32 it holds
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34, Q4_K: 144, Q5_K: 176, Q6_K: 210}


def scale_dtype(qt: int) -> type:
    """The element type of a type's per-group scales (gs)."""
    return np.uint32 if qt in (Q4_1, Q5_1) else np.uint16


def super_dtype(qt: int) -> type:
    """The element type of a type's per-256 scales (sb): Q6_K's fp16 d, Q4_K/Q5_K's d and dmin."""
    return np.uint16 if qt == Q6_K else np.uint32


def shapes(qt: int, n: int, k: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The shapes of words, gs and sb of an [n, k] matrix of type qt (1x1 where it has none)."""
    g = k // 32
    words = (n, g * WORDS[qt])
    if qt not in QUANTIZED:
        return words, (1, 1), (1, 1)
    return words, (n, g), ((n, g // 8) if qt in KQUANTS else (1, 1))


@cuda.jit(**DEVICE)
def _u16(raw, r, o):
    return uint32(uint32(raw[r, o]) | (uint32(raw[r, o + 1]) << 8))


@cuda.jit(**DEVICE)
def _u32(raw, r, o):
    return uint32(_u16(raw, r, o) | (_u16(raw, r, o + 2) << 16))


@cuda.jit(**DEVICE)
def _value(qt, raw, r, o, j, i):
    """Element i (0..31) of group j of the GGUF block at byte o of row r, without its fifth or sixth bits
    for the nibble types (Q6_K: with them)."""
    if qt == Q8_0:
        return uint32(raw[r, o + 2 + i])
    if qt in (Q4_K, Q5_K):
        at = o + (16 if qt == Q4_K else 48) + 32 * (j >> 1) + i
        return uint32((uint32(raw[r, at]) >> (4 * (j & 1))) & 15)
    if qt == Q6_K:
        sub = j & 3
        half = j >> 2
        low = uint32((uint32(raw[r, o + 64 * half + 32 * (sub & 1) + i]) >> (4 * (sub >> 1))) & 15)
        return uint32(low | (((uint32(raw[r, o + 128 + 32 * half + i]) >> (2 * sub)) & 3) << 4))
    at = o + (2 if qt == Q4_0 else (4 if qt == Q4_1 else (6 if qt == Q5_0 else 8)))  # Q5_1: 8
    return uint32((uint32(raw[r, at + (i & 15)]) >> (4 * (i >> 4))) & 15)


@cuda.jit(**DEVICE)
def _fifth(qt, raw, r, o, j, i):
    """Bit 4 of element i of group j (the Q5 types)."""
    if qt == Q5_K:
        return uint32((uint32(raw[r, o + 16 + i]) >> j) & 1)
    return uint32((_u32(raw, r, o + (2 if qt == Q5_0 else 4)) >> i) & 1)


@cuda.jit(**DEVICE)
def _scales(qt, raw, r, o, j):
    """(gs, sb) of group j of the block at byte o: see formats."""
    if qt in (Q4_1, Q5_1):
        return _u32(raw, r, o), uint32(0)
    if qt in (Q4_K, Q5_K):
        if j < 4:
            d = uint32(uint32(raw[r, o + 4 + j]) & 63)
            m = uint32(uint32(raw[r, o + 8 + j]) & 63)
        else:
            d = uint32((uint32(raw[r, o + 8 + j]) & 15) | ((uint32(raw[r, o + j]) >> 6) << 4))
            m = uint32((uint32(raw[r, o + 8 + j]) >> 4) | ((uint32(raw[r, o + 4 + j]) >> 6) << 4))
        return uint32(d | (m << 8)), _u32(raw, r, o)
    if qt == Q6_K:
        return _u16(raw, r, o + 192 + 2 * j), _u16(raw, r, o + 208)
    return _u16(raw, r, o), uint32(0)


@functools.cache
def repack_kernel(qt: int):  # noqa: ANN201
    """The repacking of one quantized type: raw uint8[N, row bytes] -> words, gs, sb; a thread per group."""
    per_block = 8 if qt in KQUANTS else 1
    size = BLOCK_BYTES[qt]
    n_words = WORDS[qt]

    @cuda.jit(**JIT)
    def kernel(raw, words, gs, sb):
        i = cuda.grid(1)
        groups = words.shape[1] // n_words
        if i >= raw.shape[0] * groups:
            return
        r = i // groups
        g = i % groups
        j = g % per_block
        o = (g // per_block) * size
        base = g * n_words
        if qt == Q8_0:
            for w in range(8):
                words[r, base + w] = _u32(raw, r, o + 2 + 4 * w)
        else:
            head = 1 if fifth_bit(qt) else 0
            high = uint32(0)
            six_lo = uint32(0)
            six_hi = uint32(0)
            for w in range(4):  # NIB4 word w: bytes 4w .. 4w + 3, each elements e and e + 16
                word = uint32(0)
                for b in range(4):
                    e = 4 * w + b
                    lo = _value(qt, raw, r, o, j, e)
                    hi = _value(qt, raw, r, o, j, e + 16)
                    word |= uint32(((lo & 15) | ((hi & 15) << 4)) << (8 * b))
                    if qt == Q6_K:
                        six_lo |= uint32((lo >> 4) << six_pos(e))
                        six_hi |= uint32((hi >> 4) << six_pos(e))
                words[r, base + head + w] = word
            if head:
                for e in range(32):
                    high |= uint32(_fifth(qt, raw, r, o, j, e) << fifth_pos(e))
                words[r, base] = high
            if qt == Q6_K:
                words[r, base + 4] = six_lo
                words[r, base + 5] = six_hi
        s, b = _scales(qt, raw, r, o, j)
        gs[r, g] = s
        if per_block == 8 and j == 0:
            sb[r, g // 8] = b

    return kernel


def dense_words(raw: np.ndarray) -> np.ndarray:
    """F32, F16 and BF16 rows (uint8[N, row bytes]) as uint32 words: the raw bits, as the device keeps them."""
    return np.ascontiguousarray(raw).view(np.uint32)
