"""Host-side sampling of logits rows: the CPU backend's `sample`, and the semantics every backend follows.

The filtering order is the one `Backend.sample` documents: repetition penalty,
greedy argmax at temperature 0, temperature, top-k, softmax, top-p, min-p,
renormalize, then inverse-CDF selection with the row's `uniform`.

Both the kept set and the pick are prefixes of the vocabulary sorted by
descending logit (ties: lower id first). Instead of sorting all V logits per
token, one O(V) pass builds a histogram of the logits with per-bin counts and
masses; walks over the bins then add whole bins at once and sort only the few
bins where a boundary (top-k, top-p, min-p, the pick) falls.
NaN logits are treated as -inf; tokens of zero probability are never picked.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import njit

from rbees_workerd.errors import InvalidParams
from rbees_workerd.kernels.backend import SamplingRow

_BINS = 1024  # histogram bins over logits within _RANGE of the top one, plus one for the rest
_RANGE = 64.0


class SeededUniforms:
    """The uniform numbers of one sequence; a seed makes its run reproducible.

    Without a seed the generator is seeded from OS entropy, so unseeded
    sequences differ from each other.
    """

    def __init__(self, seed: int | None) -> None:
        if seed is not None and seed < 0:
            raise InvalidParams(f"seed must be a non-negative integer, got {seed}")
        entropy = seed if seed is not None else int.from_bytes(os.urandom(16), "little")
        self._rng = np.random.default_rng(entropy)

    def next(self) -> float:
        """The next number in [0, 1)."""
        return float(self._rng.random())


def sample_rows(logits: np.ndarray, rows: list[SamplingRow]) -> np.ndarray:
    """One token id per row of `logits[R, V]`, as int32[R]."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != len(rows):
        raise InvalidParams(f"logits of shape {logits.shape} do not match {len(rows)} sampling rows")
    out = np.empty(len(rows), np.int32)
    for r, row in enumerate(rows):
        out[r] = sample_row(logits[r], row)
    return out


def sample_row(logits: np.ndarray, row: SamplingRow) -> int:
    """The token id picked from one logits row `[V]`; the caller's array is not modified."""
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise InvalidParams(f"a logits row must be a non-empty vector, got shape {logits.shape}")
    history = np.asarray(row.history, np.int64).reshape(-1)
    _check(row, history, logits.size)
    x = logits.astype(np.float64)  # a copy
    x[np.isnan(x)] = -np.inf
    if row.repetition_penalty != 1.0 and history.size:
        seen = np.unique(history)
        with np.errstate(over="ignore"):  # a tiny penalty sends big logits to +inf, which is handled below
            x[seen] = np.where(x[seen] > 0, x[seen] / row.repetition_penalty, x[seen] * row.repetition_penalty)
    best = int(np.argmax(x))  # the first of equal maxima: the lowest id
    m = x[best]
    if row.temperature == 0 or m == -np.inf:
        return best
    # y <= 0 with the top token at 0; infinite logits share all the probability
    y = np.where(x == np.inf, 0.0, -np.inf) if m == np.inf else (x - m) / row.temperature
    # NumPy's vectorized exp is several times faster than a compiled scalar loop
    e = np.exp(y)
    t = float(row.temperature) if m != np.inf else 1.0
    return int(_select(y, e, t, int(row.top_k), float(row.top_p), float(row.min_p), float(row.uniform)))


def _check(row: SamplingRow, history: np.ndarray, vocab: int) -> None:
    """Raise InvalidParams for a setting outside its range (the kernel assumes valid input)."""
    bad = []
    if not row.temperature >= 0:
        bad.append(f"temperature {row.temperature} < 0")
    if row.top_k < 0:
        bad.append(f"top_k {row.top_k} < 0")
    if not 0 <= row.top_p <= 1:
        bad.append(f"top_p {row.top_p} outside [0, 1]")
    if not 0 <= row.min_p <= 1:
        bad.append(f"min_p {row.min_p} outside [0, 1]")
    if not row.repetition_penalty > 0:
        bad.append(f"repetition_penalty {row.repetition_penalty} <= 0")
    if not 0 <= row.uniform < 1:
        bad.append(f"uniform {row.uniform} outside [0, 1)")
    if history.size and (history.min() < 0 or history.max() >= vocab):
        bad.append(f"history holds token ids outside the vocabulary of {vocab}")
    if bad:
        raise InvalidParams("bad sampling row: " + "; ".join(bad))


