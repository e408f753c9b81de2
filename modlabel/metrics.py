"""Classification metrics of the paper's Table 2, in numpy: their one home.

accuracy, AUC (macro over classes, one-vs-rest), precision, recall, F1 (macro
averages), and the multi-class Matthews correlation coefficient, plus a
confusion matrix and a per-class report. numpy only, so that the runtime
(``modlabel.accuracy``, ``modlabel evaluate --db``) computes the same figures
as training (``train/evaluate`` produces the scores, this module only counts);
the tests hold them equal to scikit-learn's ``sklearn.metrics``.

The figures of a confusion matrix (``table2_from_confusion``) and the AUC
(``weighted_auc``) take a batch of B samples at once, so that a bootstrap
computes them on all its resamples in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SUMMARY_KEYS = ("accuracy", "auc", "precision", "recall", "f1", "mcc")
AVERAGING = {
    "accuracy": "fraction of images whose top-scoring class is the true class",
    "auc": "macro mean over classes of the one-vs-rest ROC AUC of the class probability",
    "precision": "macro mean over classes",
    "recall": "macro mean over classes",
    "f1": "macro mean over classes",
    "mcc": "multi-class Matthews correlation coefficient (Gorodkin's R_K)",
}


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Table 2 metrics of a labeled set.

    y_true: (N,) int class indices into ``class_names``.
    probs: (N, C) float class probabilities (softmax of the logits); the
    predicted class is the row's argmax.

    Returns a JSON-ready dict: the summary keys of ``SUMMARY_KEYS``,
    ``confusion_matrix`` (C, C) with rows = true class and columns = predicted
    class, ``per_class`` {name: precision, recall, f1, auc, support}, ``n``,
    ``class_names`` and ``averaging`` (what each summary number averages).
    Macro means are over all C classes (a class without images counts 0, as
    scikit-learn's ``average="macro"`` with ``labels`` all classes).

    A class's AUC is undefined (None) when the set has no image of it, or only
    images of it; the macro AUC averages the classes where it is defined
    (``auc_classes`` says how many), and is None if there are none.
    """
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    names = [str(n) for n in class_names]
    num_classes = len(names)
    if p.ndim != 2 or p.shape != (y.shape[0], num_classes):
        raise ValueError(f"probs must be (N, C) = ({y.shape[0]}, {num_classes}); got {p.shape}")
    if y.size == 0:
        raise ValueError("no samples to evaluate")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"y_true holds class indices outside 0..{num_classes - 1}")

    classes = range(num_classes)
    cm = confusion_matrices(y[None], p.argmax(axis=1)[None], num_classes)
    figures = {key: value[0] for key, value in table2_from_confusion(cm, classes).items()}
    aucs = class_aucs(y, p, classes)
    auc = float(macro_auc(aucs))
    return {
        "n": int(y.size),
        "class_names": names,
        "accuracy": float(figures["accuracy"]),
        "auc": None if np.isnan(auc) else auc,
        "auc_classes": int((~np.isnan(aucs)).sum()),
        "precision": float(figures["precision"]),
        "recall": float(figures["recall"]),
        "f1": float(figures["f1"]),
        "mcc": float(figures["mcc"]),
        "confusion_matrix": cm[0].tolist(),
        "per_class": {
            name: {
                "precision": float(figures["class_precision"][c]),
                "recall": float(figures["class_recall"][c]),
                "f1": float(figures["class_f1"][c]),
                "auc": None if np.isnan(aucs[c]) else float(aucs[c]),
                "support": int(cm[0, c].sum()),
            }
            for c, name in enumerate(names)
        },
        "averaging": dict(AVERAGING),
    }


# -- the formulas, batched -----------------------------------------------------------------


