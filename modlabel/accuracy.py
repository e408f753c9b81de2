"""The archive's own accuracy: the model's labels measured against the reviewed images.

Reviews (``store.reviews``) are ground truth for the images people looked at. On the
model's present, labeled rows that have a review:

* Table 2 of the paper, the classifier's figures, over the images reviewed as one of the
  classes: accuracy, macro precision, recall and F1, the multi-class Matthews correlation
  (Gorodkin 2004's R_K), the macro one-vs-rest AUC of the stored probabilities, and per
  class precision, recall, F1 and support; the confusion matrix (rows: the reviewed
  class, columns: the model's label). Macro means are over the classes that have a
  reviewed image (a class nobody reviewed has no recall to average). The formulas are
  ``modlabel.metrics``'s (numpy, held equal to scikit-learn's in the tests), on all the
  bootstrap's resamples at once.
* Calibration: the expected calibration error (``calibration.expected_calibration_error``,
  15 bins) of the stored calibrated probabilities.
* Out of set: of the images reviewed as none of the classes, the share the model flagged
  out of set; of those reviewed as a class, the share it flagged wrongly.
* Agreement: the share of reviewed images whose final answer (the label, or "none of the
  classes" for an image the model flagged out of set or abstained on) is the review's.

Each figure has a 95% interval (``modlabel.stats``): Wilson's for a proportion
(accuracy, a class's precision and recall, the out-of-set shares, agreement), the
percentile bootstrap over images otherwise (2000 resamples, seeded: the same reviews give
the same intervals).

The images were chosen by a review queue (``review.review_queue``), and every review
records which. The uncertainty, out-of-set and disagreement queues choose images where
the model is likeliest wrong, the diverse one spreads out, and hand-picked (manual, csv)
ones are chosen who knows how: figures over them are biased (accuracy understated,
usually). Only the images the ``random`` queue chose are a uniform sample of the images
it chose from (the model's unreviewed images at the time, of one label where the queue
was asked for one), and their figures, reported apart, estimate the archive's accuracy
without that bias.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from . import store
from .calibration import ECE_BINS, expected_calibration_error
from .metrics import class_aucs, confusion_matrices, macro_auc, table2_from_confusion, weighted_auc
from .stats import (
    LEVEL,
    RESAMPLES,
    Interval,
    index_chunks,
    percentile_interval,
    resample_counts,
    wilson_interval,
)
from .store.reviews import MANUAL, QUEUE_STRATEGIES, RANDOM

# What each summary figure is, for the text and the JSON (as modlabel.metrics.AVERAGING).
FIGURES = {
    "accuracy": "share of the images reviewed as a class that the model labeled so (Wilson)",
    "precision": "macro mean over the reviewed classes (bootstrap)",
    "recall": "macro mean over the reviewed classes (bootstrap)",
    "f1": "macro mean over the reviewed classes (bootstrap)",
    "mcc": "multi-class Matthews correlation coefficient, Gorodkin's R_K (bootstrap)",
    "auc": "macro mean over the reviewed classes of the one-vs-rest ROC AUC (bootstrap)",
    "ece": f"expected calibration error, {ECE_BINS} bins (bootstrap)",
}
SUMMARY_KEYS = tuple(FIGURES)
WILSON, BOOTSTRAP = "wilson", "bootstrap"
# The strategies whose images are a uniform sample; every other one is biased.
UNBIASED = (RANDOM,)


@dataclass(frozen=True)
class Figure:
    """A figure and its interval, and how the interval was drawn (wilson or bootstrap)."""

    interval: Interval
    method: str

    @property
    def estimate(self) -> float:
        return self.interval.estimate

    def to_dict(self) -> dict[str, Any]:
        def number(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        i = self.interval
        return {
            "estimate": number(i.estimate),
            "low": number(i.low),
            "high": number(i.high),
            "level": i.level,
            "method": self.method,
        }


@dataclass(frozen=True)
class ReviewedSample:
    """What the figures are computed on: the reviewed images of one model.

    true: (N,) int, the reviewed class (index into ``class_names``), -1 for none of the
    classes; predicted: (N,) int, the model's label (the argmax of its probabilities);
    probabilities: (N, C) float64 calibrated probabilities; flagged: (N,) bool, flagged
    out of set (or abstained on); strategies: (N,) the queue that chose each."""

    class_names: tuple[str, ...]
    true: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray
    flagged: np.ndarray
    strategies: tuple[str, ...]

    def subset(self, keep: np.ndarray) -> ReviewedSample:
        return ReviewedSample(
            self.class_names,
            self.true[keep],
            self.predicted[keep],
            self.probabilities[keep],
            self.flagged[keep],
            tuple(s for s, k in zip(self.strategies, keep, strict=True) if k),
        )


def reviewed_sample(engine: Engine, model_row: store.ModelRow) -> ReviewedSample:
    """The model's present, labeled rows that have a review, as a ``ReviewedSample``."""
    names = tuple(model_row.class_names)
    index = {name: i for i, name in enumerate(names)}
    true, predicted, probabilities, flagged, strategies = [], [], [], [], []
    for row in store.reviewed_rows(engine, model_row.id):
        reviewed = row.review.label
        if reviewed is not None and reviewed not in index:
            continue  # a class of another model (reviewed on its row): not this one's
        stored = row.probabilities or {}
        p = np.array([float(stored.get(name, 0.0)) for name in names], dtype=np.float64)
        if row.label in index and (not stored or p.max() <= 0):
            p = np.eye(len(names))[index[row.label]]  # no probabilities: the label alone
        if p.max() <= 0:
            continue  # neither a label nor probabilities: nothing to measure
        true.append(index[reviewed] if reviewed is not None else -1)
        predicted.append(int(np.argmax(p)) if row.label not in index else index[row.label])
        probabilities.append(p)
        flagged.append(bool(row.out_of_set) or row.label is None)
        strategies.append(row.review.strategy)
    c = len(names)
    return ReviewedSample(
        names,
        np.asarray(true, dtype=np.int64),
        np.asarray(predicted, dtype=np.int64),
        np.asarray(probabilities, dtype=np.float64).reshape(-1, c),
        np.asarray(flagged, dtype=bool),
        tuple(strategies),
    )


