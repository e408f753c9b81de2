"""Intervals and paired tests of the localization and faithfulness figures.

Arrays in, dataclasses out (``modlabel.stats`` does the statistics): the
evaluation's other rooms hand over, per method, a (n, M) array of per-image
measures (NaN where a measure is undefined for an image) and get back

* ``FigureInterval``: each method's mean of each measure over a group of images
  (a class, or all of them), with its 95% percentile bootstrap interval over the
  images (``stats.bootstrap_column_means``: every method and measure resampled
  with the same draws of images);
* ``Comparison``: each pair of methods on each measure over the same images,
  the second subtracted from the first. A hit rate (the pointing game) gets
  McNemar's exact test with Newcombe's interval, any other measure the paired
  bootstrap (the difference of the two methods' means, on the same resampled
  images, the same draws that give the intervals). The p-values of one measure
  are Holm-adjusted over its pairs; a difference is significant when its
  adjusted p is below ``stats.SIGNIFICANCE`` (5%).

With several models (``pooled_statistics``) a figure is the mean over models of
each model's figure, and its interval and the pairs' tests come from the
two-stage bootstrap (``stats.hierarchical_column_means``: the models resampled,
then the images within each). ``model_comparisons`` compares the models with
each other, method by method, on the images every one of the two classified
correctly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .. import stats

HIT_RATES = frozenset({"pointing"})  # 0/1 per image: McNemar, not the bootstrap
ALL = "all"


@dataclass(frozen=True)
class StatisticsSettings:
    """How the intervals and tests were drawn (stated beside them)."""

    resamples: int = stats.RESAMPLES
    level: float = stats.LEVEL
    seed: int = 0
    alpha: float = stats.SIGNIFICANCE
    correction: str = "Holm, over the pairs of each measure"


@dataclass(frozen=True)
class FigureInterval:
    """A method's mean of one measure over a group (a class, ``"all"``, or a
    faithfulness sample), with its interval; None where undefined.

    images: how many images had the measure defined (the mean's count); with
    several models, summed over them.
    """

    group: str
    method: str
    metric: str
    images: int
    estimate: float | None
    low: float | None
    high: float | None
    level: float

    def interval(self) -> stats.Interval | None:
        if self.estimate is None:
            return None
        return stats.Interval(self.estimate, _nan(self.low), _nan(self.high), self.level)


@dataclass(frozen=True)
class Comparison:
    """first - second on one measure, paired over the same images.

    first, second: two methods, or two models (``method`` then names the method
    whose maps both models drew). p_holm: Holm-adjusted over the family of the
    measure (its pairs); significant: p_holm < alpha. pairs: the images both
    sides were measured on. None where undefined.
    """

    metric: str
    first: str
    second: str
    difference: float | None
    low: float | None
    high: float | None
    p_value: float | None
    p_holm: float | None
    significant: bool
    test: str
    pairs: int
    level: float
    method: str | None = None


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def method_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(later, earlier) for every two methods: the later one minus the earlier
    (CRM - CAM for methods cam, gradcam, crm)."""
    return [(methods[j], methods[i]) for j in range(len(methods)) for i in range(j)]


def _stack(values: Mapping[str, np.ndarray], methods: Sequence[str]) -> np.ndarray:
    """(n, len(methods) * M): the methods' measures side by side, method-major."""
    return np.concatenate([np.asarray(values[m], dtype=np.float64) for m in methods], axis=1)


def _column(methods: Sequence[str], metrics: Sequence[str], method: str, metric: str) -> int:
    return list(methods).index(method) * len(metrics) + list(metrics).index(metric)


def _intervals(
    group: str,
    estimates: np.ndarray,
    counts: np.ndarray,
    distribution: np.ndarray,
    methods: Sequence[str],
    metrics: Sequence[str],
    level: float,
) -> list[FigureInterval]:
    """One ``FigureInterval`` per (method, measure) of the stacked columns."""
    lows, highs = stats.percentile_bounds(distribution, level)
    out = []
    for method in methods:
        for metric in metrics:
            k = _column(methods, metrics, method, metric)
            estimate = _none(estimates[k])
            out.append(
                FigureInterval(
                    group=group,
                    method=method,
                    metric=metric,
                    images=int(counts[k]),
                    estimate=estimate,
                    low=_none(lows[k]) if estimate is not None else None,
                    high=_none(highs[k]) if estimate is not None else None,
                    level=level,
                )
            )
    return out


@dataclass(frozen=True)
class _Pair:
    metric: str
    first: str
    second: str
    method: str | None  # model pairs: the method both models drew


def _paired_differences(
    pairs: Sequence[_Pair], first: Sequence[np.ndarray], second: Sequence[np.ndarray]
) -> np.ndarray:
    """(n, P): per image, first - second of each pair (NaN where either is undefined).

    The tests resample these differences, so that identical inputs give
    differences that are exactly 0 in every resample (p = 1)."""
    if not pairs:
        return np.empty((len(first[0]) if first else 0, 0))
    return np.stack([a - b for a, b in zip(first, second, strict=True)], axis=1)


def _comparisons(
    pairs: Sequence[_Pair],
    differences: Sequence[np.ndarray],
    first: Sequence[Sequence[np.ndarray]],
    second: Sequence[Sequence[np.ndarray]],
    settings: StatisticsSettings,
    *,
    hierarchical: bool,
) -> list[Comparison]:
    """The tests of ``pairs``, from their per-image differences (one (n, P) array
    per model; one model but for the pooled figures) and, for the hit rates of a
    single model, McNemar on the hits themselves (first, second: per model, per
    pair, (n,) values). Not yet adjusted: the caller runs Holm's adjustment once over
    its whole family (``holm_adjusted``)."""
    level = settings.level
    groups = list(differences)
    if hierarchical:
        distribution = stats.hierarchical_column_means(
            groups, resamples=settings.resamples, seed=settings.seed
        )
        means = np.stack([_means(d) for d in groups])
        estimates = stats.nan_mean(means, axis=0)
        test = "hierarchical paired bootstrap"
    else:
        (only,) = groups
        distribution = (
            stats.bootstrap_column_means(only, resamples=settings.resamples, seed=settings.seed)
            if len(only)
            else np.full((1, only.shape[1]), np.nan)
        )
        estimates = _means(only)
        test = "paired bootstrap"
    counts = sum((~np.isnan(d)).sum(axis=0) for d in groups)
    lows, highs = stats.percentile_bounds(distribution, level)
    p_values = stats.bootstrap_p_values(distribution)
    out = []
    for k, pair in enumerate(pairs):
        if pair.metric in HIT_RATES and not hierarchical:
            out.append(_mcnemar_comparison(pair, first[0][k], second[0][k], level))
            continue
        difference = _none(estimates[k])
        defined = difference is not None
        out.append(
            Comparison(
                metric=pair.metric,
                first=pair.first,
                second=pair.second,
                difference=difference,
                low=_none(lows[k]) if defined else None,
                high=_none(highs[k]) if defined else None,
                p_value=_none(p_values[k]) if defined else None,
                p_holm=None,
                significant=False,
                test=test,
                pairs=int(counts[k]),
                level=level,
                method=pair.method,
            )
        )
    return out


def _means(values: np.ndarray) -> np.ndarray:
    return stats.column_means(values) if len(values) else np.full(values.shape[1], np.nan)


def _mcnemar_comparison(
    pair: _Pair, hits_first: np.ndarray, hits_second: np.ndarray, level: float
) -> Comparison:
    both = ~np.isnan(hits_first) & ~np.isnan(hits_second)
    if both.any():
        test = stats.mcnemar(hits_first[both], hits_second[both], level=level)
        numbers = (test.difference, test.low, test.high, test.p_value, test.pairs)
    else:
        numbers = (None, None, None, None, 0)
    difference, low, high, p_value, count = numbers
    return Comparison(
        metric=pair.metric,
        first=pair.first,
        second=pair.second,
        difference=difference,
        low=low,
        high=high,
        p_value=p_value,
        p_holm=None,
        significant=False,
        test="McNemar exact",
        pairs=count,
        level=level,
        method=pair.method,
    )


def resamples_for(pairs: int, alpha: float = 0.05) -> int:
    """Bootstrap resamples enough for Holm's adjustment over ``pairs`` comparisons: the
    smallest bootstrap p is 2 / (B + 1), so the adjusted p cannot fall below
    2 pairs / (B + 1); B = 4 pairs / alpha puts that floor at alpha / 2. At least
    ``stats.RESAMPLES``."""
    return max(stats.RESAMPLES, math.ceil(4 * pairs / alpha))


def holm_adjusted(comparisons: list[Comparison], alpha: float) -> list[Comparison]:
    """The comparisons with ``p_holm`` and ``significant`` set, Holm's adjustment
    taken over the comparisons of each measure."""
    adjusted: dict[int, float | None] = {}
    for metric in dict.fromkeys(c.metric for c in comparisons):
        family = [i for i, c in enumerate(comparisons) if c.metric == metric]
        p = stats.holm([_nan(comparisons[i].p_value) for i in family])
        adjusted.update({i: _none(v) for i, v in zip(family, p, strict=True)})
    return [
        replace(c, p_holm=adjusted[i], significant=adjusted[i] is not None and adjusted[i] < alpha)
        for i, c in enumerate(comparisons)
    ]


def _method_pairs(
    methods: Sequence[str], metrics: Sequence[str], tested: Sequence[str], stacked: np.ndarray
) -> tuple[list[_Pair], list[np.ndarray], list[np.ndarray]]:
    pairs, first, second = [], [], []
    for metric in tested:
        for a, b in method_pairs(methods):
            pairs.append(_Pair(metric, a, b, None))
            first.append(stacked[:, _column(methods, metrics, a, metric)])
            second.append(stacked[:, _column(methods, metrics, b, metric)])
    return pairs, first, second


def image_statistics(
    values: Mapping[str, np.ndarray],
    metrics: Sequence[str],
    groups: Mapping[str, np.ndarray],
    *,
    tested: Sequence[str],
    settings: StatisticsSettings,
    compare_in: str = ALL,
) -> tuple[list[FigureInterval], list[Comparison]]:
    """Intervals of every (group, method, measure), and the method pairs' tests in
    the group ``compare_in``.

    values: method -> (n, len(metrics)) per-image measures, NaN undefined, the
    rows the same images for every method; groups: name -> row indices of its
    images (a class; ``"all"``); tested: the measures whose method pairs are
    tested. Each group is resampled on its own, seeded the same.
    """
    methods = list(values)
    stacked = _stack(values, methods)
    intervals: list[FigureInterval] = []
    comparisons: list[Comparison] = []
    for group, rows in groups.items():
        part = stacked[np.asarray(rows, dtype=np.intp)]
        if len(part):
            distribution = stats.bootstrap_column_means(
                part, resamples=settings.resamples, seed=settings.seed
            )
        else:
            distribution = np.full((1, part.shape[1]), np.nan)
        counts = (~np.isnan(part)).sum(axis=0)
        intervals += _intervals(
            group, _means(part), counts, distribution, methods, metrics, settings.level
        )
        if group == compare_in:
            pairs, first, second = _method_pairs(methods, metrics, tested, part)
            differences = _paired_differences(pairs, first, second)
            comparisons = holm_adjusted(
                _comparisons(pairs, [differences], [first], [second], settings, hierarchical=False),
                settings.alpha,
            )
    return intervals, comparisons


def pooled_statistics(
    per_model: Sequence[Mapping[str, np.ndarray]],
    metrics: Sequence[str],
    *,
    tested: Sequence[str],
    settings: StatisticsSettings,
) -> tuple[list[FigureInterval], list[Comparison]]:
    """Figures pooled over models: the mean over models of each model's mean (a
    model with no defined value left out), with two-stage bootstrap intervals, and
    the method pairs' tests from the same two-stage bootstrap of the per-image
    differences (the pointing game too, as a difference of hit rates).

    per_model: one ``values`` of ``image_statistics`` per model, the same methods.
    """
    methods = list(per_model[0])
    groups = [_stack(values, methods) for values in per_model]
    distribution = stats.hierarchical_column_means(
        groups, resamples=settings.resamples, seed=settings.seed
    )
    estimates = stats.nan_mean(np.stack([_means(g) for g in groups]), axis=0)
    counts = sum((~np.isnan(g)).sum(axis=0) for g in groups)
    intervals = _intervals(ALL, estimates, counts, distribution, methods, metrics, settings.level)
    firsts, seconds, differences = [], [], []
    pairs: list[_Pair] = []
    for g in groups:
        pairs, first, second = _method_pairs(methods, metrics, tested, g)
        firsts.append(first)
        seconds.append(second)
        differences.append(_paired_differences(pairs, first, second))
    comparisons = holm_adjusted(
        _comparisons(pairs, differences, firsts, seconds, settings, hierarchical=True),
        settings.alpha,
    )
    return intervals, comparisons


def model_comparisons(
    models: Sequence[str],
    keys: Sequence[np.ndarray],
    per_model: Sequence[Mapping[str, np.ndarray]],
    metrics: Sequence[str],
    *,
    tested: Sequence[str],
    settings: StatisticsSettings,
) -> list[Comparison]:
    """Every two models on every method and tested measure: the later model minus
    the earlier, paired over the images both classified correctly (McNemar for the
    pointing game, the paired bootstrap otherwise).

    keys: per model, (n_m,) the identity of each row's image (its position in
    the archive), the rows of ``per_model`` in that order. The same model given
    twice gives differences of 0 and p = 1. Holm's adjustment runs over the
    model pairs and methods of each measure.
    """
    out: list[Comparison] = []
    for later, earlier in method_pairs(list(range(len(models)))):
        _, at_later, at_earlier = np.intersect1d(
            keys[later], keys[earlier], assume_unique=True, return_indices=True
        )
        pairs, first, second = [], [], []
        for method in per_model[0]:
            mine = np.asarray(per_model[later][method], dtype=np.float64)[at_later]
            theirs = np.asarray(per_model[earlier][method], dtype=np.float64)[at_earlier]
            for metric in tested:
                k = list(metrics).index(metric)
                pairs.append(_Pair(metric, models[later], models[earlier], method))
                first.append(mine[:, k])
                second.append(theirs[:, k])
        differences = _paired_differences(pairs, first, second)
        out += _comparisons(pairs, [differences], [first], [second], settings, hierarchical=False)
    return holm_adjusted(out, settings.alpha)
