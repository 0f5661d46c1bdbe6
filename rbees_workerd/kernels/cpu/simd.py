"""AVX2 integer dot products for Q4_0, Q4_1 and Q8_0 weights: what llama.cpp's x86 kernels do.

LLVM does not derive `vpmaddubsw` (32 products of an unsigned and a signed byte, summed
in pairs) from any loop Numba can express, and the float formulation of `quant_kernels`
costs ~4x more instructions per weight. So the inner loop here is LLVM IR written with
llvmlite inside a Numba `@intrinsic`: the kernels stay Numba functions (cached,
parallel with `prange`) and only the SIMD body is spelled out.

Layout ("tiles"): the rows in tiles of 8, each tile one contiguous run of its 32-blocks, and
each block `tiles[t, b]` the 8 rows' bytes then their fp16 scales, as GGUF keeps them: the
same 20 bytes per 32 Q4_1 weights, so decode, which streams the weights from memory once,
reads no more than llama.cpp. The bytes: 4-byte groups `g`, then rows, then the group's 4
bytes (for the 4-bit types the byte holding elements `4g + i` in its low nibble and
`4g + i + 16` in its high one, for Q8_0 element `4g + i`); then d[8] and, for Q4_1, m[8].
A 32-byte load is then 8 rows x 4 bytes, and one `vpmaddubsw` + `vpmaddwd` against 4
broadcast activation bytes gives each row's sum of 4 products in an int32 lane (the sums
`vpdpbusd` would give).

Sums are exact integers, then scaled per block as llama.cpp scales them, so results equal
`quant_kernels.matmul_nibble_q8`'s up to float32 summation order.
"""

from __future__ import annotations

import os
import platform

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rbees_workerd.kernels.cpu.quant_act import quantize_q8_rows

# RBEES_CPU_SIMD=0 keeps the portable kernels (for comparison, or a CPU that misreports AVX2)
AVAILABLE = (
    platform.machine().lower() in ("x86_64", "amd64")
    and {"+avx2", "+f16c"} <= set(llvm.get_host_cpu_features().flatten().split(","))
    and os.environ.get("RBEES_CPU_SIMD", "1") != "0"
)

Q4_1, Q4_0, Q8_0 = 0, 1, 2  # how a kernel reads its weights and scales its block sums
GROUPS = {Q4_1: 4, Q4_0: 4, Q8_0: 8}  # 4-byte groups per row and 32-block
TILE_ROWS = 8  # rows per 256-bit vector of int32 sums; the unit of work of a kernel call
SCALES = {Q4_1: 2, Q4_0: 1, Q8_0: 1}  # fp16 vectors (d, m) after a block's bytes
_TILE_TOKENS = 4  # tokens per pass over a tile's weights (their 8 accumulators and the operands fit 16 ymm)

_i8, _i16, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_B32 = ir.VectorType(_i8, 32)
_W16 = ir.VectorType(_i16, 16)
_D8 = ir.VectorType(_i32, 8)
_F8 = ir.VectorType(_f32, 8)
_H8 = ir.VectorType(ir.HalfType(), 8)