# -- the bootstrap's resamples as weights ---------------------------------------------------


def weighted_ece(
    probabilities: np.ndarray, true: np.ndarray, weights: np.ndarray, bins: int = ECE_BINS
) -> np.ndarray:
    """``calibration.expected_calibration_error`` of B resamples at once, each given as
    ``weights`` (B, N): sum over bins m of |sum_{i in m} w_i (correct_i - conf_i)| / sum w,
    the same bins ((m - 1) / bins, m / bins] of the confidence. (B,)."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == true).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    member = np.eye(bins)[index]  # (N, bins)
    gap = weights @ (member * (correct - confidence)[:, None])  # (B, bins)
    return np.abs(gap).sum(axis=1) / weights.sum(axis=1)


# -- a sample's figures with their intervals -----------------------------------------------


@dataclass
class SampleFigures:
    """The figures of one sample of reviewed images (all of them, or the random ones)."""

    images: int  # reviewed images of the model in the sample
    strategies: dict[str, int]  # how many each strategy chose
    classified: int  # of them, reviewed as a class (Table 2 is over these)
    classes: list[str]  # the classes with a reviewed image (the macro means' classes)
    summary: dict[str, Figure]
    per_class: dict[str, dict[str, Any]]  # precision, recall, f1 (Figure), support (int)
    confusion_matrix: list[list[int]]  # (C, C), rows reviewed, columns the model's label
    out_of_set: dict[str, Any]  # counts and the two shares (Figure)
    agreement: Figure | None  # the final answer is the review's, over all images

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Figure):
                return value.to_dict()
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {
            "images": self.images,
            "strategies": self.strategies,
            "classified": self.classified,
            "classes": self.classes,
            "summary": plain(self.summary),
            "per_class": plain(self.per_class),
            "confusion_matrix": self.confusion_matrix,
            "out_of_set": plain(self.out_of_set),
            "agreement": plain(self.agreement),
        }


def _wilson(successes: int, n: int, level: float) -> Figure | None:
    return Figure(wilson_interval(successes, n, level), WILSON) if n > 0 else None


def sample_figures(
    sample: ReviewedSample, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> SampleFigures:
    """Every figure of ``sample`` with its interval (see the module's docstring). The
    bootstrap resamples the images reviewed as a class (``stats.index_chunks``, the draws
    of ``stats.bootstrap_interval`` with the same seed) and recomputes every bootstrap
    figure on each resample."""
    names = sample.class_names
    c = len(names)
    in_set = sample.true >= 0
    true, predicted = sample.true[in_set], sample.predicted[in_set]
    probabilities = sample.probabilities[in_set]
    n = int(true.size)
    supported = sorted({int(t) for t in true})
    cm = confusion_matrices(true[None], predicted[None], c)[0] if n else np.zeros((c, c), int)
    summary: dict[str, Figure] = {}
    per_class: dict[str, dict[str, Any]] = {}
    if n:
        estimate = table2_from_confusion(cm[None], supported)
        point = {key: float(estimate[key][0]) for key in SUMMARY_KEYS if key in estimate}
        point["auc"] = float(macro_auc(class_aucs(true, probabilities, supported)))
        point["ece"] = expected_calibration_error(probabilities, true)
        distribution = _bootstrap(true, predicted, probabilities, supported, resamples, seed)
        for key in SUMMARY_KEYS:
            if key == "accuracy":
                summary[key] = Figure(wilson_interval(int(np.trace(cm)), n, level), WILSON)
            else:
                interval = percentile_interval(point[key], distribution[key], level)
                summary[key] = Figure(interval, BOOTSTRAP)
        for k in supported:
            f1 = percentile_interval(
                float(estimate["class_f1"][0, k]), distribution["class_f1"][:, k], level
            )
            per_class[names[k]] = {
                "precision": _wilson(int(cm[k, k]), int(cm[:, k].sum()), level),
                "recall": _wilson(int(cm[k, k]), int(cm[k].sum()), level),
                "f1": Figure(f1, BOOTSTRAP),
                "support": int(cm[k].sum()),
            }
    none = ~in_set
    out_of_set = {
        "reviewed_none": int(none.sum()),
        "reviewed_none_flagged": int((none & sample.flagged).sum()),
        "reviewed_class": n,
        "reviewed_class_flagged": int((in_set & sample.flagged).sum()),
    }
    out_of_set["flagged_share_of_none"] = _wilson(
        out_of_set["reviewed_none_flagged"], out_of_set["reviewed_none"], level
    )
    out_of_set["flagged_share_of_classes"] = _wilson(out_of_set["reviewed_class_flagged"], n, level)
    answer = np.where(sample.flagged, -1, sample.predicted)
    agreeing = int((answer == sample.true).sum())
    return SampleFigures(
        images=int(sample.true.size),
        strategies=dict(sorted(Counter(sample.strategies).items())),
        classified=n,
        classes=[names[k] for k in supported],
        summary=summary,
        per_class=per_class,
        confusion_matrix=cm.tolist(),
        out_of_set=out_of_set,
        agreement=_wilson(agreeing, int(sample.true.size), level),
    )


def _bootstrap(
    true: np.ndarray,
    predicted: np.ndarray,
    probabilities: np.ndarray,
    supported: Sequence[int],
    resamples: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """The bootstrap figures of ``resamples`` resamples of the N images: {figure: (B,)},
    ``class_f1``: (B, C)."""
    n, c = probabilities.shape
    out = {key: np.empty(resamples) for key in SUMMARY_KEYS}
    out["class_f1"] = np.empty((resamples, c))
    rng = np.random.default_rng(seed)
    for start, idx in index_chunks(n, resamples, rng, row_size=2 + c):
        rows = slice(start, start + len(idx))
        figures = table2_from_confusion(confusion_matrices(true[idx], predicted[idx], c), supported)
        for key in out:
            if key in figures:
                out[key][rows] = figures[key]
        weights = resample_counts(idx, n)
        aucs = np.stack([weighted_auc(true == k, probabilities[:, k], weights) for k in supported])
        out["auc"][rows] = macro_auc(aucs)  # a resample with no AUC defined: NaN, left out
        out["ece"][rows] = weighted_ece(probabilities, true, weights)
    return out


# -- the archive's accuracy ------------------------------------------------------------------


@dataclass
class ArchiveAccuracy:
    """``archive_accuracy``'s answer: the figures over every reviewed image of the model
    (``reviewed``) and over the random queue's alone (``random``, None without any)."""

    model: str
    class_names: list[str]
    reviewed: SampleFigures
    random: SampleFigures | None
    level: float
    resamples: int
    warnings: list[str] = field(default_factory=list)

    @property
    def biased(self) -> bool:
        """Some reviewed images were chosen by a strategy that is no uniform sample."""
        return any(s not in UNBIASED for s in self.reviewed.strategies)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "class_names": self.class_names,
            "level": self.level,
            "resamples": self.resamples,
            "biased": self.biased,
            "warnings": self.warnings,
            "figures": dict(FIGURES),
            "reviewed": self.reviewed.to_dict(),
            "random": self.random.to_dict() if self.random is not None else None,
        }