def confusion_matrices(true: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """(B, N) int true and predicted classes in 0..classes-1 -> (B, C, C) int64 counts,
    rows true, columns predicted."""
    b = true.shape[0]
    flat = (np.arange(b)[:, None] * classes * classes + true * classes + predicted).reshape(-1)
    counts = np.bincount(flat, minlength=b * classes * classes)
    return counts.reshape(b, classes, classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def table2_from_confusion(cms: np.ndarray, classes: Sequence[int]) -> dict[str, np.ndarray]:
    """Table 2's figures of (B, C, C) confusion matrices (rows true, columns predicted):
    ``accuracy``, ``precision``, ``recall``, ``f1``, ``mcc`` each (B,); ``class_precision``,
    ``class_recall``, ``class_f1`` each (B, C).

    Precision = TP / predicted, recall = TP / support, F1 = 2 TP / (support + predicted),
    each 0 where its denominator is; the macro means are over the ``classes`` named.
    MCC (Gorodkin 2004's R_K): (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum
    t_k^2)), c the correct, s all, p_k predicted and t_k true counts of class k; 0 where
    the denominator is (as scikit-learn's ``matthews_corrcoef``)."""
    cms = cms.astype(np.float64)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    support = cms.sum(axis=2)
    predicted = cms.sum(axis=1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)
    s = cms.sum(axis=(1, 2))
    correct = tp.sum(axis=1)
    numerator = correct * s - (predicted * support).sum(axis=1)
    denominator = np.sqrt((s**2 - (predicted**2).sum(axis=1)) * (s**2 - (support**2).sum(axis=1)))
    keep = list(classes)
    return {
        "accuracy": _ratio(correct, s),
        "precision": precision[:, keep].mean(axis=1),
        "recall": recall[:, keep].mean(axis=1),
        "f1": f1[:, keep].mean(axis=1),
        "mcc": _ratio(numerator, denominator),
        "class_precision": precision,
        "class_recall": recall,
        "class_f1": f1,
    }


def weighted_auc(is_class: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The ROC AUC of ``score`` (N,) for ``is_class`` (N,) bool in B weightings of the N
    items at once, ``weights`` (B, N) (a bootstrap's: how often each item was drawn).

    The weighted Mann-Whitney U with ties counted half (Hanley and McNeil 1982): sum over
    the groups g of tied scores of W+_g (W-_below g + W-_g / 2) / (W+ W-), W+ and W- the
    positives' and negatives' weights. With unit weights it is scikit-learn's
    ``roc_auc_score``; with counts, its ``sample_weight``. (B,) float64, NaN where a
    weighting has no positive or no negative."""
    if score.size == 0:
        return np.full(weights.shape[0], np.nan)
    order = np.argsort(score, kind="stable")
    sorted_score = score[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    w = weights[:, order]
    positive = is_class[order]
    w_pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)  # (B, G)
    w_neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
    below = np.cumsum(w_neg, axis=1) - w_neg
    u = (w_pos * (below + w_neg / 2.0)).sum(axis=1)
    total = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, u / np.maximum(total, 1e-300), np.nan)


def one_vs_rest_auc(is_class: np.ndarray, score: np.ndarray) -> float:
    """The ROC AUC of ``score`` (N,) for ``is_class`` (N,) bool: ``weighted_auc`` with
    every item weighing 1. NaN when either side is empty."""
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    return float(weighted_auc(np.asarray(is_class, dtype=bool), score, np.ones((1, score.size)))[0])


def class_aucs(true: np.ndarray, probabilities: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(K,) float64: each of the K ``classes``' one-vs-rest AUC of its probability column,
    ``true`` (N,) int and ``probabilities`` (N, C); NaN where undefined."""
    return np.array(
        [one_vs_rest_auc(true == c, probabilities[:, c]) for c in classes], dtype=np.float64
    )


def macro_auc(aucs: np.ndarray) -> np.ndarray:
    """The macro AUC of classes' AUCs (K, ...) (``class_aucs``, or K stacked
    ``weighted_auc``s (K, B)): the mean over axis 0 of those defined (not NaN), NaN where
    none is. Shape (...)."""
    aucs = np.asarray(aucs, dtype=np.float64)
    defined = (~np.isnan(aucs)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined > 0, np.nansum(aucs, axis=0) / np.maximum(defined, 1), np.nan)


# -- as text ------------------------------------------------------------------------------------


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """The metrics as plain-text tables: the Table 2 summary, the per-class
    report, and the confusion matrix (rows true, columns predicted)."""
    names = list(metrics["class_names"])
    lines = []
    head = f"{'images':>8}" + "".join(
        f"{k.upper() if k in ('auc', 'mcc') else k:>11}" for k in SUMMARY_KEYS
    )
    lines.append(head)
    lines.append(f"{metrics['n']:>8}" + "".join(f"{_fmt(metrics[k]):>11}" for k in SUMMARY_KEYS))

    width = max(12, *(len(n) for n in names)) + 5
    lines.append("")
    lines.append(
        f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'AUC':>10}{'support':>10}"
    )
    for name in names:
        row = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}{_fmt(row['precision']):>10}{_fmt(row['recall']):>10}"
            f"{_fmt(row['f1']):>10}{_fmt(row['auc']):>10}{row['support']:>10}"
        )

    matrix = metrics["confusion_matrix"]
    cell = max(6, *(len(str(v)) + 1 for r in matrix for v in r))
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted, in class order above)")
    lines.append(f"{'':<{width}}" + "".join(f"{i:>{cell}}" for i in range(len(names))))
    for i, (name, r) in enumerate(zip(names, matrix, strict=True)):
        lines.append(f"{f'{i} {name}':<{width}}" + "".join(f"{v:>{cell}}" for v in r))
    calibration = metrics.get("calibration")
    if calibration:
        lines.append("")
        lines.append(
            f"calibration: temperature {calibration['temperature']:.4f} (fitted on "
            f"{calibration['fitted_on']}); ECE ({calibration['bins']} bins) "
            f"{calibration['ece_before']:.4f} before, {calibration['ece_after']:.4f} after"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
