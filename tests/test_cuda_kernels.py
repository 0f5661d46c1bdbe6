"""CUDA kernels against float64 NumPy references and the CPU backend, on tiny shapes.

CI runs this module under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, through
test_cuda_sim.py); on a GPU machine it runs for real. With neither it skips,
unless REQUIRE_REAL_GPU=1 demands a GPU, where it fails.

The products are checked against `ref_product`: the GGUF's dequantized weights (the `gguf`
package) times the input rounded as llama.cpp's CUDA backend rounds it for the weight type
(int8 blocks of 32 with Q8_1's fp16 block sums meeting the mins), in float64.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.cuda

if importlib.util.find_spec("numba_cuda") is None:  # the CPU-only install
    pytest.skip("numba-cuda is not installed", allow_module_level=True)

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import Q4_K, dequantize, quantize  # noqa: E402
from numba import config, cuda  # noqa: E402
from reference import fp16, round_q8  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    if os.environ.get("REQUIRE_REAL_GPU") == "1":
        raise RuntimeError("REQUIRE_REAL_GPU=1 but no CUDA GPU is usable")
    pytest.skip("no CUDA GPU (CI covers these kernels under the simulator)", allow_module_level=True)

from rbees_workerd.engine.sampling import sample_rows  # noqa: E402
from rbees_workerd.kernels.backend import GatedFFN, Norm, Product, RopeStore, SamplingRow  # noqa: E402
from rbees_workerd.kernels.cpu import ops as cpu_ops  # noqa: E402
from rbees_workerd.kernels.cpu.backend import CpuBackend  # noqa: E402
from rbees_workerd.kernels.cuda import (  # noqa: E402
    CudaBackend,
    dense,
    formats,
    gemv,
    hmma,  # noqa: E402
    mma,
    ops,
    rows,
)
from rbees_workerd.kernels.cuda.backend import GEMM_MIN_TOKENS  # noqa: E402
from rbees_workerd.kernels.cuda.mma import KG as MMA_KG  # noqa: E402
from rbees_workerd.kernels.cuda.mma import TOKEN_TILES  # noqa: E402
from rbees_workerd.kernels.cuda.ops import ATT_CHUNK, ATT_KT, SEQ_KT, SEQ_MIN_TOKENS, SEQ_QT  # noqa: E402
from rbees_workerd.kernels.cuda.sample import ARGMAX_TILE  # noqa: E402

QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
KQUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
_SCALE_AT = {Q.Q4_K: slice(0, 4), Q.Q5_K: slice(0, 4), Q.Q6_K: slice(208, 210)}
# one and two tokens take vec_kernel; three the int8 tensor cores (quantized types; from hmma.MIN_TOKENS the
# float16 ones) or the few-token kernel (float weights, which take the GEMM from GEMM_MIN_TOKENS)
COUNTS = (1, 2, 3, GEMM_MIN_TOKENS + 1, hmma.MIN_TOKENS)


@pytest.fixture(scope="module")
def be() -> CudaBackend:
    return CudaBackend(0)


def random_matrix(qtype: Q, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF bytes uint8[n, row_bytes], its float32 dequantization) of a random matrix."""
    if qtype not in _SCALE_AT:  # the gguf package quantizes these itself
        raw = quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)
    else:  # random K-quant blocks with small, finite f16 scales
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8)
        blocks = raw.reshape(n, k // block, size)
        at = _SCALE_AT[qtype]
        scales = (rng.standard_normal(blocks.shape[:2] + ((at.stop - at.start) // 2,)) * 0.02).astype(np.float16)
        blocks[..., at] = scales.view(np.uint8).reshape(blocks.shape[:2] + (-1,))
    return raw, dequantize(raw, qtype).reshape(n, k).astype(np.float32)


def _mins(qtype: Q, raw: np.ndarray) -> np.ndarray:
    """The per-32 mins m[N, K/32] of the types with mins (w = q * d + m), in float64."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, GGML_QUANT_SIZES[qtype][1])
    if qtype in (Q.Q4_1, Q.Q5_1):
        return blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float64)  # [n, b, 1]
    mn = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))[1].reshape(n, -1, 8)
    return (-dmin * mn).reshape(n, -1)


def ref_product(qtype: Q, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x @ W.T as the CUDA kernels compute it, in float64: the input rounded as llama.cpp's CUDA backend
    rounds it for the weight type; Q8_1's mins meet the fp16 block sums fp16(d * sum(q)). Many tokens of a
    quantized type (hmma.MIN_TOKENS) round the input and each weight to float16 on the way, which the
    reference leaves out: compare at _rtol."""
    n, k = raw.shape[0], x.shape[1]
    w = dequantize(raw, qtype).reshape(n, k).astype(np.float64)
    rnd = formats.rounding(int(qtype))
    if rnd == formats.ROUND_F16:
        return fp16(x) @ w.T
    if rnd == formats.ROUND_NONE or len(x) >= hmma.MIN_TOKENS:
        return x.astype(np.float64) @ w.T
    xr, sums = round_q8(x)
    out = xr @ w.T
    if rnd == formats.ROUND_Q8_1:
        mins = _mins(qtype, raw)
        out += (sums - xr.reshape(len(x), -1, 32).sum(-1)) @ mins.T
    return out


def _dev(be: CudaBackend, a: np.ndarray):  # noqa: ANN202
    d = be.zeros(a.shape, a.dtype)
    be.upload(a, d)
    return d


def _dev_cache(be: CudaBackend, values: np.ndarray):  # noqa: ANN202
    """A KV cache on the device (Backend.kv_dtype: float16 bits) of float16 values."""
    return _dev(be, values.astype(np.float16).view(be.kv_dtype))


def _host(be: CudaBackend, a) -> np.ndarray:  # noqa: ANN001
    """A device array on the host, a KV cache's float16 bits as their float32 values."""
    h = be.download(a)
    return h.view(np.float16).astype(np.float32) if h.dtype == np.uint16 else h


def _close(got: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def _rtol(qtype: Q, t: int) -> float:
    """ref_product's tolerance: 1e-3 where the input and weights go through float16 (hmma_kernel)."""
    return 1e-3 if formats.integer(int(qtype)) and t >= hmma.MIN_TOKENS else 1e-4


def _types(sim_few: list[Q]) -> list[Q]:
    """All the types on a GPU; under the slow simulator a few (the others are covered by other tests there)."""
    return sim_few if SIM else QTYPES


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_products_and_embedding_of_every_type(be, qtype):
    """One matrix with a bias at every token count (each kernel family); rows of several super-blocks
    (K-quants) or of 32-blocks that are no multiple of 256 (the others: a lane's last item is missing),
    and an odd row count. The embedding lookup dequantizes the repacked rows exactly."""
    rng = np.random.default_rng(int(qtype))
    n, k = 6, 512 if qtype in KQUANTS else 480
    raw, ref_w = random_matrix(qtype, n, k, rng)
    w = be.weight(int(qtype), (n, k), raw)
    bias = rng.standard_normal(n).astype(np.float32)
    for t in COUNTS if qtype in (Q.Q5_0, Q.Q6_K, Q.Q4_K, Q.BF16, Q.F16) or not SIM else (1, 3):
        x = rng.standard_normal((t, k)).astype(np.float32)
        out = _dev(be, np.full((t, n), np.nan, np.float32))  # poisoned: every element must be written
        be.products(_dev(be, x), [Product(w, out, be.vector(bias))])
        _close(be.download(out), ref_product(qtype, raw, x) + bias, _rtol(qtype, t))
    tokens = np.array([3, 0, 5, 3], np.int32)
    emb = _dev(be, np.full((4, k), np.nan, np.float32))
    be.embed(w, _dev(be, tokens), emb)
    np.testing.assert_array_equal(be.download(emb), ref_w[tokens])


def test_weights_take_the_files_bytes(be):
    """VRAM holds each type in its GGUF bytes (Q4_K, Q5_K: 4 bytes more per 256 elements, their packed
    6-bit scales and mins unpacked to bytes)."""
    rng = np.random.default_rng(3)
    n, k = 4, 512
    for qtype in QTYPES:
        raw = random_matrix(qtype, n, k, rng)[0]
        be.weight(int(qtype), (n, k), raw)  # (the first of a type also takes the type's dummy matrix)
        before = be.memory_bytes()
        be.weight(int(qtype), (n, k), raw)
        extra = 4 * n * k // 256 if qtype in (Q.Q4_K, Q.Q5_K) else 0
        assert be.memory_bytes() - before == raw.nbytes + extra, qtype.name


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16], ids=lambda q: q.name)
def test_few_token_rows_longer_than_one_staged_chunk(be, qtype):
    """Rows past the few-token kernel's KC staged columns (float weights) are summed over several chunks."""
    rng = np.random.default_rng(7)
    n, k = 5, rows.KC + 256
    raw, _ = random_matrix(qtype, n, k, rng)
    w = be.weight(int(qtype), (n, k), raw)
    x = rng.standard_normal((3, k)).astype(np.float32)
    out = _dev(be, np.full((3, n), np.nan, np.float32))
    be.products(_dev(be, x), [Product(w, out)])
    _close(be.download(out), ref_product(qtype, raw, x))


@pytest.mark.parametrize("qtype", _types([Q.Q4_1, Q.Q5_K, Q.Q6_K]), ids=lambda q: q.name)
def test_one_token_product_of_many_rows_a_warp(be, qtype):
    """The one-token product of a matrix of more rows than its warps (the output head), each warp
    loading a row's weights while it sums the one before, and rows longer than one unit of a warp's
    work (several chunks of FETCH_REGS), launched alone and replayed from a graph (whose kernels
    overlap on a GPU): the reference's product."""
    rng = np.random.default_rng(11)
    k = 2048 if SIM else 8192
    assert gemv.chunk_groups(int(qtype), k, 0, gemv.VEC_WARPS) < -(-k // 1024) or qtype in (Q.F16, Q.BF16, Q.F32)
    for n in (gemv.VEC_WARPS, 2 * gemv.VEC_WARPS + 3):
        raw, _ = random_matrix(qtype, n, k, rng)
        w = be.weight(int(qtype), (n, k), raw)
        x = rng.standard_normal((1, k)).astype(np.float32)
        ref = ref_product(qtype, raw, x)
        xd, alone, graphed = _dev(be, x), *(_dev(be, np.full((1, n), np.nan, np.float32)) for _ in "ag")
        be.products(xd, [Product(w, alone)])
        for _ in range(3):  # run, captured the second time, then replayed
            be.run_step(("many rows", qtype, n), lambda: be.products(xd, [Product(w, graphed)]))  # noqa: B023
        for out in (alone, graphed):
            _close(be.download(out), ref)


_MMA_TYPES = [Q.Q4_0, Q.Q5_1, Q.Q4_K, Q.Q6_K] if SIM else [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0] + KQUANTS


@pytest.mark.parametrize("qtype", _MMA_TYPES, ids=lambda q: q.name)
def test_tensor_core_product_of_three_matrices(be, monkeypatch, qtype):
    """Many tokens of a quantized type take the tensor-core product: three matrices sharing an input
    (q, k, v) in one launch, each in row tiles of its own that it fills only partly, the last token
    tile partly past the tokens; launched with K whole and the most token tiles a block, then with K
    split in two and one token tile a block (mma.plan's choices forced); rows whose length is no multiple
    of the kernel's staged 32-blocks (the last stage partly past K) and, for Q5_x, no multiple of 16 bytes
    (word loads); each output the reference's product with its bias."""
    plans = {GEMM_MIN_TOKENS + 1: (TOKEN_TILES[-1], 1), 8 * TOKEN_TILES[-1] + 5: (1, 2)}
    monkeypatch.setattr(mma, "plan", lambda t, *_: plans[t])
    monkeypatch.setattr(hmma, "MIN_TOKENS", 1 << 30)  # (mma_kernel's test: 69 tokens on a GPU)
    rng = np.random.default_rng(11)
    k, ns = 256 if qtype in KQUANTS else 32 * (4 * MMA_KG - 1), (20, 12, 8)
    raws = [random_matrix(qtype, n, k, rng)[0] for n in ns]
    ws = [be.weight(int(qtype), (n, k), raw) for n, raw in zip(ns, raws, strict=True)]
    biases = [rng.standard_normal(n).astype(np.float32) for n in ns]
    for t in plans:
        x = rng.standard_normal((t, k)).astype(np.float32)
        xd = _dev(be, x)
        outs = [_dev(be, np.full((t, n), np.nan, np.float32)) for n in ns]
        prods = [Product(w, o, be.vector(b)) for w, o, b in zip(ws, outs, biases, strict=True)]
        be.run_step(("mma-test", t, qtype), lambda: be.products(xd, prods))  # noqa: B023
        for raw, out, bias in zip(raws, outs, biases, strict=True):
            _close(be.download(out), ref_product(qtype, raw, x) + bias)


@pytest.mark.parametrize("qtype", _MMA_TYPES, ids=lambda q: q.name)
def test_float16_tensor_core_product(be, monkeypatch, qtype):
    """hmma_kernel: many tokens, K split and whole, both token tiles a block that plan takes, rows and tokens past
    the tiles, against the float64 product (the input and each weight rounded to float16 on the way: within
    1e-3 of the largest output). Tokens of inputs past float16's range (1e5) and far below it (1e-6) come out
    alike: each token's input is scaled by a power of two first."""
    monkeypatch.setattr(hmma, "MIN_TOKENS", 0)
    plans = {GEMM_MIN_TOKENS + 1: (hmma.NJ, 1), 8 * hmma.NJ + 5: (hmma.NJ // 2, 2)}
    monkeypatch.setattr(hmma, "plan", lambda t, *_: plans[t])
    rng = np.random.default_rng(12)
    k, n = 512 if qtype in KQUANTS else 480, 20
    raw, w = random_matrix(qtype, n, k, rng)
    wd = be.weight(int(qtype), (n, k), raw)
    for t in plans:
        x = rng.standard_normal((t, k)).astype(np.float32)
        x[1] *= 1e5
        x[2] *= 1e-6
        out = _dev(be, np.full((t, n), np.nan, np.float32))
        be.run_step(("hmma-test", t, qtype), lambda: be.products(_dev(be, x), [Product(wd, out)]))  # noqa: B023
        got, ref = be.download(out), x.astype(np.float64) @ w.astype(np.float64).T
        for sel in ([1], [2], [0, *range(3, t)]):
            _close(got[sel], ref[sel], rtol=1e-3)


@pytest.mark.parametrize("kernel", ["mma", "hmma"])
def test_split_products_add_their_parts_bias_and_residual(be, monkeypatch, kernel):
    """A product split over K in five parts, with a bias and a residual add (out += x @ w.T + b), tokens and rows
    past the tiles: the parts, bias and residual of every output, whichever block of the split comes last."""
    monkeypatch.setattr(hmma, "MIN_TOKENS", 0 if kernel == "hmma" else 1 << 30)
    split = 5
    nj = hmma.NJ if kernel == "hmma" else TOKEN_TILES[-1]
    monkeypatch.setattr(hmma if kernel == "hmma" else mma, "plan", lambda *_: (nj, split))
    rng = np.random.default_rng(13)
    t, n, k = 8 * nj + 3, 20, 768  # (K: 6 stages of mma_kernel, 12 of hmma_kernel; both at least `split`)
    raw, w = random_matrix(Q.Q4_K, n, k, rng)
    wd = be.weight(int(Q.Q4_K), (n, k), raw)
    x = rng.standard_normal((t, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((t, n)).astype(np.float32)
    out = _dev(be, res)
    product = Product(wd, out, be.vector(bias), accumulate=True)
    be.run_step((f"{kernel}-split-test", t), lambda: be.products(_dev(be, x), [product]))
    if kernel == "hmma":  # (float16 roundings of the input and weights: within 1e-3 of the largest output)
        _close(be.download(out), res + x.astype(np.float64) @ w.astype(np.float64).T + bias, rtol=1e-3)
    else:  # (the input rounded to Q8 as llama.cpp's is)
        _close(be.download(out), res + ref_product(Q.Q4_K, raw, x) + bias)


@pytest.mark.parametrize("qtype", _MMA_TYPES, ids=lambda q: q.name)
def test_large_steps_take_cublas(be, monkeypatch, qtype):
    """dense.py (a large step's products: the launch's matrices' rows to float16, the GEMM, the stores): three
    matrices over one input as one of their 280 rows, in chunks of 128 (two of which span two matrices), each
    with a bias and added to its output (the residual), tokens of inputs past float16's range (1e5) and far
    below it (1e-6), against the float64 product (within 1e-3 of the largest output: float16 inputs and weights).
    The step runs three times, the second captured into a graph and the third replaying it on a new input: a
    GEMM the capture missed would leave the old sums."""
    assert dense.available(), "the simulator's NumPy stands in for cuBLAS; on a GPU, cuda.pathfinder finds libcublas"
    monkeypatch.setattr(dense, "ON", True)
    monkeypatch.setattr(dense, "MIN_TOKENS", 16)  # (the simulator's few tokens)
    takes = dense.takes
    monkeypatch.setattr(dense, "takes", lambda t_count, _: takes(t_count, True))  # (the first run's too)
    monkeypatch.setattr(dense, "CHUNK_BYTES", 1)  # (chunks of 128 rows: the least)
    for kernel in (hmma, mma):
        monkeypatch.setattr(kernel, "plan", lambda *_: pytest.fail("a large step took mma or hmma"))
    rng = np.random.default_rng(14)
    t, k, ns = 19, 256 if qtype in KQUANTS else 96, (200, 60, 20)
    mats = [random_matrix(qtype, n, k, rng) for n in ns]
    ws = [be.weight(int(qtype), (n, k), raw) for n, (raw, _) in zip(ns, mats, strict=True)]
    biases = [rng.standard_normal(n).astype(np.float32) for n in ns]
    res = [rng.standard_normal((t, n)).astype(np.float32) for n in ns]
    xs = [rng.standard_normal((t, k)).astype(np.float32) for _ in range(2)]
    for x in xs:
        x[1] *= 1e5
        x[2] *= 1e-6
    outs = [_dev(be, r) for r in res]
    prods = [Product(w, o, be.vector(b), accumulate=True) for w, o, b in zip(ws, outs, biases, strict=True)]
    x_dev = _dev(be, xs[0])
    for run in range(3):
        if run == 2:
            be.upload(xs[1], x_dev)
        be.run_step(("dense-test", qtype), lambda: be.products(x_dev, prods))
    for (_, w), out, r, b in zip(mats, outs, res, biases, strict=True):
        w64 = w.astype(np.float64).T
        got, ref = be.download(out), r + 2 * (xs[0].astype(np.float64) @ w64 + b) + xs[1] @ w64 + b
        for sel in ([1], [2], [0, *range(3, t)]):
            _close(got[sel], ref[sel], rtol=1e-3)


def test_without_cublas_large_steps_keep_the_tensor_core_kernels(monkeypatch):
    """A GPU machine without libcublas (cuda.pathfinder finds none) takes the hmma path, even with the cuBLAS
    path on: `takes` is False rather than a failing step."""
    monkeypatch.setattr(dense, "SIM", False)
    monkeypatch.setattr(dense, "ON", True)
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", None)  # (import fails: no library to load)
    dense._cublas.cache_clear()
    try:
        assert not dense.available() and not dense.takes(4096, True)
    finally:
        dense._cublas.cache_clear()


def test_growing_scratch_drops_the_graphs_that_hold_it(be):
    """dense.py's scratch is captured into the steps' graphs by address: a larger buffer replaces it only
    with the graphs gone (a graph replayed on the freed one would write there); a smaller view keeps them."""
    a = be._scratch("probe", (2, 4), np.float32)
    be._graphs["step"].keep("probe", "a graph holding a")
    assert be._scratch("probe", (3,), np.float32).shape == (3,) and "probe" in be._graphs["step"]
    b = be._scratch("probe", (4, 4), np.float32)
    assert b.shape == (4, 4) and a.shape == (2, 4) and "probe" not in be._graphs["step"]


def test_samplings_of_every_row_count_keep_the_steps_graphs(be):
    """A burst of arrivals samples a different number of rows at nearly every step, each count a graph of its
    own: those must not push a step's graph out (a 2,048-token step run again from Python took 80-140 ms)."""
    from rbees_workerd.kernels.cuda.backend import MAX_GRAPHS

    graphs = be._graphs
    graphs["step"].keep("probe step", "a step's graph")
    for n in range(2 * MAX_GRAPHS):
        graphs["sample"].keep(("probe sampling", n), "a sampling's graph")
    assert "probe step" in graphs["step"] and ("probe sampling", MAX_GRAPHS - 1) not in graphs["sample"]
    be.forget_graphs()
    if SIM:
        return  # the simulator captures nothing: the rest runs on a GPU
    logits = _dev(be, np.random.default_rng(0).standard_normal((2 * MAX_GRAPHS, 300)).astype(np.float32))
    x, idx, out = _dev(be, np.ones((4, 8), np.float32)), _dev(be, np.array([3, 1], np.int32)), be.zeros((2, 8))
    for _ in range(2):  # captured at its second run
        be.run_step("probe step", lambda: be.gather_rows(x, idx, out))
    want = np.argmax(be.download(logits), axis=1)
    for n in range(1, 2 * MAX_GRAPHS + 1):
        for _ in range(2):
            np.testing.assert_array_equal(be.sample(logits[:n], _rows(n, temperature=0.0)), want[:n])
    assert "probe step" in graphs["step"] and len(graphs["sample"]._kept) == MAX_GRAPHS
    np.testing.assert_array_equal(be.download(out), np.ones((2, 8), np.float32))


def test_dense_scratch_is_taken_whole_so_larger_steps_keep_the_graphs(be, monkeypatch):
    """dense.py's scratch is taken at a chunk's most (CHUNK_BYTES) at once: grown step by step, it dropped the
    captured graphs (and the steps seen once) at each larger step, so a worker's warm-up, which runs every padded
    step size from the smallest, left the graphs of its last sizes only and a server's first steps launched
    from Python."""
    monkeypatch.setattr(dense, "ON", True)
    monkeypatch.setattr(dense, "MIN_TOKENS", 16)
    monkeypatch.setattr(dense, "CHUNK_BYTES", 1 << 16)  # (chunks of 128 rows of 256 columns, sums of 128 tokens)
    monkeypatch.setattr(be, "_scratch_bufs", {})
    dropped = []
    monkeypatch.setattr(be, "forget_graphs", lambda: dropped.append(True))
    taken = []
    monkeypatch.setattr(dense, "dequant_kernel", lambda qt, f=dense.dequant_kernel: taken.append(qt) or f(qt))
    rng = np.random.default_rng(16)
    k, n = 256, 200
    w = be.weight(int(Q.Q4_K), (n, k), random_matrix(Q.Q4_K, n, k, rng)[0])
    for t in (17, 40, 100):
        x, out = _dev(be, rng.standard_normal((t, k)).astype(np.float32)), be.zeros((t, n))
        for _ in range(2):
            be.run_step(("growing", t), lambda x=x, out=out: be.products(x, [Product(w, out)]))
    assert len(taken) == 3 * 2 and not dropped  # (each size's second run: two chunks of rows)


def test_a_step_that_runs_once_keeps_the_tensor_core_kernels(be, monkeypatch):
    """A step's first run launches from Python, where cuBLAS's three launches a matrix cost more than they
    save (a burst's prompts: measured on the H100), so it keeps the one-launch kernels; its second run, which
    is captured into a graph, takes cuBLAS (the simulator lowers a repeated step the same way)."""
    monkeypatch.setattr(dense, "ON", True)
    monkeypatch.setattr(dense, "MIN_TOKENS", 16)
    rng = np.random.default_rng(15)
    t, k, ns = 17, 256, (256, 128)
    taken = []
    for kernel in (hmma, mma):  # (which of the two tensor-core kernels takes 17 tokens is theirs to say)
        monkeypatch.setattr(kernel, "plan", lambda *a, f=kernel.plan: taken.append("mma") or f(*a))
    monkeypatch.setattr(dense, "dequant_kernel", lambda qt, f=dense.dequant_kernel: taken.append("dense") or f(qt))
    ws = [be.weight(int(Q.Q4_K), (n, k), random_matrix(Q.Q4_K, n, k, rng)[0]) for n in ns]
    x = _dev(be, rng.standard_normal((t, k)).astype(np.float32))
    step = [[Product(w, be.zeros((t, n)))] for w, n in zip(ws, ns, strict=True)]
    for _ in range(2):
        be.run_step("one-off-test", lambda: [be.products(x, p) for p in step])
    assert taken == ["mma", "mma", "dense", "dense"]


@pytest.mark.parametrize(("value", "on"), [("1", True), ("0", False), ("", True)])
def test_cublas_path_is_on_unless_the_environment_asks(value, on):
    """RBEES_CUDA_DENSE=0 in a worker's environment turns dense.py off (on by default: faster from 96 tokens)."""
    code = "from rbees_workerd.kernels.cuda import dense; print(dense.ON)"
    env = {**os.environ, "RBEES_CUDA_DENSE": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(on)


@pytest.mark.parametrize("sms", [4, 132])
def test_plan_fills_the_gpu_within_its_bounds(sms):
    """mma.plan's choice for products from one row tile to thousands, few tokens to a prompt: a kernel that
    exists, every part of K at least a stage long, partial sums within PART_BYTES; a product of few tiles
    split into many blocks, one of two waves of whole-K blocks or more not split, no token tile of a
    block left empty where fewer would do."""
    for qt in (formats.Q4_K, formats.Q6_K, formats.Q5_0, formats.Q8_0):
        for k in (896, 4096, 14336):
            if qt in KQUANTS and k % 256:
                continue
            chunks = -(-(k // 32) // mma.stage_groups(qt))
            for row_tiles in (1, 7, 32, 224, 1002):
                for t in (3, 8, 16, 64, 256, 512):
                    nj, split = mma.plan(t, row_tiles, k, qt, sms)
                    assert nj in TOKEN_TILES and 1 <= split <= chunks
                    assert split == 1 or split * t * mma.BM * row_tiles * 4 <= mma.PART_BYTES
                    tiles = -(-t // (8 * nj)) * row_tiles
                    if nj > 1:  # (more 8-token tiles a block than the tokens need are never cheaper)
                        assert -(-t // 8) > nj // 2
                    if tiles < sms and chunks >= sms:  # (at least 8 parts, or a block for every SM)
                        assert tiles * split >= min(sms, 8 * tiles), (qt, k, row_tiles, t, nj, split)
                    if tiles >= 2 * mma.SLOTS[nj] * sms:
                        assert split == 1, (qt, k, row_tiles, t, nj, split)


@pytest.mark.parametrize("sms", [4, 132])
def test_float16_plan_fills_the_gpu_within_its_bounds(sms):
    """hmma.plan's choice for products from one row tile to thousands, 16 tokens to a long prompt: NJ or
    NJ / 2 token tiles a block, every part of K at least a stage long, partial sums within PART_BYTES; a
    product of few tiles split in 8 parts or over half the SMs where K's stages allow, one of two waves of
    whole-K blocks or more not split."""
    for k in (896, 4096, 14336):
        chunks = -(-(k // 32) // hmma.KG)
        for row_tiles in (1, 7, 32, 224, 1002):
            for t in (16, 64, hmma.MIN_TOKENS, 128, 512, 4096):
                nj, split = hmma.plan(t, row_tiles, k, formats.Q4_K, sms)
                assert nj in (hmma.NJ // 2, hmma.NJ) and 1 <= split <= chunks
                assert split == 1 or split * t * mma.BM * row_tiles * 4 <= mma.PART_BYTES
                tiles = -(-t // (8 * nj)) * row_tiles
                if tiles < sms and chunks >= sms:  # (at least 8 parts, or blocks for half the SMs)
                    assert tiles * split >= min(sms // 2, 8 * tiles), (k, row_tiles, t, nj, split)
                if tiles >= 2 * hmma.SLOTS * sms:
                    assert split == 1, (k, row_tiles, t, nj, split)


def _norm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm in float32 as the kernels compute it (the norm's input to the rounding)."""
    inv = np.float32(1.0) / np.sqrt(np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True) + np.float32(eps))
    return (x * inv.astype(np.float32) * w).astype(np.float32)


# under the slow simulator: SwiGLU fused into the one-token (K-quants) and few-token (float weights) products,
# into the down product's input preparation of the tensor-core products (K-quants at three tokens), and apart
# from the float GEMM
_SIM_FFN = {(Q.Q4_K, 1), (Q.Q4_K, 3), (Q.Q4_1, 2), (Q.BF16, 3), (Q.BF16, GEMM_MIN_TOKENS + 1)}


@pytest.mark.parametrize("t", COUNTS)
@pytest.mark.parametrize(("gate_t", "down_t"), [(Q.Q4_K, Q.Q6_K), (Q.Q4_1, Q.Q4_1), (Q.BF16, Q.F16)],
                         ids=["q4_k-q6_k", "q4_1", "bf16-f16"])  # fmt: skip
def test_gated_ffn_with_norm_and_residual(be, t, gate_t, down_t):
    """x += down(silu(gate(n)) * up(n)), n = rmsnorm(x): SwiGLU fused into the product for few tokens, into
    the down product's input preparation for many (integer types), apart for the float GEMM; each stage
    against the reference on the device's own input to it."""
    if SIM and (gate_t, t) not in _SIM_FFN:
        pytest.skip("the simulator runs each kernel family's fusion once")
    _check_gated_ffn(be, t, gate_t, down_t)


def test_gated_ffn_on_the_float16_tensor_cores(be, monkeypatch):
    """As above with hmma_kernel from three tokens (the simulator's steps stop short of hmma.MIN_TOKENS): the
    normalized and the gated float16 input preparations."""
    monkeypatch.setattr(hmma, "MIN_TOKENS", 3)
    _check_gated_ffn(be, 3 if SIM else 33, Q.Q4_K, Q.Q6_K)


def _check_gated_ffn(be, t, gate_t, down_t) -> None:  # noqa: ANN001
    rng = np.random.default_rng(9)
    d, f = 256, 256
    raws = {"gate": random_matrix(gate_t, f, d, rng)[0], "up": random_matrix(gate_t, f, d, rng)[0],
            "down": random_matrix(down_t, d, f, rng)[0]}  # fmt: skip
    types = {"gate": gate_t, "up": gate_t, "down": down_t}
    ws = {name: be.weight(int(types[name]), raw.shape[:1] + ((d if name != "down" else f),), raw)
          for name, raw in raws.items()}  # fmt: skip
    nw0 = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    x0 = rng.standard_normal((t, d)).astype(np.float32)
    x, h = _dev(be, x0), _dev(be, np.full((t, d), np.nan, np.float32))
    act, up = (_dev(be, np.full((t, f), np.nan, np.float32)) for _ in "au")
    ffn = GatedFFN(Norm(be.vector(nw0), 1e-5, h), ws["gate"], ws["up"], ws["down"], act, up, x)
    be.run_step(("ffn-test", t, gate_t, hmma.MIN_TOKENS), lambda: be.gated_ffn(x, ffn))
    n = _norm_ref(x0, nw0, 1e-5)
    g, u = ref_product(gate_t, raws["gate"], n), ref_product(gate_t, raws["up"], n)
    got_act = be.download(act)
    rtol = max(2e-4, _rtol(gate_t, t))  # (hmma_kernel's float16 roundings: about 3e-4 of the largest here)
    _close(got_act, g / (1 + np.exp(-g)) * u, rtol)
    _close(be.download(x), x0 + ref_product(down_t, raws["down"], got_act), rtol)
    if t >= 3:  # (the one-token kernel writes the normalized input from one block only: rows it reads)
        _close(be.download(h), n, 1e-5)


def _qkv_setup(be, rng, t, types, neox, bias):  # noqa: ANN001, ANN202
    d, h, g, e, ctx = 256, 4, 2, 16, GEMM_MIN_TOKENS + 8
    shapes = {"q": (h * e, d), "k": (g * e, d), "v": (g * e, d)}
    raws = {nm: random_matrix(types[i], *shapes[nm], rng)[0] for i, nm in enumerate("qkv")}
    x0 = rng.standard_normal((t, d)).astype(np.float32)
    nw0 = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    bk = rng.standard_normal(g * e).astype(np.float32) if bias else None
    cache0 = fp16(rng.standard_normal((2, 3, ctx, g, e))).astype(np.float32)
    slots = np.array([1, 0, 2, 0, 0][:t] + [0] * max(0, t - 5), np.int32)
    pos = np.array([5, 3, 0, 4, 5][:t] + list(range(6, t + 1)), np.int32)
    return raws, shapes, x0, nw0, bk, cache0, slots, pos, (h, g, e)


@pytest.mark.parametrize("t", [1, 2, 3, GEMM_MIN_TOKENS + 1])
@pytest.mark.parametrize(("types", "neox"), [((Q.Q4_K, Q.Q4_K, Q.Q6_K), False), ((Q.Q5_0, Q.Q5_0, Q.Q8_0), True)],
                         ids=["q4_k_m-llama", "fallbacks-neox"])  # fmt: skip
def test_qkv_products_rotate_and_store(be, t, types, neox):
    """q/k/v over one normalized input, a bias on k, then RoPE and the fp16 KV store: one launch a
    weight type for one or two tokens (v of another type than q and k: a launch of its own), the
    products and a rope-and-store launch for more; against the reference, and the cache's other
    rows untouched."""
    if SIM and (t in (1, GEMM_MIN_TOKENS + 1)) != (types[0] == Q.Q4_K):
        pytest.skip("the simulator runs one and many tokens with K-quants, two and three with the fall-backs")
    rng = np.random.default_rng(7)
    raws, shapes, x0, nw0, bk, cache0, slots, pos, (h, g, e) = _qkv_setup(be, rng, t, types, neox, True)
    if t > 5:
        slots[:], pos[:] = 2, np.arange(t)  # a prompt chunk of slot 2
    ws = {nm: be.weight(int(types[i]), shapes[nm], raws[nm]) for i, nm in enumerate("qkv")}
    x, hh = _dev(be, x0), _dev(be, np.zeros_like(x0))
    q, k, v = (_dev(be, np.full((t, n, e), np.nan, np.float32)) for n in (h, g, g))
    ck, cv, sd, pd = _dev_cache(be, cache0[0]), _dev_cache(be, cache0[1]), _dev(be, slots), _dev(be, pos)
    prods = [Product(ws["q"], q.reshape(t, -1)), Product(ws["k"], k.reshape(t, -1), be.vector(bk)),
             Product(ws["v"], v.reshape(t, -1))]  # fmt: skip
    rope = RopeStore(q, k, v, ck, cv, sd, pd, 10000.0, neox)
    be.run_step(("qkv-test", t, types, neox), lambda: be.products(x, prods, Norm(be.vector(nw0), 1e-5, hh), rope))
    n = _norm_ref(x0, nw0, 1e-5)
    refs = {nm: ref_product(types[i], raws[nm], n) for i, nm in enumerate("qkv")}
    refs["k"] += bk
    rq, rk = (refs[nm].reshape(t, -1, e).astype(np.float32) for nm in "qk")
    cpu_ops.rope(rq, pos, 10000.0, neox)
    cpu_ops.rope(rk, pos, 10000.0, neox)
    rv = refs["v"].reshape(t, -1, e)
    _close(be.download(q), rq)
    _close(be.download(k), rk)
    _close(be.download(v), rv)
    ref_ck, ref_cv = cache0[0].copy(), cache0[1].copy()
    ref_ck[slots, pos], ref_cv[slots, pos] = fp16(be.download(k)), fp16(be.download(v))
    np.testing.assert_array_equal(_host(be, ck), ref_ck)
    np.testing.assert_array_equal(_host(be, cv), ref_cv)


@pytest.mark.parametrize("t", [1, GEMM_MIN_TOKENS + 1] if SIM else [1, 3, GEMM_MIN_TOKENS + 1])
def test_products_equal_the_cpu_backend(be, t):
    """The same op records on both backends: q/k/v with norm, bias, rope and store, a residual product,
    the gated FFN; Q4_1, whose activations both round alike (llama.cpp's Q8_1)."""
    cpu = CpuBackend(threads=1)
    rng = np.random.default_rng(5)
    types = (Q.Q4_1,) * 3
    raws, shapes, x0, nw0, bk, cache0, slots, pos, (h, g, e) = _qkv_setup(be, rng, t, types, False, True)
    if t > 5:
        slots[:], pos[:] = 2, np.arange(t)
    wo_raw = random_matrix(Q.Q4_1, 256, h * e, rng)[0]

    def run(b) -> list[np.ndarray]:  # noqa: ANN001
        ws = {nm: b.weight(int(Q.Q4_1), shapes[nm], raws[nm]) for nm in "qkv"}
        wo = b.weight(int(Q.Q4_1), (256, h * e), wo_raw)
        up = (lambda a: _dev(be, a)) if b is be else (lambda a: a.copy())  # noqa: E731
        up_cache = (lambda a: _dev_cache(be, a)) if b is be else (lambda a: a.copy())  # noqa: E731
        x, hh = up(x0), up(np.zeros_like(x0))
        q, k, v, att = (up(np.zeros((t, n, e), np.float32)) for n in (h, g, g, h))
        ck, cv, sd, pd = up_cache(cache0[0]), up_cache(cache0[1]), up(slots), up(pos)

        def step() -> None:
            prods = [Product(ws["q"], q.reshape(t, -1)), Product(ws["k"], k.reshape(t, -1), b.vector(bk)),
                     Product(ws["v"], v.reshape(t, -1))]  # fmt: skip
            b.products(x, prods, Norm(b.vector(nw0), 1e-5, hh), RopeStore(q, k, v, ck, cv, sd, pd, 500.0, False))
            b.attention(q, ck, cv, sd, pd, att, t > 5)
            b.products(att.reshape(t, -1), [Product(wo, x, accumulate=True)])

        b.run_step(("cpu-agreement", t), step)
        return [a if b is cpu else _host(be, a) for a in (q, k, v, ck, cv, att, x)]

    for got, ref in zip(run(be), run(cpu), strict=True):
        _close(got, ref, 2e-4)


# (tokens, qwen3's q/k head norms): one token with the norms takes vec_kernel's plain products and the
# rope-and-store kernel; without them vec_kernel rotates with the table itself; three tokens the rows kernel
ROPE_FEATURES = [(1, True), (1, False), (3, True)]


@pytest.mark.parametrize(("t", "head_norm"), ROPE_FEATURES, ids=["1-qk-norm", "1-vec-rope", "3-qk-norm"])
def test_rope_features_equal_the_cpu_backend(be, t, head_norm):
    """The architectures' RoPE features on both backends: per-pair frequency factors (Llama 3's
    rope_freqs, LongRoPE's), linear frequency scaling, LongRoPE's attention factor on cos and sin,
    qwen3's RMSNorm of each q and k head before the rotation (neox pairs, as qwen3 and phi3), and
    phi3's q scaled after it, then attended with scale 1."""
    cpu = CpuBackend(threads=1)
    rng = np.random.default_rng(11)
    d, h, g, e, ctx = 64, 4, 2, 16, 8
    shapes = {"q": (h * e, d), "k": (g * e, d), "v": (g * e, d)}
    raws = {nm: random_matrix(Q.Q8_0, *shapes[nm], rng)[0] for nm in "qkv"}
    x0 = rng.standard_normal((t, d)).astype(np.float32)
    nw0 = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    qn0, kn0 = ((1 + 0.3 * rng.standard_normal(e)).astype(np.float32) for _ in "qk")
    factors = tuple(float(f) for f in np.linspace(1.0, 8.0, e // 2))
    cache0 = fp16(rng.standard_normal((2, 2, ctx, g, e))).astype(np.float32)
    slots, pos = np.array([1, 0, 1][:t], np.int32), np.array([5, 3, 7][:t], np.int32)

    def run(b) -> list[np.ndarray]:  # noqa: ANN001
        ws = {nm: b.weight(int(Q.Q8_0), shapes[nm], raws[nm]) for nm in "qkv"}
        up = (lambda a: _dev(be, a)) if b is be else (lambda a: a.copy())  # noqa: E731
        up_cache = (lambda a: _dev_cache(be, a)) if b is be else (lambda a: a.copy())  # noqa: E731
        x, hh = up(x0), up(np.zeros_like(x0))
        q, k, v, att = (up(np.zeros((t, n, e), np.float32)) for n in (h, g, g, h))
        ck, cv, sd, pd = up_cache(cache0[0]), up_cache(cache0[1]), up(slots), up(pos)
        norms = (b.vector(qn0), b.vector(kn0), 1e-6) if head_norm else ()
        norms = norms or (None, None, 0.0)
        rope = RopeStore(q, k, v, ck, cv, sd, pd, 500.0, True, factors, 0.5, 1.2, *norms, 0.7)
        prods = [Product(ws["q"], q.reshape(t, -1)), Product(ws["k"], k.reshape(t, -1)),
                 Product(ws["v"], v.reshape(t, -1))]  # fmt: skip
        def step() -> None:
            b.products(x, prods, Norm(b.vector(nw0), 1e-5, hh), rope)
            b.attention(q, ck, cv, sd, pd, att, False, 1.0)

        b.run_step(("rope-features", t, head_norm), step)
        return [a if b is cpu else _host(be, a) for a in (q, k, v, ck, cv, att)]

    got, ref = run(be), run(cpu)
    for a, r in zip(got, ref, strict=True):
        _close(a, r, 2e-4)
    # the features took effect: the CPU's q is the reference's normalized, scaled and rotated one
    n = _norm_ref(x0, nw0, 1e-5)
    rq = ref_product(Q.Q8_0, raws["q"], n).reshape(t, h, e)
    if head_norm:
        rq = rq / np.sqrt(np.mean(rq**2, axis=-1, keepdims=True) + 1e-6) * qn0
    angle = pos[:, None, None] * 0.5 * 500.0 ** (-np.arange(0, e, 2) / e) / np.asarray(factors)
    a, b2 = rq[..., : e // 2], rq[..., e // 2 :]
    cos, sin = 1.2 * np.cos(angle), 1.2 * np.sin(angle)  # the attention factor
    want = 0.7 * np.concatenate([a * cos - b2 * sin, a * sin + b2 * cos], -1)  # then q_scale
    _close(ref[0], want, 2e-4)


def _attend_both(be, q, cache, slots, pos):  # noqa: ANN001, ANN202
    """Attend over caches that hold the step's k/v already, on the device and on the CPU."""
    ck, cv = _dev_cache(be, cache[0]), _dev_cache(be, cache[1])
    out, ref = _dev(be, np.full_like(q, np.nan)), np.zeros_like(q)
    be.attention(_dev(be, q), ck, cv, _dev(be, slots), _dev(be, pos), out)
    cpu_ops.attention(q, cache[0], cache[1], slots, pos, ref)
    return be.download(out), ref


def test_attention_causal_gqa_per_slot_matches_cpu(be):
    rng = np.random.default_rng(2)
    n_heads, g, e, ctx = 4, 2, 8, 16
    # slot 1 decodes its 4th token while slot 0 prefills 5 tokens, in the same step
    slots = np.array([1] + [0] * 5, np.int32)
    pos = np.array([3, 0, 1, 2, 3, 4], np.int32)
    q = rng.standard_normal((6, n_heads, e)).astype(np.float32)
    cache = fp16(rng.standard_normal((2, 2, ctx, g, e))).astype(np.float32)
    out, ref = _attend_both(be, q, cache, slots, pos)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


# the per-token kernel past one chunk of scores (three sweeps over the chunks, recomputing the scores), at a
# chunk's end and on a short context; one block per query head, or one per KV head serving its 3 query heads
# (SmolLM2's grouping), Llama 3's 4 of head size 128 (a smaller K tile beside their scores), or Qwen2.5-0.5B's 7
# (more (position, head) pairs a tile than threads); a head size that leaves lanes of the weighted sum idle
@pytest.mark.parametrize("grouped", [False, True], ids=["head-per-block", "kv-head-per-block"])
@pytest.mark.parametrize("e", [16, 40, 128])
def test_attention_long_context_and_grouped_heads_match_cpu(be, monkeypatch, grouped, e):
    if SIM and e != 40 and not grouped:
        pytest.skip("the simulator covers head sizes 16 and 128 grouped only")
    monkeypatch.setattr(ops, "ATT_GROUP_MIN_BLOCKS", 0 if grouped else 1 << 30)
    rng = np.random.default_rng(8)
    n_heads, g = {16: (14, 2), 40: (6, 2), 128: (8, 2)}[e]
    assert ops.attention_heads_per_block(3, n_heads, g, e) == (n_heads // g if grouped else 1)
    slots = np.array([2, 0, 1], np.int32)
    pos = np.array([ATT_CHUNK + ATT_KT + 4, 1, ATT_CHUNK - 1], np.int32)
    q = rng.standard_normal((3, n_heads, e)).astype(np.float32)
    cache = fp16(rng.standard_normal((2, 3, ATT_CHUNK + ATT_KT + 8, g, e))).astype(np.float32)
    out, ref = _attend_both(be, q, cache, slots, pos)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_attention_groups_llama3_and_qwen_heads_at_the_gpus_sizes(monkeypatch):
    # the GPU's tile, chunk and warps (the simulator's are smaller): 4 heads of 128 a block take a K tile of 32
    # positions beside their 1,024 scores; 7 of 64, one of 64; from 128 blocks of (token, KV head) on
    for name, value in {"ATT_KT": 128, "ATT_CHUNK": 1024, "ATT_WARPS": 8, "ATT_VROWS": 8}.items():
        monkeypatch.setattr(ops, name, value)
    assert ops._att_shape(128, 1) == (64, 4)
    assert ops._att_shape(128, 4) == (32, 2)
    assert ops._att_shape(64, 7) == (64, 4)
    assert ops._att_shape(128, 16) is None  # (16 heads' scores alone take 64 KB)
    assert ops.attention_heads_per_block(64, 32, 8, 128) == 4
    assert ops.attention_heads_per_block(1, 32, 8, 128) == 1
    assert ops.attention_heads_per_block(64, 14, 2, 64) == 7


# a prompt chunk of one slot takes the tiled kernel: from position 0, and after earlier chunks with a tile and a
# bit of queries and a context past one K tile; 3 query heads per KV head (SmolLM2), 4 with head size 128 (Llama 3)
@pytest.mark.parametrize(("t", "start", "heads", "e"),
                         [(SEQ_MIN_TOKENS + 3, 0, (6, 2), 32), (SEQ_QT + 3, SEQ_KT - 7, (3, 1), 16),
                          (SEQ_MIN_TOKENS + 1, 3, (8, 2), 128)],
                         ids=["first-chunk", "later-chunk", "head-128"])  # fmt: skip
def test_attention_prompt_chunk_matches_cpu(be, t, start, heads, e):
    rng = np.random.default_rng(6)
    slots = np.full(t, 1, np.int32)
    pos = np.arange(start, start + t, dtype=np.int32)
    q = rng.standard_normal((t, heads[0], e)).astype(np.float32)
    cache = fp16(rng.standard_normal((2, 2, start + t + 2, heads[1], e))).astype(np.float32)
    ck, cv, sd, pd = _dev_cache(be, cache[0]), _dev_cache(be, cache[1]), _dev(be, slots), _dev(be, pos)
    qd, tiled, per_token = _dev(be, q), *(_dev(be, np.full_like(q, np.nan)) for _ in "tp")
    be.attention(qd, ck, cv, sd, pd, tiled, one_sequence=True)
    be.attention(qd, ck, cv, sd, pd, per_token)
    ref = np.zeros_like(q)
    cpu_ops.attention(q, cache[0], cache[1], slots, pos, ref)
    got = be.download(tiled)
    # a GPU's fast exp can flip an fp16-rounded weight against the CPU's
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # the tensor cores sum a score's products in an order of their own: a score can differ from the per-token
    # kernel's in its last bit and flip one fp16-rounded weight (one fp16 step of one weight, ~1e-5 of the
    # row). Every row but such a few agrees to float32 rounding; a wrong tile, mask or scale would move most.
    tight = np.isclose(got, be.download(per_token), rtol=1e-5, atol=1e-6).all(axis=-1)
    assert tight.mean() >= 0.95, f"{(~tight).sum()} of {tight.size} (token, head) rows differ from the per-token kernel"


def test_gather_rows(be):
    x = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    rows_ = np.array([2, 0], np.int32)
    out = _dev(be, np.zeros((2, 40), np.float32))
    be.gather_rows(_dev(be, x), _dev(be, rows_), out)
    np.testing.assert_array_equal(be.download(out), x[rows_])

def _rows(n: int, **kw: float) -> list[SamplingRow]:
    base = dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, uniform=0.5)
    base.update(kw)
    return [SamplingRow(history=np.array([1, 4, 4], np.int32), **base) for _ in range(n)]


_SAMPLING = [dict(temperature=0.0, repetition_penalty=1.3),
             dict(top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, temperature=1.3)]  # fmt: skip
if not SIM:  # each filter alone too; the simulator takes seconds per sampled row, so CI runs the two above
    _SAMPLING += [dict(temperature=0.0), dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2)]


@pytest.mark.parametrize("params", _SAMPLING)
def test_sample_matches_cpu_sampler(be, params):
    rng = np.random.default_rng(4)
    vocab = 300
    n_rows = 1 if SIM else 3  # the simulator runs a Python thread per GPU thread: keep it short there
    logits = (rng.standard_normal((n_rows, vocab)) * 3).astype(np.float32)
    logits[0, 4] = logits[0].max() + 0.1  # the penalized history token leads row 0
    dev = _dev(be, logits)
    for u in (0.37,) if SIM else (0.05, 0.37, 0.81):
        rows = _rows(n_rows, uniform=u, **params)
        got = be.sample(dev, rows)
        np.testing.assert_array_equal(got, sample_rows(logits, rows))
    np.testing.assert_array_equal(be.download(dev), logits)  # the caller's logits are untouched


def test_sample_greedy_ties_pick_lowest_id(be):
    logits = np.zeros((1, 50), np.float32)
    logits[0, [7, 30]] = 2.0
    assert be.sample(_dev(be, logits), _rows(1, temperature=0.0)).tolist() == [7]


def test_sample_greedy_skips_nan_and_reads_every_logit(be):
    """Greedy rows without a penalty take argmax_kernel, several blocks per row: NaN never wins, and the
    winner may sit anywhere, here past several blocks."""
    vocab = 300 if SIM else 5000
    logits = np.random.default_rng(6).standard_normal((2, vocab)).astype(np.float32)
    logits[0, 3] = np.nan
    logits[0, vocab - 2] = 9.0
    logits[1, :] = np.nan
    logits[1, vocab // 2] = -1.0
    got = be.sample(_dev(be, logits), _rows(2, temperature=0.0))
    assert got.tolist() == [vocab - 2, vocab // 2]


def _greedy(n: int, **kw: float) -> list[SamplingRow]:
    hist = np.array([0, 0], np.int32)  # an id every vocabulary below holds
    return [dataclasses.replace(r, history=hist) for r in _rows(n, temperature=0.0, **kw)]


def test_sample_greedy_ties_across_blocks_and_special_values(be):
    """Each block of argmax_kernel reduces a tile of the row and the tiles' maxima combine by an atomic
    maximum of (value, inverted id): the lowest id must win ties between tiles, NaN must count as -inf,
    -0 equal +0, and denormals keep their order, as in the CPU sampler."""
    tile = ARGMAX_TILE
    vocab = 3 * tile + 5  # a last tile of 5
    x = np.zeros((9, vocab), np.float32)
    x[0, [tile - 1, tile, 2 * tile, 3 * tile + 4]] = 5.0  # the end of tile 0 against the start of tile 1
    x[1, [3 * tile + 4, 2 * tile + 1]] = 5.0  # ties in the last tiles only
    x[2, :] = np.nan
    x[2, 2 * tile + 3] = -np.inf  # all NaN or -inf: id 0, as the CPU's argmax of all -inf
    x[3, :] = -np.inf
    x[4, [7, 2 * tile]] = np.inf
    x[4, 0] = np.nan
    x[5, :] = -1.0
    x[5, [3, tile + 2]] = [np.nan, -0.0]
    x[5, 2 * tile + 1] = 0.0  # -0 at tile + 2 ties with +0 and has the lower id
    x[6, :] = np.float32(1e-45)
    x[6, tile + 2] = np.float32(3e-45)  # the largest denormal wins (fastmath compares may flush them)
    x[7, :] = -3.0
    x[7, vocab - 1] = -2.5  # the very last logit
    x[8, :] = np.nan
    x[8, 0] = np.inf  # +inf at id 0, NaN (whose bits order above +inf) elsewhere
    got = be.sample(_dev(be, x), _greedy(9))
    np.testing.assert_array_equal(got, sample_rows(x, _greedy(9)))
    assert got.tolist() == [tile - 1, 2 * tile + 1, 0, 0, 7, tile + 2, tile + 2, vocab - 1, 0]


@pytest.mark.parametrize("vocab", [1, ARGMAX_TILE - 1, ARGMAX_TILE, 2 * ARGMAX_TILE + 1, 5000])
def test_sample_greedy_many_rows_and_vocab_sizes(be, vocab):
    """Up to 256 rows (fewer under the simulator) of vocabularies below, at and past the tile; a second
    call on new logits in the same array checks that each launch leaves the row maxima and counters reset."""
    if SIM and vocab > 2 * ARGMAX_TILE + 1:
        pytest.skip("the simulator runs a Python thread per GPU thread")
    n_rows = 256 if not SIM else (17 if vocab <= ARGMAX_TILE else 5)
    rng = np.random.default_rng(vocab)
    dev = be.zeros((n_rows, vocab), np.float32)
    for _ in range(2):
        x = rng.standard_normal((n_rows, vocab)).astype(np.float32)
        x[::3] = np.round(x[::3])  # many ties
        be.upload(x, dev)
        np.testing.assert_array_equal(be.sample(dev, _greedy(n_rows)), sample_rows(x, _greedy(n_rows)))


def test_sample_mixed_greedy_and_penalized_rows(be):
    """A batch of greedy rows (argmax_kernel) and greedy rows with a penalty (sample_kernel) in one call;
    each row is written by one kernel only, also on replays with other logits."""
    vocab = 2 * ARGMAX_TILE + 3
    rng = np.random.default_rng(8)
    rows = _greedy(5)
    for i in (1, 4):
        rows[i] = dataclasses.replace(rows[i], repetition_penalty=2.0, history=np.array([2, 0, 2], np.int32))
    dev = be.zeros((5, vocab), np.float32)
    for _ in range(2):
        x = rng.standard_normal((5, vocab)).astype(np.float32)
        x[:, 2] = 6.0  # a history token leads, by less than the penalty takes
        x[:, ARGMAX_TILE + 1] = 4.0
        be.upload(x, dev)
        got = be.sample(dev, rows)
        np.testing.assert_array_equal(got, sample_rows(x, rows))
        assert got.tolist() == [2, ARGMAX_TILE + 1, 2, 2, ARGMAX_TILE + 1]


def test_sample_mixed_greedy_and_sampled_rows(be):
    """Greedy, greedy with a penalty and sampled rows in one batch, against the CPU sampler."""
    vocab, n_rows = (150, 4) if SIM else (3000, 6)  # the simulator takes seconds per sampled row
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((n_rows, vocab)) * 3).astype(np.float32)
    dev = _dev(be, x)
    for u in (0.5,) if SIM else (0.05, 0.5, 0.95):
        rows = _greedy(n_rows, uniform=u)
        rows[1] = dataclasses.replace(rows[1], temperature=0.9, top_k=40)
        rows[3] = dataclasses.replace(rows[3], repetition_penalty=1.3)
        if not SIM:
            rows[4] = dataclasses.replace(rows[4], temperature=1.1, top_p=0.8, repetition_penalty=1.2)
        np.testing.assert_array_equal(be.sample(dev, rows), sample_rows(x, rows))

