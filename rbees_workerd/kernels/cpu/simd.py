"""Integer dot products for every quantized type of the Q4_K_M family: what llama.cpp's x86 kernels do.

LLVM does not derive `vpmaddubsw` or `vpdpbusd` (products of unsigned and signed bytes, summed
in pairs or fours) from any loop Numba can express, and the float formulation of
`quant_kernels` costs ~4x more instructions per weight. So the inner loop here is LLVM IR
written with llvmlite inside a Numba `@intrinsic`: the kernels stay Numba functions (cached,
parallel with `prange`) and only the SIMD body is spelled out, by one generator for all
types: a `quant_tiles.Format` says where a tile's bytes are and how a block is scaled.

Levels, chosen at import from the host's features: AVX2 (`vpmaddubsw` into int16 lanes, then
`vpmaddwd` into int32), or VNNI (`vpdpbusd` straight into int32; AVX-512 VNNI with VL, or
AVX-VNNI). RBEES_CPU_SIMD=avx2 keeps AVX2 on a VNNI host and RBEES_CPU_SIMD=0 the portable
float kernels of `quant_kernels`, so each path stays testable on one machine.

Arithmetic, as llama.cpp's (ggml-cpu/arch/x86/quants.c): the activations are rounded to int8
(`quant_act`: Q8_0/Q8_1 per 32 for the 32-element types, Q8_K per 256 for the K-quants); the
sums of products are exact integers per block, including the K-quants' integer sub-block
scales and mins and the types' offsets (q - 8, q - 16, q - 32: subtracted as offset x the
exact sum of the block's int8 activations); then one float multiply per block by the fp16
weight scale times the activation scale (and Q4_1/Q5_1's m x Q8_1's fp16 sum, Q4_K/Q5_K's
dmin x the integer min sum). Results equal llama.cpp's up to float32 summation order.
"""

from __future__ import annotations

import functools
import os
import platform
import types as pytypes
import zlib
from collections.abc import Callable

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rbees_workerd.kernels.cpu.quant_act import quantize_q8_rows, quantize_q8k_rows
from rbees_workerd.kernels.cpu.quant_tiles import TILE_ROWS, Format

PORTABLE, AVX2, VNNI = 0, 1, 2
LEVEL_NAMES = {PORTABLE: "portable", AVX2: "avx2", VNNI: "vnni"}
TILE_TOKENS = 4  # tokens per pass over a tile's weights (their accumulators and the operands fit the registers)


