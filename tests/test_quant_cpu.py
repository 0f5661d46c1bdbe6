"""The CPU quantized kernels against the gguf package's reference dequantization.

Every supported type, on every kernel level the host has (the portable float kernels, and
`simd`'s AVX2 and VNNI integer kernels; a level the CPU lacks is skipped, saying so):
`embed_rows` must reproduce `gguf.quants.dequantize` (up to one float32 rounding: the
kernels may fuse d*q+m into one FMA), and `matmul` must match `xr @ dequantize(w).T`
computed in float64, where xr is x rounded the way llama.cpp rounds activations for that
weight type (re-implemented here with NumPy, independently of `quant_act`). The kernels
apply block scales to float32 partial sums, so the only
remaining error is float32 rounding of sums over K <= 1536 terms: about
sqrt(K) * 2^-24 * sum|w*x| in the random-walk case, far below MATMUL_RTOL = 1e-5 of
the largest output for these inputs (a bug in any block, nibble or scale shows up as
an error of order 1e-1 or more).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from rbees_workerd.errors import InvalidParams, ModelLoadError
from rbees_workerd.kernels.cpu import quant, quant_pack, quant_tiles, simd
from rbees_workerd.kernels.cpu import quant_act as qa

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
BLOCK_TYPES = [q for q in ALL_TYPES if q in quant_tiles.FORMATS]  # `simd` serves these
INTEGER_LEVELS = [simd.AVX2, simd.VNNI]


def on_host(level: int) -> list[pytest.MarkDecorator]:
    """A skip mark where this CPU cannot run `level` (simd.host_level), for parameters."""
    if level <= simd.HOST_LEVEL:
        return []
    host = simd.LEVEL_NAMES[simd.HOST_LEVEL]
    return [pytest.mark.skip(reason=f"this CPU runs up to the {host} kernels, not {simd.LEVEL_NAMES[level]}")]


# every type on the kernels `prepare` picks by default, and the block types on every other level too
CASES = [pytest.param((q, simd.LEVEL), id=f"{q.name}-default") for q in ALL_TYPES] + [
    pytest.param((q, level), id=f"{q.name}-{simd.LEVEL_NAMES[level]}", marks=on_host(level))
    for q in BLOCK_TYPES
    for level in (simd.PORTABLE, *INTEGER_LEVELS)
    if level != simd.LEVEL
]
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
MATMUL_RTOL = 1e-5  # see the module docstring
DEQUANT_RTOL = 2e-7  # one float32 rounding (2^-24 ~ 6e-8 of each value, relative to the max)
# Against the unrounded activations: int8 rounding moves each activation by at most
# amax/254 of its block (0.4%), errors of random sign that partly cancel in the sum, so
# the output moves by well under 1% of its largest value; 2e-2 leaves room for the
# smallest outputs' blocks and still catches any real bug (errors of order 1e-1 and up).
INT8_ACTIVATION_RTOL = 2e-2
Q8_0_ACT = (Q.Q4_0, Q.Q5_0, Q.Q8_0)
Q8_1_ACT = (Q.Q4_1, Q.Q5_1)


def random_tensor(qtype: Q, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """GGUF bytes uint8[n, row_bytes] of a random `[n, k]` matrix of type `qtype`."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    if qtype == Q.F32:
        return w.view(np.uint8)
    if qtype == Q.F16:
        return w.astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    if qtype not in K_QUANTS:
        return np.ascontiguousarray(quantize(w, qtype))
    # gguf has no K-quant quantizer: random quants and sub-scales (every byte pattern is a
    # valid block) with sane fp16 super-block scales.
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, (n, k // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[..., 208:210] = scales[..., 0:2]
    else:
        raw[..., 0:4] = scales
    return raw.reshape(n, -1)


def reference(qtype: Q, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    return dequantize(raw, qtype).reshape(n, k).astype(np.float64)


def q8k_activations(x: np.ndarray) -> np.ndarray:
    """x rounded as llama.cpp's quantize_row_q8_K_ref: per 256, iscale = -127 / the first element of
    largest magnitude, q = min(127, rint(iscale * x)), values q * (1 / iscale), all in float32."""
    blocks = x.reshape(x.shape[0], -1, 256)
    big = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)  # the first one
    with np.errstate(divide="ignore"):
        iscale = np.where(big != 0, np.float32(-127) / big, np.float32(0)).astype(np.float32)
        d = np.where(big != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(np.float32(127), np.rint(blocks * iscale))
    return (q * d).reshape(x.shape)


def llama_activations(qtype: Q, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """x rounded as llama.cpp's x86 quantize_row_q8_0/q8_1/q8_K (or fp16) would, and Q8_1's fp16 block sums."""
    if qtype == Q.F16:
        return x.astype(np.float16).astype(np.float32), None
    if qtype in K_QUANTS:
        return q8k_activations(x), None
    if qtype not in Q8_0_ACT + Q8_1_ACT:
        return x, None
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv)
    xr = (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)
    sums = (d[..., 0] * q.sum(axis=-1)).astype(np.float16).astype(np.float64)
    return xr, sums if qtype in Q8_1_ACT else None


def expected_matmul(qtype: Q, raw: np.ndarray, ref: np.ndarray, x: np.ndarray) -> np.ndarray:
    """llama.cpp's product in float64: rounded activations, and Q8_1's fp16 sums for the mins."""
    xr, sums = llama_activations(qtype, x)
    out = xr.astype(np.float64) @ ref.T
    if sums is not None:  # min term m * s uses the fp16 sum instead of the sum of xr
        n = raw.shape[0]
        mins = np.ascontiguousarray(raw.reshape(n, -1, GGML_QUANT_SIZES[qtype][1])[..., 2:4])
        mins = mins.view(np.float16)[..., 0].astype(np.float64)  # [n, blocks]
        exact = xr.reshape(x.shape[0], -1, 32).sum(axis=-1, dtype=np.float64)
        out += (sums - exact) @ mins.T
    return out


def shape_for(qtype: Q) -> tuple[int, int]:
    # odd N (a partial row chunk); K not a multiple of 256 for the 32-element block types
    return (67, 768) if qtype in K_QUANTS else (67, 288)


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[Q, np.ndarray, np.ndarray, quant.QMatrix]:
    qtype, level = request.param
    n, k = shape_for(qtype)
    raw = random_tensor(qtype, n, k, np.random.default_rng(int(qtype)))
    w = quant.prepare(int(qtype), (n, k), raw, level=level)
    assert (w.tiles is not None) == (level != simd.PORTABLE and qtype in BLOCK_TYPES)
    return qtype, raw, reference(qtype, raw, n, k), w


def test_embed_rows_reproduce_reference_dequantization(case) -> None:  # noqa: ANN001
    _, _, ref, w = case
    tokens = np.array([0, 66, 5, 31, 32, 5], np.int32)
    out = np.full((len(tokens), w.shape[1]), np.nan, np.float32)
    quant.embed_rows(w, tokens, out)
    np.testing.assert_allclose(out, ref[tokens], rtol=0, atol=DEQUANT_RTOL * np.abs(ref).max())


def relative_error(out: np.ndarray, expect: np.ndarray) -> float:
    return float(np.abs(out - expect).max() / np.abs(expect).max())


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 17, 64])
def test_matmul_matches_float64_reference(case, tokens: int) -> None:  # noqa: ANN001
    qtype, raw, ref, w = case
    x = np.random.default_rng(tokens).standard_normal((tokens, w.shape[1])).astype(np.float32)
    out = np.full((tokens, w.shape[0]), np.nan, np.float32)
    quant.matmul(x, w, out)
    err = relative_error(out, expected_matmul(qtype, raw, ref, x))
    assert err < MATMUL_RTOL, f"relative error {err:.2e} against llama.cpp's arithmetic"
    err = relative_error(out, x.astype(np.float64) @ ref.T)
    assert err < INT8_ACTIVATION_RTOL, f"relative error {err:.2e} against unrounded activations"


