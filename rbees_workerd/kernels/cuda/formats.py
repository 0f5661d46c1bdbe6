"""Weight formats in VRAM and the rounded inputs the integer products read, as device functions.

Every product kernel is compiled for one GGML weight type `qt` (a constant of its closure), so the
branches below on `qt` fold away. A matrix [N, K] is kept as groups of 32 consecutive elements of
a row: `words` (uint32[N, groups * WORDS]) hold the quantized values, bit for bit the GGUF ones,
and `gs` / `sb` their scales, no wider than the GGUF keeps them (VRAM = the file's bytes, but
Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins per 256, which take 16 here):

- NIB4 words (Q4_0, Q4_1, Q4_K): element e < 16 in the low nibble of byte e, e >= 16 in the high
  nibble of byte e - 16 (the GGUF's own order for the 32-blocks).
- NIB5 (Q5_0, Q5_1, Q5_K): word 0 holds bit 4 of element e at bit `fifth_pos(e)`, then NIB4's words.
- Q6 (Q6_K): NIB4's words, then bits 4-5 of element e at bits `six_pos(e % 16)` of word 4 + e // 16.
  Both put the high bits of an item's four elements at the same place in each byte, so that an item's
  high bits are two or three instructions away from its values' (a shift and a mask).
- Q8 (Q8_0): the int8 values in order. F16, BF16 (two halves a word, low first), F32: the raw bits.

Scales (`gs[N, groups]`, and for K-quants `sb[N, groups / 8]` per 256 elements):
- Q4_0, Q5_0, Q8_0: gs = fp16 d (uint16); w = (q + off) * d, off -8 / -16 / 0.
- Q4_1, Q5_1: gs = fp16 d | fp16 m << 16 (uint32); w = q * d + m.
- Q4_K, Q5_K: gs = 6-bit scale | 6-bit min << 8 (uint16), sb = fp16 d | fp16 dmin << 16 (uint32);
  w = q * (d * scale) - dmin * min.
- Q6_K: gs = int8 scale of elements 0-15 | of 16-31 << 8 (uint16), sb = fp16 d; w = (q - 32) * d * scale.
- F16, BF16, F32: none (1x1 dummies).

A group is read as four items of 8 weights: item q is elements 4q .. 4q + 3 and 16 + 4q .. 16 + 4q + 3,
one NIB4 word. The integer products round their input like llama.cpp's CUDA backend rounds it
(int8 blocks of 32, `rounding`) and take dp4a / mma products of an item's two words of four int8
values (`group_item`) with the input's, then apply the scales in float.

The device functions test the type with chains of `==`: `qt in (...)` compiles to a loop over the tuple
that the compiler keeps, even for a constant qt (it had made stage_q8 a third of vec_kernel's code).
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as Q
from numba import cuda, float32, int32, uint32

from rbees_workerd.kernels.cuda.device import (
    DEVICE,
    f32_from_bits,
    fp16_round,
    half_to_f32,
    load1,
    load2,
    load4,
    quad_max,
    quad_sum,
    rint,
    silu_mul,
    warp_max,
    warp_sum,
)  # fmt: skip

F32, F16, BF16 = int(Q.F32), int(Q.F16), int(Q.BF16)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(Q.Q4_0), int(Q.Q4_1), int(Q.Q5_0), int(Q.Q5_1), int(Q.Q8_0)
Q4_K, Q5_K, Q6_K = int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K)
QUANTIZED = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
SUPPORTED = (F32, F16, BF16, *QUANTIZED)
KQUANTS = (Q4_K, Q5_K, Q6_K)  # (256-element super-blocks)
# words per group of 32 elements
WORDS = {Q4_0: 4, Q4_1: 4, Q4_K: 4, Q5_0: 5, Q5_1: 5, Q5_K: 5, Q6_K: 6, Q8_0: 8, F16: 16, BF16: 16, F32: 32}
OFFSET = {Q4_0: -8.0, Q5_0: -16.0}  # added to the integer value before scaling (0 elsewhere)
Q6_OFFSET_WORD = -522133280  # 0xE0E0E0E0: four int8 -32, whose dp4a with four inputs is -32 times their sum
# how the products round their input for each weight type (llama.cpp's CUDA backend: int8 blocks of 32
# with the block sum for the types with mins; fp16 for F16 weights); the others keep float inputs
ROUND_NONE, ROUND_Q8_0, ROUND_Q8_1, ROUND_F16 = range(4)
ROUNDING = {Q4_0: ROUND_Q8_0, Q5_0: ROUND_Q8_0, Q8_0: ROUND_Q8_0, Q6_K: ROUND_Q8_0,
            Q4_1: ROUND_Q8_1, Q5_1: ROUND_Q8_1, Q4_K: ROUND_Q8_1, Q5_K: ROUND_Q8_1, F16: ROUND_F16}  # fmt: skip


def rounding(qt: int) -> int:
    return ROUNDING.get(qt, ROUND_NONE)


def integer(qt: int) -> bool:
    """Whether the products of this weight type are integer dot products over Q8-rounded inputs."""
    return rounding(qt) in (ROUND_Q8_0, ROUND_Q8_1)


@cuda.jit(**DEVICE)
def nibbles(qt):
    return qt == Q4_0 or qt == Q4_1 or qt == Q4_K or qt == Q5_0 or qt == Q5_1 or qt == Q5_K or qt == Q6_K


@cuda.jit(**DEVICE)
def fifth_bit(qt):
    return qt == Q5_0 or qt == Q5_1 or qt == Q5_K


@cuda.jit(**DEVICE)
def group_words(qt):
    """WORDS[qt] for the device code (which reads no dicts)."""
    if qt == Q4_0 or qt == Q4_1 or qt == Q4_K:
        return 4
    if fifth_bit(qt):
        return 5
    if qt == Q6_K:
        return 6
    if qt == Q8_0:
        return 8
    return 32 if qt == F32 else 16


@cuda.jit(**DEVICE)
def elem(qt, q, j):
    """Offset within its group of the j-th weight of item q."""
    if nibbles(qt):
        return 4 * q + j if j < 4 else 12 + 4 * q + j
    return 8 * q + j


@cuda.jit(**DEVICE)
def slot(qt, e):
    """Where element e of a group sits among the items: 8 * q + j with elem(qt, q, j) == e."""
    if nibbles(qt):
        return 8 * ((e % 16) // 4) + e % 4 + (4 if e >= 16 else 0)
    return e


@cuda.jit(**DEVICE)
def _sbyte(v):
    """The low byte of v as a signed integer (two instructions: a shift up and an arithmetic shift down)."""
    return int32(uint32(v) << uint32(24)) >> int32(24)


@cuda.jit(**DEVICE)
def load_scales(qt, gs, sb, r, g):
    """The raw scale fields of group g of row r: (its gs entry, its super-block's sb entry), as loaded
    (a kernel keeps them in registers while they are in flight; scales_of turns them into floats)."""
    r = uint32(r)
    g = uint32(g)
    if qt == Q4_K or qt == Q5_K or qt == Q6_K:
        return uint32(gs[r, g]), uint32(sb[r, g >> 3])
    if qt != F32 and qt != F16 and qt != BF16:
        return uint32(gs[r, g]), uint32(0)
    return uint32(0), uint32(0)


@cuda.jit(**DEVICE)
def scales_of(qt, gv, sv):
    """(scale of elements 0-15, scale of elements 16-31, min) of a group from its raw fields, in float32:
    exact products of the fp16 values and small integers the GGUF holds (as the CPU unpacks them)."""
    if qt == Q4_1 or qt == Q5_1:
        d = half_to_f32(gv & 0xFFFF)
        return d, d, half_to_f32(gv >> 16)
    if qt == Q4_0 or qt == Q5_0 or qt == Q8_0:
        d = half_to_f32(gv)
        return d, d, float32(0.0)
    if qt == Q4_K or qt == Q5_K:
        d = half_to_f32(sv & 0xFFFF) * float32(gv & 63)
        return d, d, -(half_to_f32(sv >> 16) * float32(gv >> 8))
    if qt == Q6_K:
        d = half_to_f32(sv)
        return d * float32(_sbyte(gv)), d * float32(_sbyte(gv >> 8)), float32(0.0)
    return float32(1.0), float32(1.0), float32(0.0)


@cuda.jit(**DEVICE)
def group_scales(qt, gs, sb, r, g):
    """scales_of group g of row r."""
    gv, sv = load_scales(qt, gs, sb, r, g)
    return scales_of(qt, gv, sv)


@cuda.jit(**DEVICE)
def decode(qt, words, gs, sb, off, row, g, q, wv, with_min):
    """Dequantize item q of group g of a row into wv[0:8] (the weights at elem(qt, q, j)).

    Without with_min the types with mins leave them out (added once per group instead).
    """
    row = uint32(row)
    if nibbles(qt):
        d_lo, d_hi, mn = group_scales(qt, gs, sb, row, g)
        if not with_min:
            mn = float32(0.0)
        base = g * group_words(qt) + (1 if fifth_bit(qt) else 0)
        w = words[row, uint32(base + q)]
        hb = words[row, uint32(g * 5)] if fifth_bit(qt) else uint32(0)
        lo6 = words[row, uint32(g * 6 + 4)] if qt == Q6_K else uint32(0)
        hi6 = words[row, uint32(g * 6 + 5)] if qt == Q6_K else uint32(0)
        for j in range(8):
            sh = 8 * j if j < 4 else 8 * (j - 4) + 4
            v = (w >> sh) & 15
            if fifth_bit(qt):
                v |= ((hb >> fifth_pos(4 * q + j if j < 4 else 12 + 4 * q + j)) & 1) << 4
            if qt == Q6_K:
                six = lo6 if j < 4 else hi6
                v |= ((six >> six_pos(4 * q + j % 4)) & 3) << 4
                wv[j] = float32(float32(v) - 32.0) * (d_lo if j < 4 else d_hi)
            else:
                wv[j] = (float32(v) + off) * (d_lo if j < 4 else d_hi) + mn
    elif qt == Q8_0:
        d = group_scales(qt, gs, sb, row, g)[0]
        for half in range(2):
            w = words[row, uint32(g * 8 + 2 * q + half)]
            for b in range(4):
                wv[4 * half + b] = float32(_sbyte(w >> (8 * b))) * d
    elif qt == F16 or qt == BF16:
        for i in range(4):
            w = words[row, uint32(g * 16 + 4 * q + i)]
            if qt == F16:
                wv[2 * i] = half_to_f32(w & 0xFFFF)
                wv[2 * i + 1] = half_to_f32(w >> 16)
            else:
                wv[2 * i] = f32_from_bits((w & 0xFFFF) << 16)
                wv[2 * i + 1] = f32_from_bits(w & 0xFFFF0000)
    else:  # F32
        for j in range(8):
            wv[j] = f32_from_bits(words[row, uint32(g * 32 + 8 * q + j)])


@cuda.jit(**DEVICE)
def fifth_pos(e):
    """The bit of NIB5's word 0 that holds bit 4 of element e: byte e % 4 (the element's place in its
    item), bit q of the byte's low half (e < 16, item q = e // 4) or of its high half."""
    return 8 * (e % 4) + 4 * (e // 16) + (e % 16) // 4


@cuda.jit(**DEVICE)
def six_pos(e):
    """The lowest of the two bits of a Q6 high word that hold bits 4-5 of its half's element e (0..15):
    byte e % 4, bits 2 q and 2 q + 1 for item q = e // 4."""
    return 8 * (e % 4) + 2 * (e // 4)


@cuda.jit(**DEVICE)
def signed_six(v):
    """Four bytes of 6-bit values 0..63 minus 32 each, as signed int8 bytes (no borrows between bytes)."""
    v ^= uint32(0x20202020)  # values >= 32 lose bit 5 (v - 32); values < 32 gain it ...
    t = v & uint32(0x20202020)
    return v | (t << 1) | (t << 2)  # ... and bits 6, 7 with it: v - 32 in two's complement


@cuda.jit(**DEVICE)
def unpack_item(qt, a, b, q):
    """Item q of a nibble type's group (its values' word a; NIB5's fifth-bits word b) as two words of four
    unsigned values each, in the order of stage_q8's input words (the item's elem(qt, q, 0 .. 3), then
    elem(qt, q, 4 .. 7)): the values before scaling (their offset or min is applied apart)."""
    lo = a & 0x0F0F0F0F
    hi = (a >> 4) & 0x0F0F0F0F
    if fifth_bit(qt):  # (fifth_pos: the item's bits at bit q of each byte's halves)
        lo |= ((b >> q) & 0x01010101) << 4
        hi |= (b >> q) & 0x10101010
    return uint32(lo), uint32(hi)


@cuda.jit(**DEVICE)
def six_values(a, b, c, q):
    """Q6 item q's values 0 .. 63, in unpack_item's order, from its values' word a and its group's high
    words b, c (six_pos: the item's bits at bits 2 q, 2 q + 1 of each byte)."""
    lo = (a & 0x0F0F0F0F) | (((b >> (2 * q)) & 0x03030303) << 4)
    hi = ((a >> 4) & 0x0F0F0F0F) | (((c >> (2 * q)) & 0x03030303) << 4)
    return uint32(lo), uint32(hi)


@cuda.jit(**DEVICE)
def load_group(qt, w, r, g, out, o, n):
    """The n = WORDS[qt] words of group g of row r into out[o : o + n], in the widest loads their alignment
    allows: one 16-byte load for four words (Q4_x), two for Q8_0, three 8-byte ones for Q6_K, single
    words for the NIB5 types (five words a group: no wider alignment)."""
    r = uint32(r)
    base = uint32(g) * uint32(n)
    if qt == Q6_K:
        out[o], out[o + 1] = load2(w, r, base)
        out[o + 2], out[o + 3] = load2(w, r, base + 2)
        out[o + 4], out[o + 5] = load2(w, r, base + 4)
    elif fifth_bit(qt):
        out[o] = load1(w, r, base)
        out[o + 1] = load1(w, r, base + 1)
        out[o + 2] = load1(w, r, base + 2)
        out[o + 3] = load1(w, r, base + 3)
        out[o + 4] = load1(w, r, base + 4)
    else:  # (no loops: their bounds would not be constants where the local arrays are promoted)
        out[o], out[o + 1], out[o + 2], out[o + 3] = load4(w, r, base)
        if qt == Q8_0:
            out[o + 4], out[o + 5], out[o + 6], out[o + 7] = load4(w, r, base + 4)


@cuda.jit(**DEVICE)
def group_item(qt, fw, at, q):
    """Item q of the group whose words load_group put at fw[at:], as two words of four values each in the
    order of stage_q8's input words (unpack_item): unsigned for the nibble types, Q8_0's signed ones, and for
    Q6_K the unsigned values 0 .. 63 (signed_six subtracts the 32, or Q6_OFFSET_WORD's dp4a with the input)."""
    if qt == Q6_K:
        return six_values(fw[at + q], fw[at + 4], fw[at + 5], q)
    if qt == Q8_0:
        return uint32(fw[at + 2 * q]), uint32(fw[at + 2 * q + 1])
    if fifth_bit(qt):
        return unpack_item(qt, fw[at + 1 + q], fw[at], q)
    return unpack_item(qt, fw[at + q], uint32(0), q)


@cuda.jit(**DEVICE)
def q8_scale(amax):
    """A 32-block's Q8 scale d = amax / 127 and the factor 127 / amax (0 for an all-zero block)."""
    return amax / float32(127.0), (float32(127.0) / amax if amax != 0 else float32(0.0))


@cuda.jit(**DEVICE)
def round_lane(v, rnd, scratch):
    """This lane's element of a warp's 32-block rounded like llama.cpp's activations, and the block's
    Q8_1 sum term; the arithmetic of the CPU's quantize_q8_row: d = amax / 127 kept as fp16,
    q = rint(v * (127 / amax)), the element q * d, the sum term fp16(d * sum(q))."""
    if rnd == ROUND_NONE:
        return v, float32(0.0)
    if rnd == ROUND_F16:
        return fp16_round(v), float32(0.0)
    d, inv = q8_scale(warp_max(abs(v), scratch))
    q = rint(v * inv)
    s = warp_sum(q, scratch) if rnd == ROUND_Q8_1 else float32(0.0)  # whole numbers below 2^24: exact
    return q * fp16_round(d), fp16_round(d * s)


@cuda.jit(**DEVICE)
def item_col(qt, it, j):
    """The column of stage_q8's item it's j-th input: elem(qt, it % 4, j) of its 32-block (shifts and masks:
    the compiler does not know that it is not negative)."""
    return uint32((it >> 2) * 32 + elem(qt, it & 3, j))


@cuda.jit(**DEVICE)
def fetch_norm(nw, qt, it, nwv):
    """The norm's weights of item it of stage_q8 into nwv."""
    for j in range(8):
        nwv[j] = nw[item_col(qt, it, j)]


@cuda.jit(**DEVICE)
def load_item(x, t, it, inv, norm, nw, nwv, write_h, hout, qt, wv, up, gated):
    """Item it's 8 inputs of token t (elem(qt, it % 4, 0 .. 7) of its 32-block) into wv, normalized where norm
    (nwv: the norm's weights of the thread's first item, fetched here for the others), or where gated the
    SwiGLU of x (the gate) and up; written to hout where write_h (gated: in place, each element by the
    thread that read it)."""
    g = it >> 2  # (shifts and masks: the compiler does not know that it is not negative)
    q = it & 3
    if norm and it != cuda.threadIdx.x:
        fetch_norm(nw, qt, it, nwv)
    for j in range(8):
        c = uint32(g * 32 + elem(qt, q, j))
        v = x[uint32(t), c]
        if gated:
            v = silu_mul(v, up[uint32(t), c])
        elif norm:
            v = v * inv * nwv[j]
        if write_h:
            hout[uint32(t), c] = v
        wv[j] = v


@cuda.jit(**DEVICE)
def stage_q8(x, t, items, inv, norm, nw, nwv, write_h, hout, qt, rnd, xw, xd, xs, scratch, wv, up, gated):
    """Token t's input (normalized where norm; load_item's SwiGLU of x and up where gated) rounded to Q8
    blocks, a thread per item, into xw/xd/xs.

    nwv holds the norm's weights of the thread's first item (fetch_norm), loaded before grid_ready where
    the kernel can. A thread loads its item's 8 inputs and rounds them with the 3 threads of the same
    32-block (a quad: two shuffles for the maximum, two for the sum), with round_lane's arithmetic; then
    it writes them four a word (item i's words 2i, 2i + 1), and the block's first item its scale and
    sum term: xs[g] is the Q8_1 term, or for Q8_0 the scale times the integer sum (which a weight
    type's offset multiplies). Every thread takes the same trips (the simulator's quads need it).
    items is x.shape[1] // 8 (a constant where the kernel is compiled for the width)."""
    for it in range(cuda.threadIdx.x, (items + 31) // 32 * 32, cuda.blockDim.x):
        g = it >> 2  # (shifts and masks: the compiler does not know that it is not negative)
        q = it & 3
        amax = float32(0.0)
        if it < items:  # (one branch for the item: the 8 loads go out together)
            load_item(x, t, it, inv, norm, nw, nwv, write_h, hout, qt, wv, up, gated)
            for j in range(8):
                amax = max(amax, abs(wv[j]))
        else:
            for j in range(8):
                wv[j] = float32(0.0)
        d, inv_d = q8_scale(quad_max(amax, scratch))
        qs = float32(0.0)
        lo = uint32(0)
        hi = uint32(0)
        for j in range(8):
            qv = rint(wv[j] * inv_d)
            qs += qv
            byte = uint32(int32(qv) & 255)
            if j < 4:
                lo |= byte << uint32(8 * j)
            else:
                hi |= byte << uint32(8 * (j - 4))
        s = quad_sum(qs, scratch)  # whole numbers below 2^24: exact
        if it < items:
            xw[uint32(2 * it)] = int32(lo)
            xw[uint32(2 * it + 1)] = int32(hi)
            if q == 0:
                xd[uint32(g)] = fp16_round(d)
                xs[uint32(g)] = fp16_round(d * s) if rnd == ROUND_Q8_1 else fp16_round(d) * s

