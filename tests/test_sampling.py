"""Sampling: each filter of Backend.sample's documented order, checked exactly where possible.

Most checks drive the sampler with a fine grid of uniforms: the inverse-CDF
pick then hits each kept token a number of times proportional to its
probability (within one grid step), so the set of tokens ever picked is the
kept set, and the pick frequencies are the renormalized probabilities.
"""

from __future__ import annotations

import numpy as np
import pytest

from rbees_workerd.engine.sampling import SeededUniforms, sample_row, sample_rows
from rbees_workerd.errors import InvalidParams
from rbees_workerd.kernels.backend import SamplingRow

GRID = 4000


def row(uniform: float = 0.5, history: tuple[int, ...] = (), **kw: float) -> SamplingRow:
    params = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0} | kw
    return SamplingRow(uniform=uniform, history=np.asarray(history, np.int32), **params)


def grid_frequencies(logits: np.ndarray, history: tuple[int, ...] = (), **kw: float) -> np.ndarray:
    """How often each token is picked over GRID evenly spaced uniforms, as fractions."""
    counts = np.zeros(len(logits))
    for u in (np.arange(GRID) + 0.5) / GRID:
        counts[sample_row(logits, row(float(u), history, **kw))] += 1
    return counts / GRID


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def naive_sample(logits: np.ndarray, r: SamplingRow) -> int:
    """The documented semantics, written plainly with a full sort (the spec as code)."""
    x = logits.astype(np.float64)
    x[np.isnan(x)] = -np.inf
    for t in set(r.history.tolist()):
        x[t] = x[t] / r.repetition_penalty if x[t] > 0 else x[t] * r.repetition_penalty
    if r.temperature == 0 or x.max() == -np.inf:
        return int(np.argmax(x))
    y = x / r.temperature
    order = np.lexsort((np.arange(len(y)), -y))  # descending, ties by ascending id
    if r.top_k:
        order = order[: r.top_k]
    p = np.exp(y[order] - y[order[0]])
    p /= p.sum()
    if r.top_p < 1:
        n = int(np.argmax(np.cumsum(p) >= r.top_p)) + 1 if np.cumsum(p)[-1] >= r.top_p else len(p)
        order, p = order[:n], p[:n]
    keep = p >= r.min_p * p[0]
    order, p = order[keep], p[keep] / p[keep].sum()
    above = np.nonzero(np.cumsum(p) > r.uniform)[0]
    return int(order[above[0]] if len(above) else order[p > 0][-1])


# ---- greedy


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    logits = np.array([0.5, 3.0, -1.0, 3.0, 2.9], np.float32)
    for u in (0.0, 0.3, 0.999):
        assert sample_row(logits, row(u, temperature=0.0)) == 1
    assert sample_row(np.array([-2.0, -1.0, -1.0], np.float32), row(temperature=0.0)) == 1


def test_top_k_1_is_greedy() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        logits = rng.standard_normal(300).astype(np.float32)
        logits[rng.integers(300)] = logits.max()  # a tie at the top
        want = sample_row(logits, row(temperature=0.0))
        assert sample_row(logits, row(float(rng.random()), temperature=1.3, top_k=1)) == want


# ---- temperature