@pytest.mark.parametrize("level", [pytest.param(v, id=simd.LEVEL_NAMES[v], marks=on_host(v)) for v in INTEGER_LEVELS])
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_integer_kernels_equal_the_portable_ones_over_shapes(qtype: Q, level: int) -> None:
    """Exact integer sums on the integer path, llama.cpp's rounded activations on both: only float32
    summation order may differ. Many shapes (rows past a tile, one block, several) and token counts
    (the 4-token and 1-token kernels, and mixes), since a kernel reading freed scratch fails only for some."""
    rng = np.random.default_rng(11)
    shapes = [(13, 256), (8, 512), (67, 768)] if qtype in K_QUANTS else [(64, 32), (8, 64), (13, 128), (200, 576)]
    for n, k in shapes:
        raw = random_tensor(qtype, n, k, rng)
        fast, portable = (quant.prepare(int(qtype), (n, k), raw, level=v) for v in (level, simd.PORTABLE))
        for tokens in (1, 2, 3, 4, 5, 8, 17):
            x = rng.standard_normal((tokens, k)).astype(np.float32)
            a, b = np.full((tokens, n), np.nan, np.float32), np.empty((tokens, n), np.float32)
            quant.matmul(x, fast, a)
            quant.matmul(x, portable, b)
            assert relative_error(a, b) < 1e-6, f"{n}x{k}, {tokens} tokens"


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_tiles_hold_the_gguf_fields(qtype: Q) -> None:
    """`quant_tiles` loses nothing: every row's fields come back, and dequantize to gguf's values."""
    fmt = quant_tiles.FORMATS[qtype]
    n, k = 21, 2 * fmt.block + (32 if fmt.block == 32 else 0)
    raw = random_tensor(qtype, n, k, np.random.default_rng(2))
    fields = quant_pack.gguf_fields(int(qtype), raw)
    tiles = quant_tiles.to_tiles(fmt, fields)
    assert tiles.shape == (3, k // fmt.block, fmt.block_bytes)
    ids = np.arange(n)[::-1]
    back = quant_tiles.rows_fields(fmt, tiles, ids)
    for name in ("values", "d", "m", "scales", "mins"):
        ours, theirs = getattr(back, name), getattr(fields, name)
        assert (ours is None) == (theirs is None), name
        if ours is not None:
            np.testing.assert_array_equal(ours.view(np.uint8), theirs[ids].view(np.uint8), err_msg=name)
    np.testing.assert_array_equal(quant_tiles.dequantize(fmt, back), reference(qtype, raw, n, k)[ids])


def test_hosts_take_their_best_kernels() -> None:
    """The fast path must not silently fall back: an x86-64 CPU with AVX2 (FMA, F16C) gets the
    integer kernels, and one with AVX-512 VNNI (with VL) or AVX-VNNI their vpdpbusd level."""
    cpuinfo = Path("/proc/cpuinfo")
    chosen = [v for v in ("RBEES_CPU_SIMD", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES") if os.environ.get(v)]
    if os.uname().machine != "x86_64" or not cpuinfo.exists() or chosen:
        pytest.skip(f"not an x86-64 Linux host on its default kernels ({', '.join(chosen) or 'not x86-64 Linux'})")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    expect = simd.PORTABLE
    if {"avx2", "fma", "f16c"} <= flags:
        expect = simd.VNNI if {"avx512_vnni", "avx512vl"} <= flags or "avx_vnni" in flags else simd.AVX2
    assert simd.HOST_LEVEL == simd.LEVEL == expect


def test_q8k_rounding_matches_llama_cpp() -> None:
    """`quant_act`'s Q8_K against the NumPy one above: ties of magnitude pick the first element
    (its sign sets the scale's), an all-zero block stays zero, sums are per 16 or 32 elements."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[0, 10], x[0, 20] = -4.0, 4.0  # the first of equal magnitudes is negative
    x[1, 256:] = 0.0
    for per in (16, 32):
        q8, d, _, sums = qa.quantize_q8k_rows(x, per)
        np.testing.assert_array_equal(q8.astype(np.float32) * np.repeat(d, 256, axis=1), q8k_activations(x))
        np.testing.assert_array_equal(sums, q8.reshape(3, -1, per).sum(axis=-1, dtype=np.int64))
    assert d[0, 0] > 0 and np.all(q8[1, 256:] == 0) and d[1, 1] == 0


@pytest.mark.skipif(simd.LEVEL == simd.PORTABLE, reason="this host runs the portable kernels")
def test_integer_kernels_load_from_numba_cache(tmp_path: Path) -> None:
    """A second process loads a `simd` kernel from Numba's cache instead of compiling it again
    (a kernel built as a closure over its intrinsics missed the cache in every process)."""
    script = (
        "import numpy as np\n"
        "from rbees_workerd.kernels.cpu import quant, quant_tiles, simd\n"
        "w = quant.prepare(3, (8, 32), np.zeros((8, 20), np.uint8))\n"  # Q4_1
        "quant.matmul(np.ones((1, 32), np.float32), w, np.empty((1, 8), np.float32))\n"
        "kernel = simd.matmul_kernel(quant_tiles.FORMATS[3], simd.LEVEL)\n"
        "print(sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values()))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]  # fmt: skip
    assert [r.stdout.split() for r in runs] == [["0", "1"], ["1", "0"]]


def test_fp16_rounding_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.isfinite(values) & (np.abs(values) < 1e6)]
    # also the fp16 subnormal range, exact ties and the overflow edge
    extra = np.float32([2.0**-25, 3 * 2.0**-26, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 65504, 65519, 65520, -0.0])
    values = np.concatenate([values, extra, rng.standard_normal(10_000).astype(np.float32) * 1e-5])
    ours = np.array([qa.fp16_round(v) for v in values], np.float32)
    in_place = values.copy()
    qa.fp16_round_inplace(in_place)
    with np.errstate(over="ignore"):  # values past the fp16 range become inf, as they should
        expect = values.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ours, expect)
    np.testing.assert_array_equal(in_place, expect)


def test_matmul_does_not_depend_on_thread_count() -> None:
    rng = np.random.default_rng(3)
    raw = random_tensor(Q.Q4_1, 300, 576, rng)
    w = quant.prepare(int(Q.Q4_1), (300, 576), raw)
    x = rng.standard_normal((9, 576)).astype(np.float32)
    outs = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            out = np.empty((9, 300), np.float32)
            quant.matmul(x, w, out)
            outs.append(out)
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(outs[0], o) for o in outs)


def test_half_conversion_is_exact_for_every_bit_pattern() -> None:
    bits = np.arange(65536, dtype=np.uint16).reshape(512, 128)
    for qtype, expect in [
        (Q.F16, bits.view(np.float16).astype(np.float32)),
        (Q.BF16, (bits.astype(np.uint32) << 16).view(np.float32)),
    ]:
        w = quant.prepare(int(qtype), (512, 128), bits.view(np.uint8))
        out = np.empty((512, 128), np.float32)
        quant.embed_rows(w, np.arange(512), out)
        np.testing.assert_array_equal(out.view(np.uint32) & 0xFFBFFFFF, expect.view(np.uint32) & 0xFFBFFFFF)


def test_prepare_copies_the_raw_bytes() -> None:
    rng = np.random.default_rng(4)
    raw = random_tensor(Q.Q8_0, 64, 64, rng)
    ref = reference(Q.Q8_0, raw, 64, 64)
    w = quant.prepare(int(Q.Q8_0), (64, 64), raw)
    raw[:] = 0  # the lead closes the memory map after loading
    out = np.empty((2, 64), np.float32)
    quant.embed_rows(w, np.array([0, 63]), out)
    np.testing.assert_allclose(out, ref[[0, 63]], rtol=0, atol=DEQUANT_RTOL * np.abs(ref).max())


def test_memory_stays_close_to_the_gguf_size() -> None:
    """Portable layout: fp16 scales widened to float32. Tiles: the GGUF bytes, but for Q4_K/Q5_K's
    12 bytes of packed 6-bit scales kept as 16 (quant_tiles' docstring)."""
    rng = np.random.default_rng(5)
    for qtype in ALL_TYPES:
        n, k = 256, 768
        raw = random_tensor(qtype, n, k, rng)
        ratio = quant.prepare(int(qtype), (n, k), raw, level=simd.PORTABLE).nbytes / raw.nbytes
        assert ratio <= 1.36, f"{qtype.name}: {ratio:.2f}x"
        if qtype in BLOCK_TYPES:
            tiled = quant.prepare(int(qtype), (n, k), raw, level=simd.AVX2).nbytes / raw.nbytes
            assert tiled == {Q.Q4_K: 148 / 144, Q.Q5_K: 180 / 176}.get(qtype, 1.0), f"{qtype.name}: {tiled:.4f}x"


# ---- errors -------------------------------------------------------------------------------------


def test_prepare_rejects_unsupported_type_and_bad_bytes() -> None:
    with pytest.raises(ModelLoadError) as e:
        quant.prepare(int(Q.Q2_K), (4, 256), np.zeros((4, 84), np.uint8))
    assert e.value.code == "MODEL_LOAD_FAILED"
    with pytest.raises(ModelLoadError, match="Q4_1"):
        quant.prepare(int(Q.Q4_1), (4, 64), np.zeros((4, 39), np.uint8))
    with pytest.raises(ModelLoadError, match="multiple of 32"):
        quant.prepare(int(Q.Q8_0), (4, 48), np.zeros((4, 51), np.uint8))


def test_matmul_and_embed_reject_bad_arguments() -> None:
    w = quant.prepare(int(Q.F32), (8, 32), np.zeros((8, 128), np.uint8))
    with pytest.raises(InvalidParams) as e:
        quant.matmul(np.zeros((2, 31), np.float32), w, np.zeros((2, 8), np.float32))
    assert e.value.code == "INVALID_PARAMS"
    with pytest.raises(InvalidParams):
        quant.matmul(np.zeros((2, 32), np.float64), w, np.zeros((2, 8), np.float32))
    with pytest.raises(InvalidParams):
        quant.matmul(np.zeros((2, 32), np.float32), w, np.zeros((3, 8), np.float32))
    buf = np.zeros(72, np.float32)
    with pytest.raises(InvalidParams, match="overlap"):
        quant.matmul(buf[:64].reshape(2, 32), w, buf[56:].reshape(2, 8))
    with pytest.raises(InvalidParams, match="out of range"):
        quant.embed_rows(w, np.array([8]), np.zeros((1, 32), np.float32))
    with pytest.raises(InvalidParams, match="out of range"):
        quant.embed_rows(w, np.array([-1]), np.zeros((1, 32), np.float32))


# ---- the real model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_reader() -> GGUFReader:
    path = Path(os.environ.get("RBEES_TEST_MODEL", "models-cache/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.exists():
        pytest.skip(f"test model not found at {path} (run `make model`)")
    return GGUFReader(path)


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.3.attn_k.weight", "token_embd.weight"])
def test_real_model_tensors(model_reader: GGUFReader, name: str) -> None:
    t = next(t for t in model_reader.tensors if t.name == name)
    n, k = int(t.shape[1]), int(t.shape[0])
    raw = np.asarray(t.data).view(np.uint8).reshape(n, -1)
    qtype = Q(int(t.tensor_type))
    w = quant.prepare(int(qtype), (n, k), raw)
    ref = reference(qtype, raw, n, k)
    rows = np.array([0, 1, n // 2, n - 1])
    emb = np.empty((4, k), np.float32)
    quant.embed_rows(w, rows, emb)
    np.testing.assert_allclose(emb, ref[rows], rtol=0, atol=DEQUANT_RTOL * np.abs(ref).max())
    x = np.random.default_rng(6).standard_normal((5, k)).astype(np.float32)
    out = np.empty((5, n), np.float32)
    quant.matmul(x, w, out)
    assert relative_error(out, expected_matmul(qtype, raw, ref, x)) < MATMUL_RTOL
