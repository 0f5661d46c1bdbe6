"""Device helpers shared by the kernels, with a variant the CUDA simulator can run.

The simulator (NUMBA_ENABLE_CUDASIM=1, used by CI) has no warp shuffles and no
libdevice, so the warp sum and the float/bit casts are chosen at import: on a
GPU they are shuffles and intrinsics, under the simulator a shared-memory sum
and NumPy views. Every kernel calls the reductions from all threads of the
block, so both variants are valid.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import config, cuda, float32, int32, types, uint16, uint32

if not config.ENABLE_CUDASIM:
    from llvmlite import ir
    from numba.cuda import cgutils
    from numba.cuda.extending import _Intrinsic, intrinsic

SIM = bool(config.ENABLE_CUDASIM)
JIT = {"cache": not SIM, "fastmath": True}
EXACT = {"cache": not SIM}  # kernels whose quotients must round exactly like the CPU's
# device functions inlined in NVVM IR, so the local arrays they fill stay in registers
DEVICE = {"device": True} if SIM else {"device": True, "forceinline": True}
FULL_MASK = 0xFFFFFFFF
UNROLL = 4  # strided loops step this many strides at a time: their loads are then in flight together
NORM_SPAN = 4 if SIM else 32  # elements a lane of inv_rms loads at once


def address(a: Any) -> int:
    """A device array's address, for driver and library calls (the simulator's arrays wrap a NumPy array and
    lack the CUDA interface)."""
    if SIM:
        return a._ary.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


if SIM:

    @cuda.jit(device=True)
    def _lanes(v, scratch, width, take_max):  # pragma: no cover - the device variants below are the fast ones
        """Sum or maximum of v over this thread's group of `width` consecutive lanes."""
        tid = cuda.threadIdx.x
        scratch[tid] = v
        cuda.syncthreads()
        base = tid - tid % width
        s = scratch[base]
        for i in range(1, width):
            s = max(s, scratch[base + i]) if take_max else s + scratch[base + i]
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def grid_ready():
        """The simulator runs kernels one after another: nothing to wait for."""

    @cuda.jit(device=True)
    def warp_sum(v, scratch):
        """The sum of v over the 32 lanes of this thread's warp (every lane gets it)."""
        return _lanes(v, scratch, 32, False)

    @cuda.jit(device=True)
    def warp_max(v, scratch):
        """The maximum of v over the 32 lanes of this thread's warp (every lane gets it)."""
        return _lanes(v, scratch, 32, True)

    @cuda.jit(device=True)
    def quad_sum(v, scratch):
        """The sum of v over this lane's group of 4 lanes (lanes 4i .. 4i + 3)."""
        return _lanes(v, scratch, 4, False)

    @cuda.jit(device=True)
    def quad_max(v, scratch):
        """The maximum of v over this lane's group of 4 lanes."""
        return _lanes(v, scratch, 4, True)

    @cuda.jit(device=True)
    def load1(a, r, c):
        """a[r, c] of a read-only 2-D uint32 array (weights)."""
        return uint32(a[r, c])

    @cuda.jit(device=True)
    def load2(a, r, c):
        """a[r, c], a[r, c + 1] of a read-only 2-D uint32 array, c even: one 8-byte load."""
        return uint32(a[r, c]), uint32(a[r, c + 1])

    @cuda.jit(device=True)
    def load4(a, r, c):
        """a[r, c .. c + 3] of a read-only 2-D uint32 array, c a multiple of 4: one 16-byte load."""
        return uint32(a[r, c]), uint32(a[r, c + 1]), uint32(a[r, c + 2]), uint32(a[r, c + 3])

    @cuda.jit(device=True)
    def shared2(a, i):
        """a[i], a[i + 1] of a 1-D 32-bit shared array, i even: one 8-byte load."""
        return a[i], a[i + 1]

    @cuda.jit(device=True)
    def shared4(a, i):
        """a[i .. i + 3] of a 1-D 32-bit shared array, i a multiple of 4: one 16-byte load."""
        return a[i], a[i + 1], a[i + 2], a[i + 3]

    @cuda.jit(device=True)
    def put4(a, i, v0, v1, v2, v3):
        """a[i .. i + 3] = v0 .. v3 in a 1-D 32-bit shared array, i a multiple of 4: one 16-byte store."""
        a[i], a[i + 1], a[i + 2], a[i + 3] = v0, v1, v2, v3

    @cuda.jit(device=True)
    def _warp_words(words, scratch):
        """The words every lane of this thread's warp passed (a [32, len(words)] copy, by lane), exchanged
        through scratch as a warp's registers are by the tensor cores. Every lane calls it."""
        tid = cuda.threadIdx.x
        lane = tid % 32
        for i, v in enumerate(words):
            scratch[tid, i] = int(v) & 0xFFFFFFFF
        cuda.syncthreads()
        out = np.array(scratch[tid - lane : tid - lane + 32, : len(words)])
        cuda.syncthreads()
        return out

    @cuda.jit(device=True)
    def _lane_c(c):
        """This lane's four elements of a warp's 16 x 8 product c: rows l // 4 and + 8, columns 2 (l % 4), + 1."""
        g, q = cuda.threadIdx.x % 32 // 4, cuda.threadIdx.x % 4
        return c[g, 2 * q], c[g, 2 * q + 1], c[g + 8, 2 * q], c[g + 8, 2 * q + 1]

    @cuda.jit(device=True)
    def pack_f16(lo, hi):
        """The float16s nearest lo and hi (ties to even) in one word, lo in the low half."""
        return int(np.array([lo, hi], np.float16).view(np.uint32)[0])

    @cuda.jit(device=True)
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, scratch):
        """c + the warp's 16 x 8 float32 product of a 16 x 16 and a 16 x 8 float16 fragment (PTX mma m16n8k16
        f16, f32 accumulators). Each word holds two halves, the lower first: lane l holds A's rows l // 4
        (a0, a2) and l // 4 + 8 (a1, a3), columns 2 (l % 4) and + 1 (a0, a1), + 8 and + 9 (a2, a3); B's column
        l // 4, rows 2 (l % 4) and + 1 (b0), + 8 and + 9 (b1); c as mma_s8 gives C. Every lane calls it."""
        h = _warp_words((a0, a1, a2, a3, b0, b1), scratch).view(np.float16).astype(np.float64)
        h = h.reshape(8, 4, 6, 2)  # [group, lane in group, register, half]
        a = np.zeros((16, 16))
        b = np.zeros((16, 8))
        for r, (row, col) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
            a[row : row + 8, col : col + 8] = h[:, :, r, :].reshape(8, 8)
        for r in range(2):
            b[8 * r : 8 * r + 8, :] = h[:, :, 4 + r, :].reshape(8, 8).T
        return tuple(np.float32(v + w) for v, w in zip((c0, c1, c2, c3), _lane_c(a @ b), strict=True))

    @cuda.jit(device=True)
    def copy4(dst, i, src, r, c, ok):
        """dst[i .. i + 3] = src[r, c .. c + 3] (zeros where not ok), the simulator at once."""
        for k in range(4):
            dst[i + k] = src[r, c + k] if ok else 0

    @cuda.jit(device=True)
    def copy1(dst, i, src, r, c, ok):
        """dst[i] = src[r, c] (zero where not ok), the simulator at once."""
        dst[i] = src[r, c] if ok else 0

    @cuda.jit(device=True)
    def copies_sent():
        """The simulator's copies are done when issued."""

    @cuda.jit(device=True)
    def copies_landed():
        """The simulator's copies are done when issued."""

    @cuda.jit(device=True)
    def f32_from_bits(bits):
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

    @cuda.jit(device=True)
    def bits_from_f32(x):
        return int(np.float32(x).view(np.uint32))

    @cuda.jit(device=True)
    def fp16_round(x):
        """The float16 nearest to x (ties to even), as float32."""
        return np.float32(np.float16(x))

    @cuda.jit(device=True)
    def half_to_f32(h):
        """The float32 value of the IEEE half whose bits are the low 16 of h (exact)."""
        return np.float32(np.uint16(int(h) & 0xFFFF).view(np.float16))

    @cuda.jit(device=True)
    def f16_bits(x):
        """The bits of the float16 nearest to x (ties to even): what the KV cache holds."""
        return np.float16(x).view(np.uint16)

    @cuda.jit(device=True)
    def rint(x):
        """x rounded to the nearest integer, ties to even."""
        return np.float32(np.rint(x))

    @cuda.jit(device=True)
    def dp4a(a, b, c):
        """c + the dot product of the four signed bytes of a and of b."""
        s = int(c)
        for i in range(4):
            x, y = (int(a) >> (8 * i)) & 255, (int(b) >> (8 * i)) & 255
            s += (x - 256 if x >= 128 else x) * (y - 256 if y >= 128 else y)
        return int32(s)

    @cuda.jit(device=True)
    def mma_s8(a0, a1, a2, a3, b0, b1, scratch):
        """The warp's 16 x 8 int32 product of a 16 x 32 and a 32 x 8 int8 fragment (PTX mma m16n8k32 s8):
        this lane's 4 elements. Lane l holds rows l // 4 and l // 4 + 8 of A, columns 4 (l % 4) .. + 3
        (a0, a1) and 16 + 4 (l % 4) .. + 3 (a2, a3); column l // 4 of B, rows as A's columns (b0, b1);
        it gets C's rows l // 4 and l // 4 + 8, columns 2 (l % 4) and 2 (l % 4) + 1. Every lane calls it."""
        regs = _warp_words((a0, a1, a2, a3, b0, b1), scratch).view(np.int8).astype(np.int64)
        regs = regs.reshape(8, 4, 6, 4)  # [group, lane in group, register, byte]
        a = np.concatenate([np.concatenate([regs[:, :, r, :].reshape(8, 16), regs[:, :, r + 2, :].reshape(8, 16)], 1)
                            for r in (0, 1)])  # fmt: skip
        b = np.concatenate([regs[:, :, 4, :].reshape(8, 16), regs[:, :, 5, :].reshape(8, 16)], 1)  # B transposed
        return tuple(int32(v) for v in _lane_c(a @ b.T))

    @cuda.jit(device=True)
    def mma_s8_k16(a0, a1, b0, scratch):
        """The warp's 16 x 8 int32 product of a 16 x 16 and a 16 x 8 int8 fragment (PTX mma m16n8k16 s8):
        lane l holds rows l // 4 (a0) and l // 4 + 8 (a1) of A, columns 4 (l % 4) .. + 3; column l // 4
        of B, rows as A's columns (b0); it gets C's elements as mma_s8 gives them. Every lane calls it."""
        regs = _warp_words((a0, a1, b0), scratch).view(np.int8).astype(np.int64)
        regs = regs.reshape(8, 4, 3, 4)  # [group, lane in group, register, byte]
        a = np.concatenate([regs[:, :, 0, :].reshape(8, 16), regs[:, :, 1, :].reshape(8, 16)])
        return tuple(int32(v) for v in _lane_c(a @ regs[:, :, 2, :].reshape(8, 16).T))

    @cuda.jit(device=True)
    def dequant_f16x2(h, m, s, c):
        """(h - m) * s + c on two float16 pairs in a word each (h - m exact; one float16 rounding for the
        fused multiply-add)."""
        hv, mv, sv, cv = (np.array([int(v) & 0xFFFFFFFF], np.uint32).view(np.float16).astype(np.float64)
                          for v in (h, m, s, c))  # fmt: skip
        out = ((hv - mv) * sv + cv).astype(np.float16)
        return int(out.view(np.uint32)[0])

    @cuda.jit(device=True)
    def mma_tf32(a0, a1, b0, c0, c1, c2, c3, scratch):
        """c + the warp's 16 x 8 float32 product of a 16 x 4 and a 4 x 8 tf32 fragment (PTX mma m16n8k4 tf32,
        f32 accumulators; the operands tf32 bits: tf32). Lane l holds A's rows l // 4 (a0) and + 8 (a1), column
        l % 4; B's row l % 4, column l // 4 (b0); c as mma_s8 gives C. Every lane calls it."""
        w = _warp_words((a0, a1, b0), scratch).view(np.float32).astype(np.float64)
        w = w.reshape(8, 4, 3)  # [group, lane in group, register]
        a = np.concatenate([w[:, :, 0], w[:, :, 1]])
        return tuple(np.float32(v + p) for v, p in zip((c0, c1, c2, c3), _lane_c(a @ w[:, :, 2].T), strict=True))

