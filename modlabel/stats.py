"""Intervals and paired tests for figures measured over images (and over models).

A localization or faithfulness figure is a mean over a few hundred images of one
archive scored with one trained model; run it again with another seed and it moves.
These functions say by how much, with numpy and the standard library only (scipy is
not a runtime dependency):

* ``bootstrap_interval``: the percentile bootstrap over items (Efron & Tibshirani,
  *An Introduction to the Bootstrap*, 1993, ch. 13): resample the N items with
  replacement ``resamples`` times, recompute the statistic, take the
  (1 - level)/2 and (1 + level)/2 quantiles of what comes out.
* ``paired_bootstrap``: the same, resampling pairs (a_i, b_i) together, for the
  difference statistic(a) - statistic(b); the two-sided p is twice the smaller
  share of the resampled differences on either side of 0 (each share counted
  with one pseudo-count, (k + 1) / (B + 1), so that no p is 0), clipped to 1.
  p < 1 - level exactly when 0 falls outside the interval, up to that count.
* ``mcnemar``: McNemar's test (1947) in its exact form, the two-sided binomial
  test of the discordant pairs (b hits of A alone, c of B alone, b + c = n):
  p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(n, 1/2) (Fagerland, Lydersen &
  Laake, *BMC Med. Res. Methodol.* 13:91, 2013); the difference of the hit rates
  with Newcombe's interval for paired proportions (Newcombe 1998, *Stat. Med.*
  17:2635, method 10).
* ``wilson_interval``: Wilson's score interval for one proportion (Wilson 1927;
  Newcombe 1998, *Stat. Med.* 17:857, method 3).
* ``hierarchical_bootstrap`` and ``hierarchical_paired_bootstrap``: for several
  independently trained models, resample the models with replacement, then the
  images within each drawn model (a two-stage bootstrap: Davison & Hinkley,
  *Bootstrap Methods and their Application*, 1997, section 3.8; Saravanan et al.,
  *Neurons, Behavior, Data analysis, and Theory*, 2020). The pooled figure is the
  mean over models of each model's figure, so each model weighs the same.
* ``holm``: Holm's step-down adjustment (1979) of a family of p-values.

The statistic of the bootstrap functions is called like numpy's reductions: the
estimate is ``statistic(values, axis=0)`` and must be one number; resamples are
stacked as (b, N, ...) and reduced with ``statistic(stack, axis=1)``, which must
give (b,). ``np.mean``, ``np.median`` and ``np.nanmean`` work as they are; for
values (N, 2) holding, say, (hits, trials), pass a function that reduces the
last axis itself. Resampling is vectorized in chunks of at most
``CHUNK_ELEMENTS`` gathered values, so memory stays bounded whatever N and
``resamples`` are; a seed gives the same result every time.

``bootstrap_column_means`` and ``hierarchical_column_means`` are the workhorses
of the evaluation: the means of many columns at once (one per method and
measure, NaN where a measure is undefined for an image), every column resampled
with the same draws, so that the difference of two columns is a paired
bootstrap of their difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SIGNIFICANCE = 0.05  # the level at which a (Holm-adjusted) p makes a difference significant
CHUNK_ELEMENTS = 1 << 22  # gathered values per chunk of resamples (32 MiB of float64)
EXACT_BINOMIAL_LIMIT = 20_000  # discordant pairs up to which the tail is summed in integers

Statistic = Callable[..., np.ndarray]
Seed = int | np.random.Generator


@dataclass(frozen=True)
class Interval:
    """A figure and its interval: ``low`` <= ``high`` at confidence ``level``.

    low and high are NaN where no interval could be drawn (no resample had a
    defined value)."""

    estimate: float
    low: float
    high: float
    level: float

    def text(self, digits: int = 2) -> str:
        """``0.89 [0.83, 0.94]``."""
        low, high = _bound(self.low, digits), _bound(self.high, digits)
        return f"{_bound(self.estimate, digits)} [{low}, {high}]"


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of A and B: ``difference`` = A - B with its interval
    [low, high] at ``level``, the two-sided ``p_value`` of no difference, the
    ``test`` that gave it, and how many ``pairs`` it saw."""

    difference: float
    low: float
    high: float
    p_value: float
    test: str
    level: float = LEVEL
    pairs: int = 0