@njit(cache=True)
def _select(y, e, temperature, top_k, top_p, min_p, uniform):  # pragma: no cover - compiled
    """Filter and pick, given the scaled logits y = (x - max) / T <= 0 and e = exp(y).

    The kept set and the pick are prefixes of the descending order; walking a
    histogram of the logits (monotone bins) finds them while sorting only the
    bins where a boundary falls.
    """
    v = y.size
    bins = np.empty(v, np.int32)
    count = np.zeros(_BINS + 1, np.int64)
    binmass = np.zeros(_BINS + 1, np.float64)
    z = 0.0
    positive = 0
    for i in range(v):
        z += e[i]
        positive += e[i] > 0.0
        b = _bin(y[i] * temperature)
        bins[i] = b
        count[b] += 1
        binmass[b] += e[i]
    k = top_k if 0 < top_k < v else v
    if k < v:  # the softmax sees the top k only
        z = _walk(y, e, bins, count, binmass, k, np.inf, False, -np.inf, temperature)[1]
    min_y = math.log(min_p) if min_p > 0.0 else -np.inf
    limit = top_p * z if top_p < 1.0 else np.inf
    kept, mass, _ = _walk(y, e, bins, count, binmass, k, limit, False, min_y, temperature)
    _, _, pick = _walk(y, e, bins, count, binmass, kept, uniform * mass, True, -np.inf, temperature)
    if pick >= 0:
        return pick
    # rounding left the running sum just below the target: the last kept token that has probability
    return _at_rank(y, bins, count, min(kept, positive) - 1)


@njit(cache=True)
def _walk(y, e, bins, count, binmass, max_rank, limit, strict, min_y, temperature):  # pragma: no cover
    """Take tokens in descending order while fewer than max_rank and y >= min_y, adding up e.

    Stops after the token whose running sum reaches `limit` (exceeds it when
    `strict`), and returns (tokens taken, their sum, that token or -1). Whole
    bins are added at once where no boundary can fall inside them.
    """
    rank = 0
    mass = 0.0
    min_bin = _bin(min_y * temperature)  # bins past it hold only tokens with y < min_y
    for b in range(_BINS + 1):
        if rank >= max_rank or b > min_bin:
            break
        c = count[b]
        if c == 0:
            continue
        # the margin keeps a bin whose sum reaches the limit by rounding alone on the token path
        all_above = b < min_bin or min_y == -np.inf
        if rank + c <= max_rank and all_above and (mass + binmass[b]) * (1.0 + 1e-9) < limit:
            rank += c
            mass += binmass[b]
            continue
        for t in _bin_sorted(y, bins, b):
            if rank == max_rank or y[t] < min_y:
                return rank, mass, -1
            mass += e[t]
            rank += 1
            if mass > limit if strict else mass >= limit:
                return rank, mass, t
    return rank, mass, -1


@njit(cache=True)
def _bin_sorted(y, bins, b):  # pragma: no cover - compiled
    """The ids of bin b in descending y; a stable sort of ascending ids keeps ties by lower id."""
    ids = np.nonzero(bins == b)[0]
    return ids[np.argsort(-y[ids], kind="mergesort")]


@njit(cache=True)
def _at_rank(y, bins, count, r):  # pragma: no cover - compiled
    """The token at position r of the descending order."""
    for b in range(_BINS + 1):
        if r < count[b]:
            return _bin_sorted(y, bins, b)[r]
        r -= count[b]
    return -1


@njit(cache=True)
def _bin(d):  # pragma: no cover - compiled
    """The histogram bin of a logit d = x - max <= 0: width 1/16 down to -64, one bin for the rest.

    Binning the unscaled logit keeps the tokens per bin independent of the temperature.
    """
    if d > -_RANGE:
        return int(-d * (_BINS / _RANGE))
    return _BINS
