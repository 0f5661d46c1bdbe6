"""CUDA kernels against NumPy and the CPU backend, on tiny shapes.

CI runs this module under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, through
test_cuda_sim.py); on a GPU machine it runs for real. With neither it skips,
unless REQUIRE_REAL_GPU=1 demands a GPU, where it fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import pytest

pytestmark = pytest.mark.cuda

if importlib.util.find_spec("numba_cuda") is None:  # the CPU-only install
    pytest.skip("numba-cuda is not installed", allow_module_level=True)

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
from numba import config, cuda  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    if os.environ.get("REQUIRE_REAL_GPU") == "1":
        raise RuntimeError("REQUIRE_REAL_GPU=1 but no CUDA GPU is usable")
    pytest.skip("no CUDA GPU (CI covers these kernels under the simulator)", allow_module_level=True)

from rbees_workerd.engine.sampling import sample_rows  # noqa: E402
from rbees_workerd.kernels.backend import SamplingRow  # noqa: E402
from rbees_workerd.kernels.cpu import ops as cpu_ops  # noqa: E402
from rbees_workerd.kernels.cpu import quant as cpu_quant  # noqa: E402
from rbees_workerd.kernels.cpu.backend import CpuBackend  # noqa: E402
from rbees_workerd.kernels.cuda import CudaBackend, ops  # noqa: E402
from rbees_workerd.kernels.cuda.matmul import GEMM_MIN_TOKENS, KC, MMA_BN, VEC_WARPS  # noqa: E402
from rbees_workerd.kernels.cuda.ops import ATT_CHUNK, ATT_KT, SEQ_KT, SEQ_MIN_TOKENS, SEQ_QT  # noqa: E402
from rbees_workerd.kernels.cuda.sample import ARGMAX_TILE  # noqa: E402

QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
_SCALE_AT = {Q.Q4_K: slice(0, 4), Q.Q5_K: slice(0, 4), Q.Q6_K: slice(208, 210)}


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


def _dev(be: CudaBackend, a: np.ndarray):  # noqa: ANN202
    d = be.zeros(a.shape, a.dtype)
    be.upload(a, d)
    return d


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_matmul_and_embed_every_type(be, qtype):
    rng = np.random.default_rng(int(qtype))
    n, k = 6, 256
    raw, ref_w = random_matrix(qtype, n, k, rng)
    w = be.weight(int(qtype), (n, k), raw)
    cpu_w = cpu_quant.prepare(int(qtype), (n, k), raw)
    bias = rng.standard_normal(n).astype(np.float32)
    # one token, a tile of several (both the few-token kernel), and the tiled GEMM of many
    counts = (1, 5, GEMM_MIN_TOKENS + 1) if qtype in (Q.Q4_1, Q.Q6_K, Q.Q5_K, Q.BF16, Q.F16) or not SIM else (1, 5)
    for t in counts:
        x = rng.standard_normal((t, k)).astype(np.float32)
        out = _dev(be, np.full((t, n), np.nan, np.float32))  # poisoned: every element must be written
        be.matmul(_dev(be, x), w, out, be.vector(bias))
        # the CPU kernels round activations like llama.cpp for some types, the CUDA ones must too; but
        # K-quants: llama.cpp's CPU rounds them to Q8_K (as ours), its CUDA path (and ours) does not
        if qtype in _SCALE_AT:
            ref = (x.astype(np.float64) @ ref_w.T.astype(np.float64)).astype(np.float32)
        else:
            ref = np.empty((t, n), np.float32)
            cpu_quant.matmul(x, cpu_w, ref)
        ref += bias
        np.testing.assert_allclose(be.download(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    tokens = np.array([3, 0, 5, 3], np.int32)
    emb = _dev(be, np.full((4, k), np.nan, np.float32))
    be.embed(w, _dev(be, tokens), emb)
    np.testing.assert_array_equal(be.download(emb), ref_w[tokens])


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_matmul_rows_longer_than_one_staged_chunk(be, qtype):
    """Rows past the few-token kernel's KC staged columns are summed over several chunks."""
    rng = np.random.default_rng(7)
    n, k = 5, KC + 64
    raw, _ = random_matrix(qtype, n, k, rng)
    w = be.weight(int(qtype), (n, k), raw)
    cpu_w = cpu_quant.prepare(int(qtype), (n, k), raw)
    for t in (1, 3):
        x = rng.standard_normal((t, k)).astype(np.float32)
        out = _dev(be, np.full((t, n), np.nan, np.float32))
        be.matmul(_dev(be, x), w, out)
        ref = np.empty((t, n), np.float32)
        cpu_quant.matmul(x, cpu_w, ref)
        np.testing.assert_allclose(be.download(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q8_0], ids=lambda q: q.name)