def _bound(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _items(values: np.ndarray, what: str = "values") -> int:
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError(f"{what}: no items to resample (shape {values.shape})")
    return int(values.shape[0])


def index_chunks(
    n: int, resamples: int, rng: np.random.Generator, row_size: int = 1
) -> Iterator[tuple[int, np.ndarray]]:
    """The bootstrap draws: (start, (rows, n) intp indices into n items), ``resamples``
    rows in all, in chunks of at most ``CHUNK_ELEMENTS`` gathered values (an item
    being ``row_size`` values)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, n * row_size))
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        yield start, rng.integers(0, n, size=(count, n))


def _reduced(statistic: Statistic, stack: np.ndarray) -> np.ndarray:
    out = np.asarray(statistic(stack, axis=1), dtype=np.float64)
    if out.shape != (stack.shape[0],):
        raise ValueError(
            f"the statistic must reduce (b, N, ...) resamples to (b,), gave shape {out.shape}; "
            "for values (N, ...) pass a statistic that reduces the trailing axes itself"
        )
    return out


def _estimate(statistic: Statistic, values: np.ndarray) -> float:
    out = np.asarray(statistic(values, axis=0), dtype=np.float64)
    if out.size != 1:
        raise ValueError(
            f"the statistic must give one number for values {values.shape}, gave {out.shape}"
        )
    return float(out.reshape(()))


def bootstrap_distribution(
    values: np.ndarray | Sequence[float],
    statistic: Statistic = np.mean,
    *,
    resamples: int = RESAMPLES,
    seed: Seed = 0,
) -> np.ndarray:
    """The statistic of ``resamples`` resamples of the items (first axis): (resamples,)."""
    data = np.asarray(values)
    n = _items(data)
    rng = _rng(seed)
    out = np.empty(resamples, dtype=np.float64)
    row = max(1, data[0].size)
    for start, idx in index_chunks(n, resamples, rng, row):
        out[start : start + len(idx)] = _reduced(statistic, data[idx])
    return out


def percentile_bounds(
    distribution: np.ndarray, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a (B, K) bootstrap distribution, its (1 - level)/2 and
    (1 + level)/2 quantiles (linear interpolation, NaN resamples left out): two
    (K,) arrays, NaN for a column without a defined resample."""
    d = np.asarray(distribution, dtype=np.float64)
    d = d.reshape(len(d), -1)
    quantiles = [(1 - level) / 2, (1 + level) / 2]
    low = np.full(d.shape[1], np.nan)
    high = np.full(d.shape[1], np.nan)
    missing = np.isnan(d)
    complete = ~missing.any(axis=0)
    if complete.any() and len(d):
        low[complete], high[complete] = np.quantile(d[:, complete], quantiles, axis=0)
    for k in np.flatnonzero(~complete):
        finite = d[~missing[:, k], k]
        if finite.size:
            low[k], high[k] = np.quantile(finite, quantiles)
    return low, high


def percentile_interval(
    estimate: float, distribution: np.ndarray, level: float = LEVEL
) -> Interval:
    """The percentile interval of a (B,) bootstrap distribution (NaN resamples left out)."""
    low, high = percentile_bounds(np.asarray(distribution).reshape(-1, 1), level)
    return Interval(float(estimate), float(low[0]), float(high[0]), level)


def bootstrap_p_values(differences: np.ndarray) -> np.ndarray:
    """Per column of (B, K) resampled differences, the two-sided p of "no
    difference" (NaN resamples left out): 2 min(#(d <= 0) + 1, #(d >= 0) + 1) /
    (B + 1), clipped to 1; NaN for a column without a defined resample. A column
    of exact zeros (identical inputs) gives 1."""
    d = np.asarray(differences, dtype=np.float64)
    d = d.reshape(len(d), -1)
    finite = ~np.isnan(d)
    count = finite.sum(axis=0)
    below = (finite & (d <= 0)).sum(axis=0)
    above = (finite & (d >= 0)).sum(axis=0)
    p = np.minimum(1.0, 2 * (np.minimum(below, above) + 1) / (count + 1))
    return np.where(count > 0, p, np.nan)


def bootstrap_p_value(differences: np.ndarray) -> float:
    """``bootstrap_p_values`` of one (B,) distribution."""
    return float(bootstrap_p_values(np.asarray(differences).reshape(-1, 1))[0])


def bootstrap_interval(
    values: np.ndarray | Sequence[float],
    statistic: Statistic = np.mean,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: Seed = 0,
) -> Interval:
    """The percentile bootstrap interval of ``statistic`` over the items of ``values``.

    values: (N,) or (N, ...), resampled over the first axis (see the module
    docstring for how ``statistic`` is called). The estimate is the statistic of
    ``values`` themselves. Constant values give an interval of that constant.
    """
    _check(resamples, level)
    data = np.asarray(values)
    estimate = _estimate(statistic, data)
    distribution = bootstrap_distribution(data, statistic, resamples=resamples, seed=seed)
    return percentile_interval(estimate, distribution, level)


def paired_bootstrap(
    a: np.ndarray | Sequence[float],
    b: np.ndarray | Sequence[float],
    statistic: Statistic = np.mean,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: Seed = 0,
) -> PairedTest:
    """statistic(a) - statistic(b), resampling the pairs (a_i, b_i) together.

    a, b: (N,) or (N, ...) of the same shape, item i of both measured on the
    same thing (an image). Identical a and b give a difference of 0, an interval
    [0, 0] and p = 1.
    """
    _check(resamples, level)
    first, second = np.asarray(a), np.asarray(b)
    if first.shape != second.shape:
        raise ValueError(f"paired values differ in shape: {first.shape} and {second.shape}")
    n = _items(first)
    difference = _estimate(statistic, first) - _estimate(statistic, second)
    rng = _rng(seed)
    distribution = np.empty(resamples, dtype=np.float64)
    row = 2 * max(1, first[0].size)
    for start, idx in index_chunks(n, resamples, rng, row):
        distribution[start : start + len(idx)] = _reduced(statistic, first[idx]) - _reduced(
            statistic, second[idx]
        )
    interval = percentile_interval(difference, distribution, level)
    return PairedTest(
        difference=difference,
        low=interval.low,
        high=interval.high,
        p_value=bootstrap_p_value(distribution),
        test="paired bootstrap",
        level=level,
        pairs=n,
    )


# --------------------------------------------------------------------------
# Proportions: Wilson, McNemar, Newcombe.
# --------------------------------------------------------------------------


def normal_quantile(level: float) -> float:
    """z with P(|Z| <= z) = level for a standard normal Z (1.959964 for 0.95)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf((1 + level) / 2)


def _wilson_bounds(successes: int, n: int, z: float) -> tuple[float, float]:
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # The bounds at 0 and n are exactly 0 and 1 (centre - half is 0 only up to rounding).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson's score interval of a proportion successes / n (the estimate).

    (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z the normal
    quantile of ``level``; 81 of 263 gives 0.2553 to 0.3662 (Newcombe 1998).
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    low, high = _wilson_bounds(int(successes), int(n), normal_quantile(level))
    return Interval(successes / n, low, high, level)


def binomial_half_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2): exact (integer sums of math.comb-style
    terms) up to ``EXACT_BINOMIAL_LIMIT`` trials, in log space (lgamma) beyond."""
    if n < 0 or k < 0:
        raise ValueError(f"need n >= 0 and k >= 0, got k={k}, n={n}")
    if k >= n:
        return 1.0
    if n <= EXACT_BINOMIAL_LIMIT:
        term, total = 1, 1  # C(n, 0)
        for i in range(1, k + 1):
            term = term * (n - i + 1) // i  # C(n, i), exact
            total += term
        return total / (1 << n)  # Python divides the integers with one rounding
    i = np.arange(k + 1, dtype=np.float64)
    log_terms = (
        math.lgamma(n + 1)
        - np.array([math.lgamma(x + 1) + math.lgamma(n - x + 1) for x in i])
        - n * math.log(2)
    )
    top = log_terms.max()
    return float(min(1.0, math.exp(top) * np.exp(log_terms - top).sum()))


def mcnemar_p_value(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p of the discordant counts: min(1, 2 P(X <= min)),
    X ~ Binomial(only_a + only_b, 1/2); 1 when there is no discordant pair."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    return min(1.0, 2 * binomial_half_tail(min(only_a, only_b), n))


def newcombe_paired_interval(
    both: int, only_a: int, only_b: int, neither: int, level: float = LEVEL
) -> tuple[float, float]:
    """Newcombe's interval (1998, method 10) for p_A - p_B of paired proportions.

    From the 2x2 table of the pairs: both hit, only A, only B, neither. With
    Wilson bounds (l1, u1) of p_A, (l2, u2) of p_B, D = p_A - p_B and phi the
    table's correlation (0 where a margin is empty):
    D - sqrt((p_A - l1)^2 - 2 phi (p_A - l1)(u2 - p_B) + (u2 - p_B)^2) and
    D + sqrt((p_B - l2)^2 - 2 phi (p_B - l2)(u1 - p_A) + (u1 - p_A)^2).
    """
    n = both + only_a + only_b + neither
    if n < 1:
        raise ValueError("no pairs")
    z = normal_quantile(level)
    hits_a, hits_b = both + only_a, both + only_b
    p_a, p_b = hits_a / n, hits_b / n
    l1, u1 = _wilson_bounds(hits_a, n, z)
    l2, u2 = _wilson_bounds(hits_b, n, z)
    margins = hits_a * (n - hits_a) * hits_b * (n - hits_b)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    d = p_a - p_b
    down = (p_a - l1) ** 2 - 2 * phi * (p_a - l1) * (u2 - p_b) + (u2 - p_b) ** 2
    up = (p_b - l2) ** 2 - 2 * phi * (p_b - l2) * (u1 - p_a) + (u1 - p_a) ** 2
    return max(-1.0, d - math.sqrt(max(down, 0.0))), min(1.0, d + math.sqrt(max(up, 0.0)))


def _hits(values: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected (N,) hits, got shape {array.shape}")
    if array.dtype != bool:
        as_float = array.astype(np.float64)
        if not np.isin(as_float, (0.0, 1.0)).all():
            raise ValueError(f"{name}: hits must be 0 or 1 (no NaN)")
        array = as_float == 1.0
    return array


def mcnemar(
    hits_a: np.ndarray | Sequence[float],
    hits_b: np.ndarray | Sequence[float],
    *,
    level: float = LEVEL,
) -> PairedTest:
    """McNemar's exact test of paired hits (0/1 or bool, (N,) each, same items).

    difference = mean(hits_a) - mean(hits_b), with Newcombe's interval; p from
    the discordant pairs alone (1 when there is none).
    """
    a, b = _hits(hits_a, "hits_a"), _hits(hits_b, "hits_b")
    if a.shape != b.shape:
        raise ValueError(f"paired hits differ in shape: {a.shape} and {b.shape}")
    n = _items(a, "hits")
    both = int(np.count_nonzero(a & b))
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    low, high = newcombe_paired_interval(both, only_a, only_b, n - both - only_a - only_b, level)
    return PairedTest(
        difference=(only_a - only_b) / n,
        low=low,
        high=high,
        p_value=mcnemar_p_value(only_a, only_b),
        test="McNemar exact",
        level=level,
        pairs=n,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (1979), in the order given.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max over j <= i of
    min(1, (m - j + 1) p_(j)). A difference is significant at alpha when its
    adjusted p is below alpha; the family-wise error rate is then at most alpha.
    NaN stays NaN and does not count in m.
    """
    values = np.asarray(p_values, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    defined = np.flatnonzero(~np.isnan(values))
    m = defined.size
    running = 0.0
    for rank, i in enumerate(defined[np.argsort(values[defined], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * values[i]))
        out[i] = running
    return out.tolist()


# --------------------------------------------------------------------------
# Several models: resample the models, then the images within each.
# --------------------------------------------------------------------------


def _hierarchical_slots(
    sizes: Sequence[int],
    resamples: int,
    rng: np.random.Generator,
    fill: Callable[[int, np.ndarray], np.ndarray],
    trailing: tuple[int, ...] = (),
    row_size: Callable[[int], int] = lambda group: 1,
) -> np.ndarray:
    """(resamples, M, *trailing): slot j of resample b is a model drawn with
    replacement among the M, scored by ``fill(model, indices)`` on its own
    independent resample of that model's items (indices: (rows, n_model)); a model's
    item is ``row_size(model)`` gathered values (for the chunks' size)."""
    m = len(sizes)
    choice = rng.integers(0, m, size=(resamples, m))
    slots = np.full((resamples * m, *trailing), np.nan)
    flat_choice = choice.reshape(-1)
    for group, n in enumerate(sizes):
        positions = np.flatnonzero(flat_choice == group)
        if positions.size == 0 or n == 0:
            continue
        for start, idx in index_chunks(n, positions.size, rng, row_size(group)):
            slots[positions[start : start + len(idx)]] = fill(group, idx)
    return slots.reshape(resamples, m, *trailing)


def _groups(groups: Sequence[np.ndarray | Sequence[float]], what: str) -> list[np.ndarray]:
    arrays = [np.asarray(g) for g in groups]
    if not arrays:
        raise ValueError(f"{what}: no groups")
    for g in arrays:
        _items(g, what)
    return arrays


def hierarchical_bootstrap(
    groups: Sequence[np.ndarray | Sequence[float]],
    statistic: Statistic = np.mean,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: Seed = 0,
) -> Interval:
    """The mean over groups (models) of each group's statistic, with a two-stage
    bootstrap interval: the M groups resampled with replacement, then each drawn
    group's items (its images) with replacement, independently per draw.

    groups: M arrays (n_g, ...), none empty; statistic as ``bootstrap_interval``.
    """
    _check(resamples, level)
    arrays = _groups(groups, "groups")
    estimate = float(np.mean([_estimate(statistic, g) for g in arrays]))
    slots = _hierarchical_slots(
        [len(g) for g in arrays],
        resamples,
        _rng(seed),
        lambda g, idx: _reduced(statistic, arrays[g][idx]),
        row_size=lambda g: max(1, arrays[g][0].size),
    )
    return percentile_interval(estimate, slots.mean(axis=1), level)


def hierarchical_paired_bootstrap(
    groups_a: Sequence[np.ndarray | Sequence[float]],
    groups_b: Sequence[np.ndarray | Sequence[float]],
    statistic: Statistic = np.mean,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: Seed = 0,
) -> PairedTest:
    """The pooled difference mean_g stat(a_g) - mean_g stat(b_g), resampled in two
    stages (models, then the pairs within each drawn model, a and b together)."""
    _check(resamples, level)
    first, second = _groups(groups_a, "groups_a"), _groups(groups_b, "groups_b")
    if [g.shape for g in first] != [g.shape for g in second]:
        raise ValueError("paired groups differ in shape")
    difference = float(
        np.mean(
            [
                _estimate(statistic, a) - _estimate(statistic, b)
                for a, b in zip(first, second, strict=True)
            ]
        )
    )
    slots = _hierarchical_slots(
        [len(g) for g in first],
        resamples,
        _rng(seed),
        lambda g, idx: _reduced(statistic, first[g][idx]) - _reduced(statistic, second[g][idx]),
        row_size=lambda g: 2 * max(1, first[g][0].size),
    )
    distribution = slots.mean(axis=1)
    interval = percentile_interval(difference, distribution, level)
    return PairedTest(
        difference=difference,
        low=interval.low,
        high=interval.high,
        p_value=bootstrap_p_value(distribution),
        test="hierarchical paired bootstrap",
        level=level,
        pairs=sum(len(g) for g in first),
    )


# --------------------------------------------------------------------------
# Many columns at once: means with undefined (NaN) values left out.
# --------------------------------------------------------------------------


def column_means(values: np.ndarray) -> np.ndarray:
    """(N, K) -> (K,): each column's mean over its defined (non-NaN) values; NaN
    for a column with none."""
    return nan_mean(np.asarray(values, dtype=np.float64), axis=0)


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(B, N) bootstrap draws of N items -> (B, N) float64: how often each item was drawn."""
    b = idx.shape[0]
    flat = (idx + (np.arange(b) * n)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _resampled_column_means(idx: np.ndarray, values: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """(rows, K): the column means of each resample ``idx`` (rows, n), through the
    resample's item counts (rows, n) times the values: one matrix product."""
    rows, n = idx.shape
    counts = resample_counts(idx, n)
    sums = counts @ values
    # Every resample holds n items; only columns with undefined values need their count.
    taken = np.full(sums.shape, float(n))
    gaps = np.flatnonzero(defined.min(axis=0, initial=1.0) < 1)
    if gaps.size:
        taken[:, gaps] = counts @ defined[:, gaps]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(taken > 0, sums / np.maximum(taken, 1), np.nan)


def _split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"expected (N, K) values, got shape {data.shape}")
    defined = ~np.isnan(data)
    return np.where(defined, data, 0.0), defined.astype(np.float64)


def bootstrap_column_means(
    values: np.ndarray, *, resamples: int = RESAMPLES, seed: Seed = 0
) -> np.ndarray:
    """(resamples, K): ``column_means`` of ``resamples`` resamples of the N rows.

    values: (N, K), NaN where undefined. Every column is resampled with the same
    draws (the rows are the unit: an image and all its measures), so column i
    minus column j is the paired bootstrap of their difference. A resample with
    no defined value in a column is NaN there.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    filled, defined = _split(values)
    n = _items(filled)
    out = np.empty((resamples, filled.shape[1]), dtype=np.float64)
    # A resample's counts are (rows, n) float64: n values per row.
    for start, idx in index_chunks(n, resamples, _rng(seed)):
        out[start : start + len(idx)] = _resampled_column_means(idx, filled, defined)
    return out


def hierarchical_column_means(
    groups: Sequence[np.ndarray], *, resamples: int = RESAMPLES, seed: Seed = 0
) -> np.ndarray:
    """(resamples, K): the mean over models of each model's column means, resampled
    in two stages (``hierarchical_bootstrap``), the same draws for every column.

    groups: M arrays (n_g, K), NaN where undefined; a model with no row, or no
    defined value in a column, is left out of that column's mean over models.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not groups:
        raise ValueError("groups: no groups")
    split = [_split(g) for g in groups]
    widths = {filled.shape[1] for filled, _ in split}
    if len(widths) != 1:
        raise ValueError(f"groups differ in columns: {sorted(widths)}")
    (width,) = widths
    slots = _hierarchical_slots(
        [len(filled) for filled, _ in split],
        resamples,
        _rng(seed),
        lambda g, idx: _resampled_column_means(idx, *split[g]),
        trailing=(width,),
    )
    return nan_mean(slots, axis=1)


def nan_mean(values: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without its warning: NaN where a slice has no defined value."""
    defined = ~np.isnan(values)
    counts = defined.sum(axis=axis)
    sums = np.where(defined, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
