"""Classification metrics of the paper's Table 2, computed with scikit-learn.

accuracy, AUC (macro over classes, one-vs-rest), precision, recall, F1 (macro
averages), and the multi-class Matthews correlation coefficient, plus a
confusion matrix and a per-class report. No TensorFlow here: ``evaluate`` in
``train/`` produces the scores, this module only counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    matthews_corrcoef,
    precision_recall_fscore_support,
    roc_auc_score,
)

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

    labels = list(range(num_classes))
    y_pred = p.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=labels, zero_division=0
    )
    aucs = [_one_vs_rest_auc(y == c, p[:, c]) for c in labels]
    defined = [a for a in aucs if a is not None]
    macro = precision_recall_fscore_support(
        y, y_pred, labels=labels, average="macro", zero_division=0
    )
    return {
        "n": int(y.size),
        "class_names": names,
        "accuracy": float(accuracy_score(y, y_pred)),
        "auc": float(np.mean(defined)) if defined else None,
        "auc_classes": len(defined),
        "precision": float(macro[0]),
        "recall": float(macro[1]),
        "f1": float(macro[2]),
        "mcc": float(matthews_corrcoef(y, y_pred)),
        "confusion_matrix": confusion_matrix(y, y_pred, labels=labels).tolist(),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "auc": aucs[c],
                "support": int(support[c]),
            }
            for c, name in enumerate(names)
        },
        "averaging": dict(AVERAGING),
    }


def _one_vs_rest_auc(is_class: np.ndarray, score: np.ndarray) -> float | None:
    if is_class.all() or not is_class.any():
        return None
    return float(roc_auc_score(is_class, score))


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