def host_level() -> int:
    """The fastest level this CPU runs (x86-64 with AVX2, FMA and F16C at least, else PORTABLE), or
    that Numba compiles for where NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name another target."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return PORTABLE
    if numba.config.CPU_FEATURES:
        features = set(numba.config.CPU_FEATURES.split(","))
    elif numba.config.CPU_NAME not in (None, "host"):
        return PORTABLE  # a named CPU without its features: do not guess them
    else:
        features = set(llvm.get_host_cpu_features().flatten().split(","))
    if not {"+avx2", "+fma", "+f16c"} <= features:
        return PORTABLE
    if {"+avx512vnni", "+avx512vl"} <= features or "+avxvnni" in features:
        return VNNI
    return AVX2


HOST_LEVEL = host_level()
LEVEL = {"0": PORTABLE, "avx2": min(AVX2, HOST_LEVEL)}.get(os.environ.get("RBEES_CPU_SIMD", ""), HOST_LEVEL)

_i8, _i16, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_P8 = _i8.as_pointer()
_B16 = ir.VectorType(_i8, 16)
_B32 = ir.VectorType(_i8, 32)
_W16 = ir.VectorType(_i16, 16)
_D8 = ir.VectorType(_i32, 8)
_F8 = ir.VectorType(_f32, 8)
_H8 = ir.VectorType(ir.HalfType(), 8)


def _const(v: int) -> ir.Constant:
    return ir.Constant(_i64, v)


def _splat_const(vec: ir.VectorType, v: int) -> ir.Constant:
    return ir.Constant(vec, [v] * vec.count)


def _int16_flush(fmt: Format) -> int:
    """AVX2: `vpmaddubsw` results an int16 lane can add up before it overflows (each is at most
    2 * 127 * the largest unsigned weight byte: 2^bits - 1, or 128 for Q8_0's |w|)."""
    umax = 128 if fmt.bits == 8 else (1 << fmt.bits) - 1
    return 32767 // (2 * 127 * umax)


class _Sum:
    """One token's exact int32 sum over a part of a sub-block, times `mul` (an integer scale or 1).

    VNNI: a `vpdpbusd` chain, then a multiply. AVX2: `vpmaddubsw` into int16 lanes, folded into
    int32 by `vpmaddwd` against `mul` (a scale in both halves of each row's lane pair) whenever
    another fold could overflow int16."""

    def __init__(self, gen: _Gen, mul: ir.Value | None) -> None:
        self.gen, self.mul = gen, mul
        self.i16: ir.Value | None = None
        self.i32: ir.Value | None = None
        self.count = 0

    def add(self, u: ir.Value, x: ir.Value) -> None:
        b = self.gen.b
        if self.gen.level == VNNI:
            acc = _splat_const(_D8, 0) if self.i32 is None else self.i32
            self.i32 = b.call(self.gen.dpbusd, [acc, b.bitcast(u, _D8), b.bitcast(x, _D8)])
            return
        p = b.call(self.gen.maddubs, [u, x])
        self.i16 = p if self.i16 is None else b.add(self.i16, p)
        self.count += 1
        if self.count == self.gen.flush:
            self._fold()

    def _fold(self) -> None:
        b = self.gen.b
        v = b.call(self.gen.maddwd, [self.i16, self.mul if self.mul is not None else _splat_const(_W16, 1)])
        self.i32 = v if self.i32 is None else b.add(self.i32, v)
        self.i16, self.count = None, 0

    def total(self) -> ir.Value:
        if self.i16 is not None:
            self._fold()
        if self.gen.level == VNNI and self.mul is not None:
            return self.gen.b.mul(self.i32, self.mul)
        return self.i32


class _Gen:
    """The IR of one tile call (see `_tile_kernel`): addresses, the block loop's body, the stores."""

    def __init__(self, context, builder, signature, args, fmt: Format, level: int, tokens: int) -> None:  # noqa: ANN001
        self.b, self.fmt, self.level, self.tokens = builder, fmt, level, tokens
        self.flush = _int16_flush(fmt)
        arrays = [
            context.make_array(ty)(context, builder, v) if isinstance(ty, types.Array) else None
            for ty, v in zip(signature.args, args, strict=True)
        ]
        w, _, q8, dq, sq, sums, _, out = arrays
        tile, t0 = args[1], args[6]

        def row(a, r: ir.Value) -> ir.Value:  # noqa: ANN001 - the i8* of a[r]
            stride = cgutils.unpack_tuple(builder, a.strides)[0]
            return builder.gep(builder.bitcast(a.data, _P8), [builder.mul(r, stride)])

        self.nb = cgutils.unpack_tuple(builder, w.shape)[1]
        self.w = row(w, tile)
        rows = [builder.add(t0, _const(t)) for t in range(tokens)]
        self.x, self.dq, self.sq, self.sums = ([row(a, r) for r in rows] for a in (q8, dq, sq, sums))
        self.out = builder.bitcast(out.data, _F8.as_pointer())

        def declare(name: str, ret: ir.Type, argtys: list[ir.Type]) -> ir.Function:
            try:
                return builder.module.get_global(name)
            except KeyError:
                return ir.Function(builder.module, ir.FunctionType(ret, argtys), name=name)

        self.maddubs = declare("llvm.x86.avx2.pmadd.ub.sw", _W16, [_B32, _B32])
        self.maddwd = declare("llvm.x86.avx2.pmadd.wd", _D8, [_W16, _W16])
        self.psign = declare("llvm.x86.avx2.psign.b", _B32, [_B32, _B32])
        if level == VNNI:
            self.dpbusd = declare("llvm.x86.avx512.vpdpbusd.256", _D8, [_D8, _D8, _D8])
        with builder.goto_entry_block():
            self.acc = [builder.alloca(_F8) for _ in range(tokens)]  # promoted to registers by LLVM
        for a in self.acc:
            builder.store(ir.Constant(_F8, [0.0] * 8), a)

    # ---- loads
    def load(self, base: ir.Value, offset: ir.Value | int, ty: ir.Type) -> ir.Value:
        off = _const(offset) if isinstance(offset, int) else offset
        return self.b.load(self.b.bitcast(self.b.gep(base, [off]), ty.as_pointer()), align=1)

    def splat(self, value: ir.Value, vec: ir.VectorType) -> ir.Value:
        one = self.b.insert_element(ir.Constant(vec, None), value, ir.Constant(_i32, 0))
        return self.b.shuffle_vector(one, ir.Constant(vec, None), ir.Constant(_D8, [0] * vec.count))

    def broadcast(self, base: ir.Value, offset: ir.Value, ty: ir.VectorType = _B32) -> ir.Value:
        """4 bytes at base + offset in every int32 lane."""
        return self.b.bitcast(self.splat(self.load(base, offset, _i32), _D8), ty)

    def pairs(self, wb: ir.Value, at: int, signed: bool) -> ir.Value:
        """The 16 bytes at `at` (8 rows x a pair of integers) as int16 pairs, one row per int32 lane."""
        v = self.load(wb, at, _B16)
        return self.b.sext(v, _W16) if signed else self.b.zext(v, _W16)

    # ---- a block
    def decode(self, wb: ir.Value, s: int, g: int, words: list[ir.Value]) -> list[tuple[int, ir.Value, int, ir.Value]]:
        """Group g of sub-block s: (part, unsigned weight bytes, activation offset in the block, the
        bytes whose signs the activations take or None) for each 4 elements a row of it holds."""
        b, fmt = self.b, self.fmt
        wv = self.load(wb, (s * fmt.groups + g) * 32, _B32)
        at = 32 * s + 4 * g
        if fmt.bits == 8:
            if self.level == VNNI:  # w + 128, unsigned; the block's sum takes 128 * sum(x) back
                return [(0, b.xor(wv, _splat_const(_B32, 0x80)), at, None)]
            return [(0, b.call(self.psign, [wv, wv]), at, wv)]  # |w| times x with w's sign
        halves = [b.and_(wv, _splat_const(_B32, 0x0F)), b.lshr(wv, _splat_const(_B32, 4))]
        top = ((1 << fmt.ebits) - 1) << 4
        for h in range(2 if fmt.ebits else 0):
            p = fmt.ebits * (g + 4 * h)  # where quant_tiles put these bits (its module docstring)
            word, shift = words[p // 8], 4 - p % 8
            if shift > 0:
                word = b.shl(word, _splat_const(_B32, shift))
            elif shift < 0:
                word = b.lshr(word, _splat_const(_B32, -shift))
            halves[h] = b.or_(halves[h], b.and_(word, _splat_const(_B32, top)))
        second = 1 if fmt.sub == 16 else 0  # Q6_K: the halves have scales of their own
        return [(0, halves[0], at, None), (second, halves[1], at + 16, None)]

    def scale_muls(self, wb: ir.Value, s: int) -> list[ir.Value | None]:
        """Each part's integer scale for sub-block s: int32 lanes (VNNI) or int16 pairs (AVX2)."""
        fmt = self.fmt
        if not fmt.sub:
            return [None]
        js = [s] if fmt.sub == 32 else [2 * s, 2 * s + 1]  # indices of the parts' scales
        pv = self.pairs(wb, fmt.scales_at + 16 * (js[0] // 2), signed=fmt.sub == 16)
        muls = []
        for j in js:
            k = j % 2
            if self.level == VNNI:
                v = self.b.bitcast(pv, _D8)
                if k == 0:
                    v = self.b.shl(v, _splat_const(_D8, 16))
                muls.append(self.b.ashr(v, _splat_const(_D8, 16)))
            else:
                idx = ir.Constant(ir.VectorType(_i32, 16), [2 * (i // 2) + k for i in range(16)])
                muls.append(self.b.shuffle_vector(pv, ir.Constant(_W16, None), idx))
        return muls

    def block(self, bi: ir.Value) -> None:
        """One block of the loop: every token's exact integer sums, then its float scaling."""
        b, fmt, tokens = self.b, self.fmt, self.tokens
        wb = b.gep(self.w, [b.mul(bi, _const(fmt.block_bytes))])
        xb = b.mul(bi, _const(fmt.block))
        sumi: list[ir.Value | None] = [None] * tokens
        for s in range(fmt.subs):
            words = [self.load(wb, fmt.ext_at + (s * fmt.ebits + k) * 32, _B32) for k in range(fmt.ebits)]
            muls = self.scale_muls(wb, s)
            acc = [[_Sum(self, m) for m in muls] for _ in range(tokens)]
            for g in range(fmt.groups):
                for part, u, at, sign in self.decode(wb, s, g, words):
                    for t in range(tokens):
                        x = self.broadcast(self.x[t], b.add(xb, _const(at)))
                        acc[t][part].add(u, b.call(self.psign, [x, sign]) if sign is not None else x)
            for t in range(tokens):
                for a in acc[t]:
                    v = a.total()
                    sumi[t] = v if sumi[t] is None else b.add(sumi[t], v)
        mins = self.offsets(wb, bi, sumi)
        dv = b.fpext(self.load(wb, fmt.d_at, _H8), _F8)
        mv = b.fpext(self.load(wb, fmt.m_at, _H8), _F8) if fmt.has_m else None
        for t in range(tokens):
            scale = self.splat(self.load(self.dq[t], b.mul(bi, _const(4)), _f32), _F8)
            term = b.fmul(b.fmul(dv, scale), b.sitofp(sumi[t], _F8))
            if fmt.has_m and fmt.kquant:  # - dmin * d8 * sum(min * x) (llama.cpp's `dmin` term)
                term = b.fsub(term, b.fmul(b.fmul(mv, scale), b.sitofp(mins[t], _F8)))
            elif fmt.has_m:  # + m * Q8_1's fp16 d8 * sum(x)
                s8 = self.splat(self.load(self.sq[t], b.mul(bi, _const(4)), _f32), _F8)
                term = b.fadd(term, b.fmul(mv, s8))
            b.store(b.fadd(b.load(self.acc[t]), term), self.acc[t])

    def offsets(self, wb: ir.Value, bi: ir.Value, sumi: list[ir.Value]) -> list[ir.Value]:
        """Subtract the offsets' integer terms from `sumi` in place; returns Q4_K/Q5_K's min sums.

        32-element types: offset * sum(x) per block (Q8_0 on VNNI took w + 128). K-quants: the
        sums of coefficient * sum(x) over sub-blocks, `vpmaddwd` of int16 pairs: the mins
        (kept apart, scaled by dmin in float) or Q6_K's scales (times its offset 32)."""
        b, fmt = self.b, self.fmt
        if not fmt.kquant:
            off = 128 if fmt.bits == 8 and self.level == VNNI else fmt.offset
            if off:
                for t in range(self.tokens):
                    xs = b.sext(self.load(self.sums[t], b.mul(bi, _const(2)), _i16), _i32)
                    sumi[t] = b.sub(sumi[t], self.splat(b.mul(xs, ir.Constant(_i32, off)), _D8))
            return []
        coefs = [self.pairs(wb, (fmt.mins_at if fmt.has_m else fmt.scales_at) + 16 * p, signed=not fmt.has_m)
                 for p in range(fmt.pairs)]  # fmt: skip
        out = []
        for t in range(self.tokens):
            total = None
            for p, c in enumerate(coefs):
                at = b.mul(b.add(b.mul(bi, _const(2 * fmt.pairs)), _const(2 * p)), _const(2))
                v = b.call(self.maddwd, [c, self.broadcast(self.sums[t], at, _W16)])
                total = v if total is None else b.add(total, v)
            if fmt.has_m:
                out.append(total)
            else:
                sumi[t] = b.sub(sumi[t], b.mul(total, _splat_const(_D8, fmt.offset)))
        return out

    def store(self) -> None:
        for t, a in enumerate(self.acc):
            self.b.store(self.b.load(a), self.b.gep(self.out, [_const(t)]), align=4)


def _tile_kernel(fmt: Format, level: int, tokens: int):  # noqa: ANN202
    """An intrinsic: out[0:tokens, 0:8] = one tile of rows times activation rows t0..t0+tokens.

    Arguments: tiles (uint8[tiles, nb, block_bytes]), the tile's index, the rounded activations
    (int8 q8[T, K], float32 scales[T, nb], float32 Q8_1 sums[T, nb] or [T, 0], int16 sums[T, *]),
    t0, out (float32[tokens or more, 8]). Arrays, not raw addresses: Numba keeps an array
    alive only while it is used as one.
    """

    @intrinsic
    def tile(typingctx, w, tile, q8, dq, sq, sums, t0, out):  # noqa: ANN001, ANN202, ARG001
        sig = types.void(w, types.intp, q8, dq, sq, sums, types.intp, out)

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            gen = _Gen(context, builder, signature, args, fmt, level, tokens)
            with cgutils.for_range(builder, gen.nb) as loop:
                gen.block(loop.index)
            gen.store()
            return context.get_dummy_value()

        return sig, codegen

    return tile


_JIT = {"cache": True, "nogil": True, "fastmath": True}
# What `_matmul` calls; each kernel is a copy of it whose globals bind these to its own type and level
# (`matmul_kernel`). Globals, not a closure: Numba's cache keys a closure by its pickled cells, and
# an intrinsic pickles differently in every process, so closures would compile at every start.
_ONE = _MANY = None  # the 1-token and TILE_TOKENS-token tile kernels
_KQUANT, _SUMS_PER = False, 32  # activations in Q8_K (else Q8_0/Q8_1), elements per activation sum


def _matmul(x, tiles, tasks, out):  # noqa: ANN001, ANN202
    if _KQUANT:
        q8, dq, sq, sums = quantize_q8k_rows(x, _SUMS_PER)
    else:
        q8, dq, sq, sums = quantize_q8_rows(x)
    T = x.shape[0]
    N = out.shape[1]
    ntiles = tiles.shape[0]
    ntask = max(1, min(tasks, ntiles))
    for task in prange(ntask):
        part = np.empty((TILE_TOKENS, TILE_ROWS), np.float32)
        for tile in range(task * ntiles // ntask, (task + 1) * ntiles // ntask):
            rows = min(TILE_ROWS, N - tile * TILE_ROWS)
            t = 0
            while t < T:
                if T - t >= TILE_TOKENS:
                    _MANY(tiles, tile, q8, dq, sq, sums, t, part)
                    tn = TILE_TOKENS
                else:
                    _ONE(tiles, tile, q8, dq, sq, sums, t, part)
                    tn = 1
                for k in range(tn):
                    for r in range(rows):
                        out[t + k, tile * TILE_ROWS + r] = part[k, r]
                t += tn


@functools.cache
def matmul_kernel(fmt: Format, level: int) -> Callable[[np.ndarray, np.ndarray, int, np.ndarray], None]:
    """The compiled `matmul(x, tiles, tasks, out)` of this type and level: out[T, N] = x[T, K] @ w.T
    with x rounded as llama.cpp rounds it, in `tasks` row ranges over the threads.

    Each kernel has a name of its own (its type, level and a digest of the format), so Numba's
    cache keeps one file per kernel and a changed format cannot load another's machine code."""
    name = f"matmul_{fmt.qtype.name.lower()}_{LEVEL_NAMES[level]}_{zlib.crc32(repr(fmt).encode()):08x}"
    scope = globals() | {"_ONE": _tile_kernel(fmt, level, 1), "_MANY": _tile_kernel(fmt, level, TILE_TOKENS),
                         "_KQUANT": fmt.kquant, "_SUMS_PER": fmt.sums_per}  # fmt: skip
    fn = pytypes.FunctionType(_matmul.__code__, scope, name)
    fn.__qualname__ = name
    return njit(parallel=True, **_JIT)(fn)