def test_temperature_frequencies_match_softmax_chi_square() -> None:
    """Seeded random uniforms: a chi-square test that a wrong temperature fails by orders of magnitude."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5], np.float32)
    t, n = 0.7, 20000
    uniforms = SeededUniforms(1234)
    counts = np.zeros(len(logits))
    for _ in range(n):
        counts[sample_row(logits, row(uniforms.next(), temperature=t))] += 1
    expected = softmax(logits.astype(np.float64) / t) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: P(chi2 > 35) < 1e-5; the seed is fixed, so the outcome is too
    assert chi2 < 35.0
    wrong = softmax(logits.astype(np.float64)) * n  # what T = 1 would give
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 1000


@pytest.mark.parametrize("t", [0.3, 1.0, 1.8])
def test_temperature_grid_frequencies_equal_probabilities(t: float) -> None:
    logits = np.array([1.0, 0.2, -0.3, 0.9, -1.5, 0.0], np.float32)
    freq = grid_frequencies(logits, temperature=t)
    np.testing.assert_allclose(freq, softmax(logits.astype(np.float64) / t), atol=1.0 / GRID)


# ---- top-k, top-p, min-p


def test_top_k_keeps_exactly_k_candidates() -> None:
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(200) * 0.3).astype(np.float32)
    for k in (2, 5, 17):
        picked = set(np.nonzero(grid_frequencies(logits, top_k=k))[0].tolist())
        assert picked == set(np.argsort(-logits, kind="stable")[:k].tolist())
        freq = grid_frequencies(logits, top_k=k)
        top = np.argsort(-logits, kind="stable")[:k]
        np.testing.assert_allclose(freq[top], softmax(logits[top].astype(np.float64)), atol=1.0 / GRID)
    ties = np.array([1.0, 0.0, 1.0, 1.0], np.float32)  # the boundary tie goes to the lower ids
    assert set(np.nonzero(grid_frequencies(ties, top_k=2))[0].tolist()) == {0, 2}


PROBS = np.log(np.array([0.05, 0.5, 0.15, 0.3])).astype(np.float32)  # sorted: 1, 3, 2, 0


@pytest.mark.parametrize(
    ("top_p", "nucleus"), [(0.0, {1}), (0.4, {1}), (0.75, {1, 3}), (0.85, {1, 3, 2}), (0.97, {1, 3, 2, 0})]
)
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(top_p: float, nucleus: set[int]) -> None:
    freq = grid_frequencies(PROBS, top_p=top_p)
    assert set(np.nonzero(freq)[0].tolist()) == nucleus
    kept = sorted(nucleus)
    p = np.exp(PROBS[kept].astype(np.float64))
    np.testing.assert_allclose(freq[kept], p / p.sum(), atol=1.0 / GRID)  # renormalized


@pytest.mark.parametrize(
    ("min_p", "kept"), [(0.0, {0, 1, 2, 3}), (0.2, {1, 2, 3}), (0.5, {1, 3}), (1.0, {1})]
)
def test_min_p_drops_tokens_below_min_p_times_the_top(min_p: float, kept: set[int]) -> None:
    freq = grid_frequencies(PROBS, min_p=min_p)
    assert set(np.nonzero(freq)[0].tolist()) == kept


def test_filters_apply_in_the_documented_order() -> None:
    """top_k before the softmax that top_p sees: with k=2, top_p=0.6 is reached by the first token."""
    assert set(np.nonzero(grid_frequencies(PROBS, top_k=2, top_p=0.6))[0].tolist()) == {1}
    assert set(np.nonzero(grid_frequencies(PROBS, top_p=0.6))[0].tolist()) == {1, 3}


def test_ties_are_ordered_by_ascending_id_and_boundaries_are_inclusive() -> None:
    """Equal logits have exactly equal probabilities, so every boundary below is exact."""
    flat = np.zeros(300, np.float32)  # more ties than an insertion sort handles
    for j in (0, 1, 150, 299):
        assert sample_row(flat, row((j + 0.5) / 300)) == j
    four = np.zeros(4, np.float32)
    assert sample_row(four, row(0.25)) == 1  # the first token whose cumulative probability *exceeds* u
    assert set(np.nonzero(grid_frequencies(four, top_p=0.5))[0].tolist()) == {0, 1}  # 0.5 reaches 0.5
    assert set(np.nonzero(grid_frequencies(four, min_p=1.0))[0].tolist()) == {0, 1, 2, 3}
    wide = np.zeros(1000, np.float32)
    wide[::7] = 2.0
    assert set(np.nonzero(grid_frequencies(wide, top_k=5))[0].tolist()) == {0, 7, 14, 21, 28}


# ---- repetition penalty


def test_repetition_penalty_divides_positive_and_multiplies_negative_history_logits() -> None:
    logits = np.array([2.0, -1.0, 1.0, 0.5, -0.2], np.float32)
    history = (0, 1, 0, 0)  # repeated ids are penalized once
    freq = grid_frequencies(logits, history, repetition_penalty=2.0)
    penalized = np.array([1.0, -2.0, 1.0, 0.5, -0.2])
    np.testing.assert_allclose(freq, softmax(penalized), atol=1.0 / GRID)
    assert sample_row(logits, row(history=history, temperature=0.0, repetition_penalty=3.0)) == 2


# ---- the fast path agrees with the plain implementation


@pytest.mark.parametrize("vocab", [7, 1000, 49152])
def test_agrees_with_a_full_sort_implementation(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    cases = 120 if vocab < 49152 else 40
    for i in range(cases):
        scale = (0.05, 1.0, 3.0, 8.0)[i % 4]  # from nearly flat to peaked
        logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
        if i % 5 == 0:
            logits[rng.integers(vocab, size=vocab // 3)] = -np.inf
        r = SamplingRow(
            temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
            top_k=int(rng.choice([0, 1, 3, 40, vocab + 5])),
            top_p=float(rng.choice([1.0, 0.95, 0.5, 0.0])),
            min_p=float(rng.choice([0.0, 0.05, 0.5])),
            repetition_penalty=float(rng.choice([1.0, 1.3])),
            uniform=float(rng.choice([rng.random(), 0.999999, 0.0])),
            history=rng.integers(vocab, size=10).astype(np.int32),
        )
        assert sample_row(logits, r) == naive_sample(logits, r), (i, r)


# ---- seeds


def test_same_seed_gives_the_same_tokens() -> None:
    logits = np.random.default_rng(0).standard_normal(500).astype(np.float32)

    def run(seed: int | None) -> list[int]:
        u = SeededUniforms(seed)
        return [sample_row(logits, row(u.next(), temperature=1.0)) for _ in range(40)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(None) != run(None)
    values = [SeededUniforms(9).next() for _ in range(3)]
    assert values[0] == values[1] == values[2] and 0.0 <= values[0] < 1.0


def test_negative_seed_is_rejected() -> None:
    with pytest.raises(InvalidParams) as e:
        SeededUniforms(-1)
    assert e.value.code == "INVALID_PARAMS"


# ---- inputs


def test_input_logits_are_not_modified() -> None:
    logits = np.array([3.0, -2.0, np.nan, 1.0, -np.inf], np.float32)
    before = logits.copy()
    logits.flags.writeable = False  # a write would raise
    sample_row(logits, row(history=(0, 1, 3), repetition_penalty=1.5, top_k=2, top_p=0.9))
    np.testing.assert_array_equal(logits, before)


def test_minus_inf_and_nan_logits_are_never_picked() -> None:
    logits = np.full(64, -np.inf, np.float32)
    logits[[5, 9, 40]] = [0.0, 1.0, -30.0]
    logits[12] = np.nan
    for kw in ({}, {"top_k": 50}, {"temperature": 0.1}, {"temperature": 50.0}):
        picked = set(np.nonzero(grid_frequencies(logits, **kw))[0].tolist())
        assert picked <= {5, 9, 40}
        assert sample_row(logits, row(np.nextafter(1.0, 0.0), **kw)) in {5, 9, 40}


def test_the_largest_uniform_picks_the_last_token_with_probability() -> None:
    """At u just below 1 rounding can leave the running sum short of u; the pick is then the last
    kept token of nonzero probability, never a -inf one."""
    rng = np.random.default_rng(11)
    u = float(np.nextafter(1.0, 0.0))
    for i in range(300):
        logits = (rng.standard_normal(1000) * 0.01).astype(np.float32)  # near-equal: all bins full
        logits[rng.integers(1000, size=50)] = -np.inf
        finite = np.nonzero(np.isfinite(logits))[0]
        last = finite[np.lexsort((finite, -logits[finite]))][-1]
        assert sample_row(logits, row(u, temperature=float(0.5 + i % 3))) == last


def test_degenerate_rows_are_handled() -> None:
    assert sample_row(np.full(8, -np.inf, np.float32), row()) == 0
    inf_row = np.array([0.0, np.inf, 5.0, np.inf], np.float32)
    assert set(np.nonzero(grid_frequencies(inf_row))[0].tolist()) == {1, 3}


def test_sample_rows_samples_each_row_with_its_own_settings() -> None:
    logits = np.array([[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    rows = [row(temperature=0.0), row(temperature=0.0), row(0.9, temperature=1.0)]
    out = sample_rows(logits, rows)
    assert out.dtype == np.int32 and out.tolist() == [1, 0, 2]
    with pytest.raises(InvalidParams):
        sample_rows(logits, rows[:2])


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"repetition_penalty": 0.0},
        {"uniform": 1.0},
        {"history": (3, 100)},
    ],
)
def test_bad_settings_raise_invalid_params(bad: dict) -> None:
    with pytest.raises(InvalidParams) as e:
        sample_row(np.zeros(10, np.float32), row(**bad))
    assert e.value.code == "INVALID_PARAMS"


def test_tiny_repetition_penalty_overflows_quietly_to_the_penalized_token() -> None:
    """A penalty near 0 sends positive history logits to +inf: that token wins, with no warning."""
    import warnings

    logits = np.array([1.0, 3.0, 2.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for temperature in (0.0, 1.0):
            assert sample_row(logits, row(history=(2,), repetition_penalty=1e-300, temperature=temperature)) == 2