def bias_warnings(strategies: dict[str, int]) -> list[str]:
    """One sentence per kind of bias in how the reviewed images were chosen."""
    chosen = {s: n for s, n in strategies.items() if s not in UNBIASED}
    if not chosen:
        return []
    total = sum(strategies.values())
    queues = [s for s in chosen if s in QUEUE_STRATEGIES]
    said = []
    if queues:
        listed = ", ".join(f"{s} {chosen[s]}" for s in queues)
        said.append(
            f"{sum(chosen[s] for s in queues)} of the {total} reviewed images were chosen by "
            f"queues that seek the doubtful ones ({listed}): the figures over all reviewed "
            "images are biased (the accuracy understated, as a rule); only the random "
            "queue's images estimate the archive's accuracy without bias"
        )
    hand = {s: n for s, n in chosen.items() if s not in QUEUE_STRATEGIES}
    if hand:
        listed = ", ".join(f"{s} {n}" for s, n in hand.items())
        said.append(
            f"{sum(hand.values())} reviewed images were chosen by hand ({listed}; "
            f"{MANUAL} and csv record no queue): how they were chosen is unknown"
        )
    return said


def archive_accuracy(
    engine: Engine,
    model_row: store.ModelRow,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> ArchiveAccuracy | None:
    """The model's figures on the reviewed images (see the module's docstring); None when
    no image of the model has a review."""
    sample = reviewed_sample(engine, model_row)
    if sample.true.size == 0:
        return None
    reviewed = sample_figures(sample, resamples=resamples, level=level, seed=seed)
    is_random = np.array([s in UNBIASED for s in sample.strategies], dtype=bool)
    random = None
    if is_random.any():
        random = sample_figures(
            sample.subset(is_random), resamples=resamples, level=level, seed=seed
        )
    return ArchiveAccuracy(
        model=model_row.identity,
        class_names=list(model_row.class_names),
        reviewed=reviewed,
        random=random,
        level=level,
        resamples=resamples,
        warnings=bias_warnings(reviewed.strategies),
    )


# -- as text ---------------------------------------------------------------------------------


def _cell(figure: Figure | None, digits: int = 3) -> str:
    return figure.interval.text(digits) if figure is not None else "n/a"


def sample_lines(figures: SampleFigures, class_names: Sequence[str]) -> list[str]:
    """One sample's figures as plain-text lines: summary, per class, confusion matrix,
    out of set, agreement."""
    by = ", ".join(f"{s} {n}" for s, n in figures.strategies.items())
    lines = [f"{figures.images} reviewed images ({by}); {figures.classified} reviewed as a class"]
    if figures.summary:
        lines.append("")
        for key in SUMMARY_KEYS:
            name = key.upper() if key in ("mcc", "auc", "ece") else key
            lines.append(f"  {name:<10} {_cell(figures.summary[key])}")
        width = max(12, *(len(n) for n in figures.per_class)) + 2
        lines.append("")
        lines.append(f"  {'class':<{width}}{'precision':>24}{'recall':>24}{'f1':>24}{'n':>6}")
        for name, row in figures.per_class.items():
            lines.append(
                f"  {name:<{width}}{_cell(row['precision']):>24}{_cell(row['recall']):>24}"
                f"{_cell(row['f1']):>24}{row['support']:>6}"
            )
        matrix = figures.confusion_matrix
        cell = max(5, *(len(str(v)) + 1 for r in matrix for v in r))
        lines.append("")
        lines.append("  confusion matrix (rows: reviewed class, columns: the model's label)")
        lines.append(f"  {'':<{width}}" + "".join(f"{i:>{cell}}" for i in range(len(matrix))))
        for i, (name, r) in enumerate(zip(class_names, matrix, strict=True)):
            lines.append(f"  {f'{i} {name}':<{width}}" + "".join(f"{v:>{cell}}" for v in r))
    o = figures.out_of_set
    lines.append("")
    lines.append(
        f"  out of set: {o['reviewed_none_flagged']} of {o['reviewed_none']} images reviewed "
        f"as none of the classes flagged ({_cell(o['flagged_share_of_none'])}); "
        f"{o['reviewed_class_flagged']} of {o['reviewed_class']} reviewed as a class flagged "
        f"({_cell(o['flagged_share_of_classes'])})"
    )
    lines.append(f"  agreement of the final answer with the review: {_cell(figures.agreement)}")
    return lines


def format_accuracy(result: ArchiveAccuracy) -> str:
    """The archive's accuracy as plain text: the figures over every reviewed image, then
    the random sample's. Its warnings are the caller's to say (on stderr: ``evaluate
    --db`` says each once, before this)."""
    level = f"{result.level:.0%}"
    lines = [
        f"model {result.model}: its labels against the reviewed images "
        f"(figure [{level} interval]: Wilson for shares, bootstrap of "
        f"{result.resamples} resamples otherwise)"
    ]
    lines += ["", "all reviewed images" + (" (biased)" if result.biased else " (unbiased)")]
    lines += sample_lines(result.reviewed, result.class_names)
    lines.append("")
    if result.random is None:
        lines.append("random sample: none (review images of `modlabel review --strategy random`)")
    else:
        lines.append("random sample (unbiased)")
        lines += sample_lines(result.random, result.class_names)
    return "\n".join(lines)