def test_one_token_product_of_many_rows_a_warp(be, qtype):
    """The one-token product of a matrix of more rows than its warps (the output head), each warp
    loading a row's weights while it sums the one before, launched alone and replayed from a graph
    (whose kernels overlap on a GPU), equals the CPU's product; also with every warp one row."""
    rng = np.random.default_rng(11)
    k = 256
    for n in (VEC_WARPS, 2 * VEC_WARPS + 3):
        raw, _ = random_matrix(qtype, n, k, rng)
        w = be.weight(int(qtype), (n, k), raw)
        x = rng.standard_normal((1, k)).astype(np.float32)
        ref = np.empty((1, n), np.float32)
        cpu_quant.matmul(x, cpu_quant.prepare(int(qtype), (n, k), raw), ref)
        xd, alone, graphed = _dev(be, x), *(_dev(be, np.full((1, n), np.nan, np.float32)) for _ in "ag")
        be.matmul(xd, w, alone)
        for _ in range(2):  # captured, then replayed
            be.run_step(("many rows", qtype, n), lambda: be.matmul(xd, w, graphed))  # noqa: B023
        for out in (alone, graphed):
            np.testing.assert_allclose(be.download(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


_MMA_TYPES = [Q.Q4_0, Q.Q5_1, Q.Q8_0] if SIM else [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


@pytest.mark.parametrize("qtype", _MMA_TYPES, ids=lambda q: q.name)
def test_tensor_core_product_of_three_matrices(be, qtype):
    """Many tokens of an integer weight type take the tensor-core product: three matrices sharing an
    input (q, k, v) in one launch, each in row tiles of its own that it fills only partly, the last
    token tile partly past the tokens; each output as the CPU's product with its bias."""
    rng = np.random.default_rng(11)
    k, ns = 128, (20, 12, 8)
    raws = [random_matrix(qtype, n, k, rng)[0] for n in ns]
    ws = [be.weight(int(qtype), (n, k), raw) for n, raw in zip(ns, raws, strict=True)]
    biases = [rng.standard_normal(n).astype(np.float32) for n in ns]
    for t in (GEMM_MIN_TOKENS + 1, MMA_BN + 5):
        x = rng.standard_normal((t, k)).astype(np.float32)
        xd = _dev(be, x)
        outs = [_dev(be, np.full((t, n), np.nan, np.float32)) for n in ns]
        bs = [be.vector(b) for b in biases]
        def step(x=xd, sets=tuple(zip(ws, outs, bs, strict=True))) -> None:  # noqa: ANN001 - bound now
            for a in sets:
                be.matmul(x, *a)

        be.run_step(("mma-test", t, qtype), step)
        for n, raw, out, bias in zip(ns, raws, outs, biases, strict=True):
            ref = np.empty((t, n), np.float32)
            cpu_quant.matmul(x, cpu_quant.prepare(int(qtype), (n, k), raw), ref)
            ref += bias
            np.testing.assert_allclose(be.download(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_norm_rope_swiglu_add_gather_match_cpu(be):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    out, ref = _dev(be, np.zeros_like(x)), np.zeros_like(x)
    be.rmsnorm(_dev(be, x), be.vector(w), 1e-5, out)
    cpu_ops.rmsnorm(x, w, 1e-5, ref)
    np.testing.assert_allclose(be.download(out), ref, rtol=1e-5, atol=1e-6)

    pos = np.array([0, 7, 300], np.int32)
    for neox in (False, True):
        q = rng.standard_normal((3, 2, 16)).astype(np.float32)
        qd, ref = _dev(be, q), q.copy()
        be.rope(qd, _dev(be, pos), 10000.0, neox)
        cpu_ops.rope(ref, pos, 10000.0, neox)
        np.testing.assert_allclose(be.download(qd), ref, rtol=1e-5, atol=1e-5)

    g, u = rng.standard_normal((2, 3, 40)).astype(np.float32)
    out, ref = _dev(be, np.zeros_like(g)), np.zeros_like(g)
    be.swiglu(_dev(be, g), _dev(be, u), out)
    cpu_ops.swiglu(g, u, ref)
    np.testing.assert_allclose(be.download(out), ref, rtol=1e-5, atol=1e-6)

    xd = _dev(be, x)
    be.add(xd, _dev(be, g))
    np.testing.assert_allclose(be.download(xd), x + g, rtol=1e-6)

    rows = np.array([2, 0], np.int32)
    out = _dev(be, np.zeros((2, 40), np.float32))
    be.gather_rows(_dev(be, x), _dev(be, rows), out)
    np.testing.assert_array_equal(be.download(out), x[rows])


def _attend_both(be, q, k, v, cache, slots, pos):  # noqa: ANN001, ANN202
    """Store k/v and attend on the device and on the CPU: (out, ref, device caches, CPU caches)."""
    ref_k, ref_v = cache[0].copy(), cache[1].copy()
    ck, cv = _dev(be, cache[0]), _dev(be, cache[1])
    out, ref = _dev(be, np.full_like(q, np.nan)), np.zeros_like(q)
    be.attention(_dev(be, q), _dev(be, k), _dev(be, v), ck, cv, _dev(be, slots), _dev(be, pos), out)
    cpu_ops.kv_store(k, v, ref_k, ref_v, slots, pos)
    cpu_ops.attention(q, ref_k, ref_v, slots, pos, ref)
    return out, ref, ck, cv, ref_k, ref_v


def test_attention_causal_gqa_per_slot_matches_cpu(be):
    rng = np.random.default_rng(2)
    n_heads, g, e, ctx = 4, 2, 8, 16
    # slot 1 decodes its 4th token while slot 0 prefills 5 tokens, in the same step
    slots = np.array([1] + [0] * 5, np.int32)
    pos = np.array([3, 0, 1, 2, 3, 4], np.int32)
    q, k, v = (rng.standard_normal((6, h, e)).astype(np.float32) for h in (n_heads, g, g))
    cache = rng.standard_normal((2, 2, ctx, g, e)).astype(np.float32)  # slot 1 holds 3 earlier tokens
    out, ref, ck, cv, ref_k, ref_v = _attend_both(be, q, k, v, cache, slots, pos)
    np.testing.assert_array_equal(be.download(ck), ref_k)
    np.testing.assert_array_equal(be.download(cv), ref_v)
    np.testing.assert_allclose(be.download(out), ref, rtol=1e-4, atol=1e-5)


# the per-token kernel past one chunk of scores (three sweeps over the chunks, recomputing the scores), at a
# chunk's end and on a short context; one block per query head, or one per KV head serving its 3 query heads
# (SmolLM2's grouping); a head size that leaves lanes of the weighted sum idle
@pytest.mark.parametrize("grouped", [False, True], ids=["head-per-block", "kv-head-per-block"])
def test_attention_long_context_and_grouped_heads_match_cpu(be, monkeypatch, grouped):
    monkeypatch.setattr(ops, "ATT_GROUP_MIN_BLOCKS", 0 if grouped else 1 << 30)
    rng = np.random.default_rng(8)
    (n_heads, g), e = (6, 2), 40
    assert ops.attention_heads_per_block(3, n_heads, g, e) == (n_heads // g if grouped else 1)
    slots = np.array([2, 0, 1], np.int32)
    pos = np.array([ATT_CHUNK + ATT_KT + 4, 1, ATT_CHUNK - 1], np.int32)
    q, k, v = (rng.standard_normal((3, h, e)).astype(np.float32) for h in (n_heads, g, g))
    cache = rng.standard_normal((2, 3, ATT_CHUNK + ATT_KT + 8, g, e)).astype(np.float32)
    cache = cache.astype(np.float16).astype(np.float32)  # the cache holds fp16 values
    out, ref = _attend_both(be, q, k, v, cache, slots, pos)[:2]
    np.testing.assert_allclose(be.download(out), ref, rtol=1e-4, atol=1e-4)


# a prompt chunk of one slot takes the tiled kernel: from position 0 (in a step, after the fused rope and
# store), and after earlier chunks with a tile and a bit of queries and a context past one K tile; 3 query
# heads per KV head, like SmolLM2
@pytest.mark.parametrize(("t", "start", "heads", "e", "step"),
                         [(SEQ_MIN_TOKENS + 3, 0, (6, 2), 32, True), (SEQ_QT + 3, SEQ_KT - 7, (3, 1), 16, False)],
                         ids=["first-chunk-in-step", "later-chunk"])  # fmt: skip
def test_attention_prompt_chunk_matches_cpu(be, t, start, heads, e, step):
    rng = np.random.default_rng(6)
    slots = np.full(t, 1, np.int32)
    pos = np.arange(start, start + t, dtype=np.int32)
    q, k, v = (rng.standard_normal((t, h, e)).astype(np.float32) for h in (heads[0], heads[1], heads[1]))
    cache = rng.standard_normal((2, 2, start + t + 2, heads[1], e)).astype(np.float32)
    ref_q, ref_k, ref_ck, ref_cv = q.copy(), k.copy(), cache[0].copy(), cache[1].copy()
    qd, kd, vd, ck, cv = (_dev(be, a) for a in (q, k, v, cache[0], cache[1]))
    sd, pd, out = _dev(be, slots), _dev(be, pos), _dev(be, np.full_like(q, np.nan))

    def run() -> None:
        if step:
            be.rope(qd, pd, 500.0, False)
            be.rope(kd, pd, 500.0, False)
        be.attention(qd, kd, vd, ck, cv, sd, pd, out, one_sequence=True)

    if step:
        be.run_step(("prompt-chunk-test", t), run)
        cpu_ops.rope(ref_q, pos, 500.0, False)
        cpu_ops.rope(ref_k, pos, 500.0, False)
    else:
        run()
    ref = np.zeros_like(q)
    cpu_ops.kv_store(ref_k, v, ref_ck, ref_cv, slots, pos)
    cpu_ops.attention(ref_q, ref_ck, ref_cv, slots, pos, ref)
    np.testing.assert_allclose(be.download(ck), ref_ck, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(be.download(cv), ref_cv)
    got = be.download(out)
    # a GPU's fast exp can flip an fp16-rounded weight against the CPU's; the per-token kernel shares it
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    per_token = _dev(be, np.full_like(q, np.nan))
    be.attention(qd, kd, vd, ck, cv, sd, pd, per_token)  # stores the same rows again
    np.testing.assert_allclose(got, be.download(per_token), rtol=1e-5, atol=1e-6)


# few tokens: the product normalizes (and, for Q4_1, rounds) its input itself; many: a rounding kernel does.
# Two tokens take vec_kernel, three the few-token kernel, GEMM_MIN_TOKENS + 1 the GEMM.
@pytest.mark.parametrize(("t", "qtype"), [(3, Q.BF16), (2, Q.Q4_1), (GEMM_MIN_TOKENS + 1, Q.Q4_1)],
                         ids=["rows-bf16", "vec-q4_1", "gemm-q4_1"])  # fmt: skip
def test_fused_step_equals_separate_ops(be, t, qtype):
    """run_step fuses norm + q/k/v, norm + gate/up + SwiGLU and projection + residual add; same results."""
    rng = np.random.default_rng(3)
    d, f = 32, 32
    mats = {name: be.weight(int(qtype), shape, random_matrix(qtype, *shape, rng)[0])
            for name, shape in {"q": (d, d), "k": (32, d), "v": (32, d), "gate": (f, d), "up": (f, d),
                                "down": (d, f)}.items()}  # fmt: skip
    bq = be.vector(rng.standard_normal(d).astype(np.float32))
    nw = be.vector(rng.standard_normal(d).astype(np.float32))
    x0 = (rng.standard_normal((t, d)) * 0.05).astype(np.float32)  # small: silu of two steps stays finite

    def run(fused: bool) -> list[np.ndarray]:
        x, h = _dev(be, x0), _dev(be, x0 * 0.5)
        q, k, v = _dev(be, np.zeros((t, d), np.float32)), *(_dev(be, np.zeros((t, 32), np.float32)) for _ in "kv")
        gate, up = (_dev(be, np.zeros((t, f), np.float32)) for _ in "gu")

        def step() -> None:
            be.rmsnorm(x, nw, 1e-5, h)
            be.matmul(h, mats["q"], q, bq)
            be.matmul(h, mats["k"], k)
            be.matmul(h, mats["v"], v)
            be.add(x, q)
            be.rmsnorm(x, nw, 1e-5, h)
            be.matmul(h, mats["gate"], gate)
            be.matmul(h, mats["up"], up)
            be.swiglu(gate, up, gate)
            be.matmul(gate, mats["down"], h)
            be.add(x, h)

        if fused:
            be.run_step(("fused-test", t, qtype), step)
            be.run_step(("fused-test", t, qtype), step)  # a replay (a CUDA graph on a GPU) does the same again
        else:
            step()
            step()
        return [be.download(a) for a in (x, h, q, k, v, gate, up)]

    for got, ref in zip(run(True), run(False), strict=True):  # the same math, rounded in another order
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


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


def test_fused_rope_and_store_equal_cpu(be):
    """In a step, rope(q), rope(k) and the KV store become one launch; results must match the CPU."""
    rng = np.random.default_rng(5)
    slots = np.array([1, 0, 0, 0], np.int32)
    pos = np.array([2, 0, 1, 2], np.int32)
    q, k, v = (rng.standard_normal((4, h, 8)).astype(np.float32) for h in (4, 2, 2))
    cache = rng.standard_normal((2, 2, 6, 2, 8)).astype(np.float32)
    ref_q, ref_k, ref_v, ref_ck, ref_cv = q.copy(), k.copy(), v.copy(), cache[0].copy(), cache[1].copy()
    cpu_ops.rope(ref_q, pos, 500.0, False)
    cpu_ops.rope(ref_k, pos, 500.0, False)
    cpu_ops.kv_store(ref_k, ref_v, ref_ck, ref_cv, slots, pos)
    ref = np.zeros_like(q)
    cpu_ops.attention(ref_q, ref_ck, ref_cv, slots, pos, ref)
    qd, kd, vd, ck, cv = (_dev(be, a) for a in (q, k, v, cache[0], cache[1]))
    sd, pd, out = _dev(be, slots), _dev(be, pos), _dev(be, np.full_like(q, np.nan))

    def step() -> None:
        be.rope(qd, pd, 500.0, False)
        be.rope(kd, pd, 500.0, False)
        be.attention(qd, kd, vd, ck, cv, sd, pd, out)

    be.run_step("rope-store-test", step)
    np.testing.assert_allclose(be.download(qd), ref_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(be.download(ck), ref_ck, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(be.download(cv), ref_cv)
    np.testing.assert_allclose(be.download(out), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("t", "neox"), [(1, False), (2, True)], ids=["1-token-llama", "2-tokens-neox"])
def test_qkv_product_rotates_and_stores_itself(be, t, neox):
    """For one or two tokens the q/k/v product also does RoPE and the KV store (one launch for
    norm, products, rotation and cache); the CPU backend runs the same ops one by one."""
    cpu = CpuBackend(threads=1)
    rng = np.random.default_rng(7)
    d, h, g, e, ctx = 64, 4, 2, 16, 8
    shapes = {"q": (h * e, d), "k": (g * e, d), "v": (g * e, d)}
    raws = {n: random_matrix(Q.Q4_1, *sh, rng)[0] for n, sh in shapes.items()}
    x0 = rng.standard_normal((t, d)).astype(np.float32)
    nw0, bias0 = rng.standard_normal(d).astype(np.float32), rng.standard_normal(g * e).astype(np.float32)
    cache0 = rng.standard_normal((2, 2, ctx, g, e)).astype(np.float32)
    slots, pos = np.array([1, 0][:t], np.int32), np.array([5, 3][:t], np.int32)

    def run(b, record: bool) -> list[np.ndarray]:  # noqa: ANN001
        ws = {n: b.weight(int(Q.Q4_1), shapes[n], raws[n]) for n in shapes}
        up = (lambda a: _dev(be, a)) if b is be else (lambda a: a.copy())  # noqa: E731
        x, hh, nw, bias = up(x0), up(np.zeros_like(x0)), b.vector(nw0), b.vector(bias0)
        q, k, v = (up(np.zeros((t, n, e), np.float32)) for n in (h, g, g))
        ck, cv, sd, pd, out = up(cache0[0]), up(cache0[1]), up(slots), up(pos), up(np.zeros((t, h, e), np.float32))

        def step() -> None:
            b.rmsnorm(x, nw, 1e-5, hh)
            b.matmul(hh, ws["q"], q.reshape(t, -1))
            b.matmul(hh, ws["k"], k.reshape(t, -1), bias)
            b.matmul(hh, ws["v"], v.reshape(t, -1))
            b.rope(q, pd, 10000.0, neox)
            b.rope(k, pd, 10000.0, neox)
            b.attention(q, k, v, ck, cv, sd, pd, out)

        b.run_step(("qkv-rope-test", t, neox), step) if record else step()
        return [a if b is cpu else be.download(a) for a in (q, k, v, ck, cv, out)]

    for got, ref in zip(run(be, True), run(cpu, False), strict=True):
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())