else:

    @intrinsic
    def grid_ready(typingctx):  # noqa: ANN001, ANN201
        """Wait until the kernels before this one have finished and their writes are visible, then let
        the next kernel launch (PTX griddepcontrol; both are no-ops in a launch without a programmatic
        dependency). A memory barrier for the compiler: no load or store moves across it."""

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []),
                               "griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;", "~{memory}",
                               side_effect=True)  # fmt: skip
            builder.call(asm, [])
            return context.get_dummy_value()

        return types.none(), codegen

    @cuda.jit(**DEVICE)
    def warp_sum(v, scratch):
        """The sum of v over the 32 lanes of this thread's warp (every lane gets it)."""
        off = 16
        while off > 0:
            v += cuda.shfl_xor_sync(FULL_MASK, v, off)
            off //= 2
        return v

    @cuda.jit(**DEVICE)
    def warp_max(v, scratch):
        """The maximum of v over the 32 lanes of this thread's warp (every lane gets it)."""
        off = 16
        while off > 0:
            v = max(v, cuda.shfl_xor_sync(FULL_MASK, v, off))
            off //= 2
        return v

    @cuda.jit(**DEVICE)
    def quad_sum(v, scratch):
        """The sum of v over this lane's group of 4 lanes (lanes 4i .. 4i + 3)."""
        v += cuda.shfl_xor_sync(FULL_MASK, v, 1)
        return v + cuda.shfl_xor_sync(FULL_MASK, v, 2)

    @cuda.jit(**DEVICE)
    def quad_max(v, scratch):
        """The maximum of v over this lane's group of 4 lanes."""
        v = max(v, cuda.shfl_xor_sync(FULL_MASK, v, 1))
        return max(v, cuda.shfl_xor_sync(FULL_MASK, v, 2))

    @cuda.jit(**DEVICE)
    def f32_from_bits(bits):
        return cuda.libdevice.int_as_float(int32(bits))

    @cuda.jit(**DEVICE)
    def bits_from_f32(x):
        return uint32(cuda.libdevice.float_as_int(x))

    @cuda.jit(**DEVICE)
    def fp16_round(x):
        """The float16 nearest to x (ties to even), as float32."""
        return half_bits_to_f32(uint32(cuda.libdevice.float2half_rn(x)))

    @cuda.jit(**DEVICE)
    def f16_bits(x):
        """The bits of the float16 nearest to x (ties to even): what the KV cache holds."""
        return uint16(cuda.libdevice.float2half_rn(x))

    @intrinsic
    def half_to_f32(typingctx, h):  # noqa: ANN001, ANN201
        """The float32 value of the IEEE half whose bits are the low 16 of h: one instruction (cvt.f32.f16)."""

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            v = context.cast(builder, args[0], sig.args[0], types.uint32)
            half = builder.bitcast(builder.trunc(v, ir.IntType(16)), ir.HalfType())
            return builder.fpext(half, ir.FloatType())

        return types.float32(h), codegen

    @cuda.jit(**DEVICE)
    def rint(x):
        """x rounded to the nearest integer, ties to even."""
        return cuda.libdevice.rintf(x)

    def _element_ptr(context, builder, aryty, ary, idx_types, idxs):  # noqa: ANN001, ANN202
        """The address of ary[idxs] (no wraparound, no bounds check)."""
        arr = context.make_array(aryty)(context, builder, value=ary)
        inds = [context.cast(builder, v, t, types.intp) for v, t in zip(idxs, idx_types, strict=True)]
        shape, strides = cgutils.unpack_tuple(builder, arr.shape), cgutils.unpack_tuple(builder, arr.strides)
        return cgutils.get_item_pointer2(context, builder, arr.data, shape, strides, aryty.layout, inds)

    def _global_load(n: int):  # noqa: ANN202
        """The codegen of an n-word load through the read-only data cache (PTX ld.global.nc): weights,
        which no kernel writes while products read them."""
        vec = "" if n == 1 else f".v{n}"
        outs = "$0" if n == 1 else "{" + ",".join(f"${i}" for i in range(n)) + "}"
        text = f"ld.global.nc{vec}.u32 {outs}, [${n}];"

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            i32 = ir.IntType(32)
            ptr = _element_ptr(context, builder, sig.args[0], args[0], sig.args[1:], args[1:])
            ret = i32 if n == 1 else ir.LiteralStructType([i32] * n)
            asm = ir.InlineAsm(ir.FunctionType(ret, [ptr.type]), text, ",".join(["=r"] * n + ["l"]))
            out = builder.call(asm, [ptr])
            if n == 1:
                return out
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(out, i) for i in range(n)])

        return codegen

    @intrinsic
    def load1(typingctx, a, r, c):  # noqa: ANN001, ANN201
        """a[r, c] of a read-only 2-D uint32 array (weights)."""
        return types.uint32(a, r, c), _global_load(1)

    @intrinsic
    def load2(typingctx, a, r, c):  # noqa: ANN001, ANN201
        """a[r, c], a[r, c + 1] of a read-only 2-D uint32 array, c even: one 8-byte load."""
        return types.UniTuple(types.uint32, 2)(a, r, c), _global_load(2)

    @intrinsic
    def load4(typingctx, a, r, c):  # noqa: ANN001, ANN201
        """a[r, c .. c + 3] of a read-only 2-D uint32 array, c a multiple of 4: one 16-byte load."""
        return types.UniTuple(types.uint32, 4)(a, r, c), _global_load(4)

    def _shared_load(n: int):  # noqa: ANN202
        """The codegen of an n-word vector load from a shared array (its alignment the caller's promise)."""

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            ptr = _element_ptr(context, builder, sig.args[0], args[0], sig.args[1:], args[1:])
            vec = ir.VectorType(ptr.type.pointee, n)
            v = builder.load(builder.bitcast(ptr, ir.PointerType(vec, ptr.type.addrspace)), align=4 * n)
            words = [builder.extract_element(v, ir.Constant(ir.IntType(32), i)) for i in range(n)]
            return context.make_tuple(builder, sig.return_type, words)

        return codegen

    @intrinsic
    def shared2(typingctx, a, i):  # noqa: ANN001, ANN201
        """a[i], a[i + 1] of a 1-D 32-bit shared array, i even: one 8-byte load."""
        return types.UniTuple(a.dtype, 2)(a, i), _shared_load(2)

    @intrinsic
    def shared4(typingctx, a, i):  # noqa: ANN001, ANN201
        """a[i .. i + 3] of a 1-D 32-bit shared array, i a multiple of 4: one 16-byte load."""
        return types.UniTuple(a.dtype, 4)(a, i), _shared_load(4)

    @intrinsic
    def put4(typingctx, a, i, v0, v1, v2, v3):  # noqa: ANN001, ANN201
        """a[i .. i + 3] = v0 .. v3 in a 1-D 32-bit shared array, i a multiple of 4: one 16-byte store."""

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            ptr = _element_ptr(context, builder, sig.args[0], args[0], sig.args[1:2], args[1:2])
            vec = ir.Constant(ir.VectorType(ptr.type.pointee, 4), ir.Undefined)
            for k, (v, t) in enumerate(zip(args[2:], sig.args[2:], strict=True)):
                vec = builder.insert_element(vec, context.cast(builder, v, t, sig.args[0].dtype),
                                             ir.Constant(ir.IntType(32), k))  # fmt: skip
            builder.store(vec, builder.bitcast(ptr, ir.PointerType(vec.type, ptr.type.addrspace)), align=16)
            return context.get_dummy_value()

        return types.none(a, i, v0, v1, v2, v3), codegen

    @intrinsic
    def pack_f16(typingctx, lo, hi):  # noqa: ANN001, ANN201
        """The float16s nearest lo and hi (ties to even) in one word, lo in the low half (PTX cvt f16x2)."""

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            f32 = ir.FloatType()
            ins = [context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args, strict=True)]
            fn = ir.FunctionType(ir.IntType(32), [f32, f32])
            return builder.call(ir.InlineAsm(fn, "cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f"), [ins[1], ins[0]])

        return types.uint32(lo, hi), codegen

    def _float_mma(shape: str, n_a: int, n_b: int):  # noqa: ANN202
        """The codegen of PTX mma `shape` (its layouts and types but the accumulators') with n_a A and n_b B
        registers and float32 accumulators in and out."""
        n_in = n_a + n_b
        regs = [f"${i}" for i in range(4 + n_in + 4)]
        text = (f"mma.sync.aligned.{shape}.f32 {{{','.join(regs[:4])}}}, {{{','.join(regs[4:4 + n_a])}}}, "
                f"{{{','.join(regs[4 + n_a:4 + n_in])}}}, {{{','.join(regs[4 + n_in:])}}};")  # fmt: skip

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            i32, f32 = ir.IntType(32), ir.FloatType()
            ins = [context.cast(builder, v, t, types.uint32) for v, t in zip(args[:n_in], sig.args[:n_in], strict=True)]
            ins += [context.cast(builder, v, t, types.float32)
                    for v, t in zip(args[n_in:n_in + 4], sig.args[n_in:n_in + 4], strict=True)]  # fmt: skip
            fn = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * n_in + [f32] * 4)
            out = builder.call(ir.InlineAsm(fn, text, ",".join(["=f"] * 4 + ["r"] * n_in + ["f"] * 4)), ins)
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(out, i) for i in range(4)])

        return codegen

    @intrinsic
    def mma_f16(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, scratch):  # noqa: ANN001, ANN201
        """c + the warp's 16 x 8 float32 product of float16 fragments: one tensor-core instruction (PTX mma
        m16n8k16 f16 with f32 accumulators; the fragments as the simulator twin describes)."""
        sig = types.UniTuple(types.float32, 4)(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, scratch)
        return sig, _float_mma("m16n8k16.row.col.f32.f16.f16", 4, 2)

    @intrinsic
    def dequant_f16x2(typingctx, h, m, s, c):  # noqa: ANN001, ANN201
        """(h - m) * s + c on two float16 pairs in a word each (PTX sub.f16x2 and fma.rn.f16x2)."""

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            i32 = ir.IntType(32)
            ins = [context.cast(builder, v, t, types.uint32) for v, t in zip(args, sig.args, strict=True)]
            text = "{ .reg .b32 t; sub.f16x2 t, $1, $2; fma.rn.f16x2 $0, t, $3, $4; }"
            return builder.call(ir.InlineAsm(ir.FunctionType(i32, [i32] * 4), text, "=r,r,r,r,r"), ins)

        return types.uint32(h, m, s, c), codegen

    @intrinsic
    def mma_tf32(typingctx, a0, a1, b0, c0, c1, c2, c3, scratch):  # noqa: ANN001, ANN201
        """c + the warp's 16 x 8 float32 product of tf32 fragments: one tensor-core instruction (PTX mma
        m16n8k4 tf32 with f32 accumulators; the fragments as the simulator twin describes)."""
        sig = types.UniTuple(types.float32, 4)(a0, a1, b0, c0, c1, c2, c3, scratch)
        return sig, _float_mma("m16n8k4.row.col.f32.tf32.tf32", 2, 1)

    def _copy_async(size: int):  # noqa: ANN202
        """The codegen of a `size`-byte copy of src[r, c ..] into dst[i ..] (a shared array) that the memory
        system does on its own (PTX cp.async): the thread goes on at once, and registers hold nothing in
        flight. Where ok is false it fills zeros and reads nothing (source size 0)."""
        kind = "cg" if size == 16 else "ca"  # (16-byte copies may skip L1; smaller ones may not)
        text = ("{ .reg .u64 a; .reg .u32 s; cvta.to.shared.u64 a, $0; cvt.u32.u64 s, a; "
                f"cp.async.{kind}.shared.global [s], [$1], {size}, $2; }}")  # fmt: skip

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            dst = _element_ptr(context, builder, sig.args[0], args[0], sig.args[1:2], args[1:2])
            src = _element_ptr(context, builder, sig.args[2], args[2], sig.args[3:5], args[3:5])
            ok = context.cast(builder, args[5], sig.args[5], types.boolean)
            n = builder.select(ok, ir.Constant(ir.IntType(32), size), ir.Constant(ir.IntType(32), 0))
            fn = ir.FunctionType(ir.VoidType(), [dst.type, src.type, n.type])
            builder.call(ir.InlineAsm(fn, text, "l,l,r,~{memory}", side_effect=True), [dst, src, n])
            return context.get_dummy_value()

        return codegen

    @intrinsic
    def copy4(typingctx, dst, i, src, r, c, ok):  # noqa: ANN001, ANN201
        """dst[i .. i + 3] = src[r, c .. c + 3] of 32-bit arrays (dst shared, i and the source 16-byte
        aligned), zeros where not ok: an asynchronous copy (cp.async), done by copies_landed."""
        return types.none(dst, i, src, r, c, ok), _copy_async(16)

    @intrinsic
    def copy1(typingctx, dst, i, src, r, c, ok):  # noqa: ANN001, ANN201
        """dst[i] = src[r, c] of 32-bit arrays (dst shared), zero where not ok: copy4 for one word."""
        return types.none(dst, i, src, r, c, ok), _copy_async(4)

    def _asm_statement(text: str):  # noqa: ANN202
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fn = ir.FunctionType(ir.VoidType(), [])
            builder.call(ir.InlineAsm(fn, text, "~{memory}", side_effect=True), [])
            return context.get_dummy_value()

        return codegen

    @intrinsic
    def copies_sent(typingctx):  # noqa: ANN001, ANN201
        """Closes the group of this thread's copies issued since the last one (PTX cp.async.commit_group)."""
        return types.none(), _asm_statement("cp.async.commit_group;")

    @intrinsic
    def copies_landed(typingctx):  # noqa: ANN001, ANN201
        """Waits for this thread's groups of copies but the last one sent (PTX cp.async.wait_group 1):
        with two stages in flight, the older one has landed (for the other threads: after a barrier)."""
        return types.none(), _asm_statement("cp.async.wait_group 1;")

    @intrinsic
    def dp4a(typingctx, a, b, c):  # noqa: ANN001, ANN201
        """c + the dot product of the four signed bytes of a and of b: one instruction (PTX dp4a)."""

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            i32 = ir.IntType(32)
            ins = [context.cast(builder, v, t, types.int32) for v, t in zip(args, sig.args, strict=True)]
            asm = ir.InlineAsm(ir.FunctionType(i32, [i32] * 3), "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(asm, ins)

        return types.int32(a, b, c), codegen

    def _mma(k: int, n_a: int, n_b: int):  # noqa: ANN202
        """The intrinsic of PTX mma m16n8k{k} s8 with n_a A and n_b B registers (and a zero C)."""
        n_in = n_a + n_b
        regs = [f"${i}" for i in range(4 + n_in + 4)]
        text = (f"mma.sync.aligned.m16n8k{k}.row.col.s32.s8.s8.s32 {{{','.join(regs[:4])}}}, "
                f"{{{','.join(regs[4:4 + n_a])}}}, {{{','.join(regs[4 + n_a:4 + n_in])}}}, "
                f"{{{','.join(regs[4 + n_in:])}}};")  # fmt: skip

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            i32 = ir.IntType(32)
            ins = [context.cast(builder, v, t, types.int32) for v, t in zip(args[:n_in], sig.args[:n_in], strict=True)]
            ins += [ir.Constant(i32, 0)] * 4
            fn = ir.FunctionType(ir.LiteralStructType([i32] * 4), [i32] * (n_in + 4))
            out = builder.call(ir.InlineAsm(fn, text, ",".join(["=r"] * 4 + ["r"] * (n_in + 4))), ins)
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(out, i) for i in range(4)])

        return codegen

    @intrinsic
    def mma_s8(typingctx, a0, a1, a2, a3, b0, b1, scratch):  # noqa: ANN001, ANN201
        """The warp's 16 x 8 int32 product of int8 fragments: one tensor-core instruction (PTX mma
        m16n8k32 s8; the fragments as the simulator twin describes). scratch is the twin's."""
        return types.UniTuple(types.int32, 4)(a0, a1, a2, a3, b0, b1, scratch), _mma(32, 4, 2)

    @intrinsic
    def mma_s8_k16(typingctx, a0, a1, b0, scratch):  # noqa: ANN001, ANN201
        """The warp's 16 x 8 int32 product of int8 fragments over 16 columns (PTX mma m16n8k16 s8; the
        fragments as the simulator twin describes). scratch is the twin's."""
        return types.UniTuple(types.int32, 4)(a0, a1, b0, scratch), _mma(16, 2, 1)

    # Each intrinsic named for good: Numba keys a kernel's disk cache on its closure pickled, where the device
    # functions it holds pickle the intrinsics they call with their uuid, a random uuid1 unless set. Every
    # process then missed the cache of every kernel holding such a function (mma_kernel, hmma_kernel,
    # attention_seq_kernel) and compiled it again: a warm start took 29-35 s on the H100 (tenth session).
    for _name, _value in list(globals().items()):
        if isinstance(_value, _Intrinsic):
            _value._set_uuid(f"rbees-{__name__}.{_name}")
    del _name, _value