def _declare(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    try:
        return builder.module.get_global(name)
    except KeyError:
        return ir.Function(builder.module, ir.FunctionType(ret, args), name=name)


def _splat(builder: ir.IRBuilder, value: ir.Value, vec: ir.VectorType) -> ir.Value:
    one = builder.insert_element(ir.Constant(vec, None), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, ir.Constant(vec, None), ir.Constant(_D8, [0] * vec.count))


def _load(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, ty: ir.Type) -> ir.Value:
    return builder.load(builder.bitcast(builder.gep(base, [offset]), ty.as_pointer()), align=1)


def _const(v: int) -> ir.Constant:
    return ir.Constant(_i64, v)


def block_bytes(kind: int) -> int:
    """Bytes of one 32-block of one tile: the 8 rows' values, then their fp16 scales."""
    return GROUPS[kind] * 32 + 16 * SCALES[kind]


def _tile_kernel(tokens: int, kind: int):  # noqa: ANN202
    """An intrinsic: out[t, 0:8] = the products of `tokens` activation rows with one tile of rows.

    Arguments: the arrays with the byte offset of the tile (tiles[tile]) and of the first
    token's row (q8[t0], with row stride xstride bytes), and the element offset of that row in
    dh and sums (row stride nb, the blocks); out = float32[tokens, 8]. Arrays, not raw
    addresses: Numba keeps an array alive only while it is used as one.
    """
    groups = GROUPS[kind]
    block = block_bytes(kind)

    @intrinsic
    def tile(typingctx, w, woff, x, xoff, xstride, dx, s, soff, nb, out):  # noqa: ANN001, ANN202, ARG001
        i = types.intp
        sig = types.void(w, i, x, i, i, dx, s, i, i, out)

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            wa, wo, xa, xo, xs, dxa, sa, so, nbv, oa = args

            def data(k: int, value: ir.Value, ty: ir.Type) -> ir.Value:
                ptr = context.make_array(signature.args[k])(context, builder, value).data
                return builder.bitcast(ptr, ty.as_pointer())

            w8 = builder.gep(data(0, wa, _i8), [wo])
            x8 = builder.gep(data(2, xa, _i8), [xo])
            dxf, sf = builder.gep(data(5, dxa, _f32), [so]), builder.gep(data(6, sa, _f32), [so])
            of = data(9, oa, _f32)
            maddubs = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", _W16, [_B32, _B32])
            maddwd = _declare(builder, "llvm.x86.avx2.pmadd.wd", _D8, [_W16, _W16])
            psign = _declare(builder, "llvm.x86.avx2.psign.b", _B32, [_B32, _B32])
            ones = ir.Constant(_W16, [1] * 16)
            low4 = ir.Constant(_B32, [15] * 32)
            with builder.goto_entry_block():
                accs = [builder.alloca(_F8) for _ in range(tokens)]  # promoted to registers by LLVM
            for a in accs:
                builder.store(ir.Constant(_F8, [0.0] * 8), a)
            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                sums: list[ir.Value | None] = [None] * tokens
                for g in range(groups):
                    wv = _load(builder, w8, builder.add(builder.mul(b, _const(block)), _const(g * 32)), _B32)
                    if kind == Q8_0:
                        # |w| (unsigned) times x with w's sign: vpmaddubsw wants one unsigned operand
                        aw = builder.call(psign, [wv, wv])
                    else:
                        lo = builder.and_(wv, low4)
                        hi = builder.and_(builder.lshr(wv, ir.Constant(_B32, [4] * 32)), low4)
                    for t in range(tokens):
                        xrow = builder.add(builder.mul(_const(t), xs), builder.mul(b, _const(32)))
                        xl = _splat(builder, _load(builder, x8, builder.add(xrow, _const(4 * g)), _i32), _D8)
                        if kind == Q8_0:
                            signed = builder.call(psign, [builder.bitcast(xl, _B32), wv])
                            part = builder.call(maddwd, [builder.call(maddubs, [aw, signed]), ones])
                        else:
                            xh = _splat(builder, _load(builder, x8, builder.add(xrow, _const(16 + 4 * g)), _i32), _D8)
                            # int16 is enough for a whole 4-bit block: |sum| <= 32 * 15 * 127 / 2 per lane
                            part = builder.add(builder.call(maddubs, [lo, builder.bitcast(xl, _B32)]),
                                               builder.call(maddubs, [hi, builder.bitcast(xh, _B32)]))  # fmt: skip
                        sums[t] = part if sums[t] is None else builder.add(sums[t], part)
                scales = builder.add(builder.mul(b, _const(block)), _const(groups * 32))
                dv = builder.fpext(_load(builder, w8, scales, _H8), _F8)
                if kind == Q4_1:
                    mv = builder.fpext(_load(builder, w8, builder.add(scales, _const(16)), _H8), _F8)
                for t in range(tokens):
                    total = sums[t] if kind == Q8_0 else builder.call(maddwd, [sums[t], ones])
                    dot = builder.sitofp(total, _F8)
                    at = builder.add(builder.mul(_const(t), nbv), b)
                    dxv = _splat(builder, builder.load(builder.gep(dxf, [at])), _F8)
                    if kind == Q4_1:  # d * dx * dot + m * s (s: Q8_1's fp16 dx * sum(q8))
                        sv = _splat(builder, builder.load(builder.gep(sf, [at])), _F8)
                        term = builder.fadd(builder.fmul(builder.fmul(dv, dxv), dot), builder.fmul(mv, sv))
                    elif kind == Q4_0:  # d * (dx * dot + s) (s: offset * dx * sum(q8))
                        sv = _splat(builder, builder.load(builder.gep(sf, [at])), _F8)
                        term = builder.fmul(dv, builder.fadd(builder.fmul(dxv, dot), sv))
                    else:
                        term = builder.fmul(builder.fmul(dv, dxv), dot)
                    builder.store(builder.fadd(builder.load(accs[t]), term), accs[t])
            for t, a in enumerate(accs):
                dst = builder.bitcast(builder.gep(of, [_const(t * TILE_ROWS)]), _F8.as_pointer())
                builder.store(builder.load(a), dst, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_JIT = {"cache": True, "nogil": True, "fastmath": True}
_q4_1_x1, _q4_1_x4 = _tile_kernel(1, Q4_1), _tile_kernel(_TILE_TOKENS, Q4_1)
_q4_0_x1, _q4_0_x4 = _tile_kernel(1, Q4_0), _tile_kernel(_TILE_TOKENS, Q4_0)
_q8_0_x1, _q8_0_x4 = _tile_kernel(1, Q8_0), _tile_kernel(_TILE_TOKENS, Q8_0)


@njit(inline="always", **_JIT)
def _tile(kind, many, w, woff, x, xoff, xstride, dx, s, soff, nb, out):  # noqa: ANN001, ANN202
    """One kernel call; `kind` and `many` are constants once inlined, so LLVM keeps one branch."""
    if kind == Q4_1:
        if many:
            _q4_1_x4(w, woff, x, xoff, xstride, dx, s, soff, nb, out)
        else:
            _q4_1_x1(w, woff, x, xoff, xstride, dx, s, soff, nb, out)
    elif kind == Q4_0:
        if many:
            _q4_0_x4(w, woff, x, xoff, xstride, dx, s, soff, nb, out)
        else:
            _q4_0_x1(w, woff, x, xoff, xstride, dx, s, soff, nb, out)
    elif many:
        _q8_0_x4(w, woff, x, xoff, xstride, dx, s, soff, nb, out)
    else:
        _q8_0_x1(w, woff, x, xoff, xstride, dx, s, soff, nb, out)


@njit(inline="always", **_JIT)
def _matmul(kind, x, tiled, offset, tasks, out):  # noqa: ANN001, ANN202
    """out[T, N] = x[T, K] @ dequant(w).T with x rounded to int8 blocks as llama.cpp rounds it."""
    T, K = x.shape
    nb = tiled.shape[1]
    N = out.shape[1]
    q8, dh, sums = quantize_q8_rows(x, offset if kind == Q4_0 else np.float32(0.0))
    tiles = -(-N // TILE_ROWS)
    ntask = max(1, min(tasks, tiles))
    for task in prange(ntask):
        part = np.empty((_TILE_TOKENS, TILE_ROWS), np.float32)
        for tile in range(task * tiles // ntask, (task + 1) * tiles // ntask):
            woff = tile * nb * tiled.shape[2]
            rows = min(TILE_ROWS, N - tile * TILE_ROWS)
            t = 0
            while t < T:
                many = T - t >= _TILE_TOKENS
                tn = _TILE_TOKENS if many else 1
                _tile(kind, many, tiled, woff, q8, t * K, K, dh, sums, t * nb, nb, part)
                for k in range(tn):
                    for r in range(rows):
                        out[t + k, tile * TILE_ROWS + r] = part[k, r]
                t += tn


@njit(parallel=True, **_JIT)
def matmul_q4_1(x, tiled, offset, tasks, out):  # noqa: ANN001, ANN201
    _matmul(Q4_1, x, tiled, offset, tasks, out)


@njit(parallel=True, **_JIT)
def matmul_q4_0(x, tiled, offset, tasks, out):  # noqa: ANN001, ANN201
    _matmul(Q4_0, x, tiled, offset, tasks, out)


@njit(parallel=True, **_JIT)
def matmul_q8_0(x, tiled, offset, tasks, out):  # noqa: ANN001, ANN201
    _matmul(Q8_0, x, tiled, offset, tasks, out)


def to_tiles(kind: int, qs: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """`quant_pack`'s qs[c, b, j, r] and float32 d, m[c, b, r] -> uint8 tiles[N/8, nb, block_bytes]."""
    nc, nb, j, c = qs.shape
    sub = c // TILE_ROWS
    # [c, b, g, i, sub, r8] -> [c, sub, b, g, r8, i]
    values = qs.reshape(nc, nb, j // 4, 4, sub, TILE_ROWS).transpose(0, 4, 1, 2, 5, 3).reshape(nc * sub, nb, -1)
    scales = [d] + ([m] if kind == Q4_1 else [])
    halves = [a.reshape(nc, nb, sub, TILE_ROWS).transpose(0, 2, 1, 3).reshape(nc * sub, nb, TILE_ROWS) for a in scales]
    fp16 = [h.astype(np.float16).view(np.uint8) for h in halves]  # exact: they were fp16 in the GGUF
    return np.ascontiguousarray(np.concatenate([values, *fp16], axis=2))


def rows(kind: int, tiled: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """These rows in `quant_pack`'s layout, as chunks of one row: qs[n, nb, j, 1], d and m[n, nb, 1]."""
    n, nb = len(ids), tiled.shape[1]
    blk = tiled[ids // TILE_ROWS].reshape(n, nb, -1)
    r = (ids % TILE_ROWS)[:, None]
    groups = GROUPS[kind]
    values = blk[:, :, : groups * 32].reshape(n, nb, groups, TILE_ROWS, 4)
    qs = values[np.arange(n)[:, None], :, :, r, :].reshape(n, nb, groups * 4, 1)
    scales = blk[:, :, groups * 32 :].copy().view(np.float16).astype(np.float32).reshape(n, nb, -1, TILE_ROWS)
    pick = scales[np.arange(n), :, :, ids % TILE_ROWS]  # [n, nb, scales]
    d = np.ascontiguousarray(pick[:, :, :1])
    m = np.ascontiguousarray(pick[:, :, 1:2]) if kind == Q4_1 else np.zeros((n, 0, 1), np.float32)
    return np.ascontiguousarray(qs), d, m