@cuda.jit(**DEVICE)
def silu_mul(g, u):
    """SwiGLU's silu(g) * u, for each kernel that applies it (the one-token gated products, swiglu_kernel, the
    down product's input preparation), so that they round alike."""
    return g / (float32(1.0) + math.exp(-g)) * u


@cuda.jit(**DEVICE)
def inv_rms(x, t, k, eps, scratch):
    """1 / sqrt(mean(x[t, :k]^2) + eps), called by a whole warp (k the row's length: a constant
    where the kernel is compiled for it, which folds the bounds away).

    Summed in one fixed order (each lane a stride of 32 elements, then the warp), so the
    RMSNorm kernel and the products that normalize their input themselves agree bit for bit.
    A lane loads NORM_SPAN elements before it sums them: one memory round trip for rows of up
    to 32 * NORM_SPAN elements, not one per few elements.
    """
    xv = cuda.local.array(NORM_SPAN, float32)
    ss = float32(0.0)
    lane = cuda.threadIdx.x & 31
    for s0 in range(0, k, 32 * NORM_SPAN):
        full = min(NORM_SPAN, (k - s0) // 32)  # elements of the span that every lane has
        for u in range(NORM_SPAN):
            i = s0 + 32 * u + lane
            xv[u] = x[uint32(t), uint32(i)] if u < full or (u == full and i < k) else float32(0.0)
        for u in range(NORM_SPAN):
            ss += xv[u] * xv[u]
    ss = warp_sum(ss, scratch)
    return float32(1.0 / math.sqrt(ss / k + eps))


@cuda.jit(**DEVICE)
def _block_reduce(v, sh, largest):
    """The sum (largest: the maximum) over the block (blockDim.x a power of two, sh a shared array of
    blockDim.x of v's type)."""
    tid = cuda.threadIdx.x
    sh[tid] = v
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if tid < s:
            sh[tid] = max(sh[tid], sh[tid + s]) if largest else sh[tid] + sh[tid + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@cuda.jit(**DEVICE)
def block_sum(v, sh):
    """Sum over the block (blockDim.x a power of two, sh a shared array of blockDim.x of the sum's type)."""
    return _block_reduce(v, sh, False)


@cuda.jit(**DEVICE)
def block_max(v, sh):
    """Maximum over the block (as block_sum)."""
    return _block_reduce(v, sh, True)


@cuda.jit(**DEVICE)
def half_bits_to_f32(h):
    """The float32 value of IEEE half bits (exact)."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = float32(m) * float32(5.960464477539063e-08)  # m * 2^-24, exact
        return -v if sign else v
    if e == 31:
        return f32_from_bits(sign | 0x7F800000 | (m << 13))
    return f32_from_bits(sign | ((e + 112) << 23) | (m << 13))


@cuda.jit(**DEVICE)
def tf32_pair(x):
    """x as two tf32 operands of mma_tf32 (which uses a tf32's 10 mantissa bits only), high + low within
    2^-21 of x: the float32 bits cut to those 10, and the remainder (exact in float32) cut the same way."""
    hi = bits_from_f32(x) & uint32(0xFFFFE000)
    return hi, bits_from_f32(x - f32_from_bits(hi)) & uint32(0xFFFFE000)
