"""modlabel.metrics (numpy) against values computed by hand and against scikit-learn, the
independent reference (no TensorFlow)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    matthews_corrcoef,
    precision_recall_fscore_support,
    roc_auc_score,
)

from modlabel.metrics import (
    classification_metrics,
    format_metrics_table,
    one_vs_rest_auc,
    weighted_auc,
)

# Six images, three classes; predictions (argmax) are 0, 1, 1, 1, 2, 0.
Y_TRUE = [0, 0, 1, 1, 2, 2]
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.1, 0.8],
        [0.5, 0.2, 0.3],
    ]
)
NAMES = ["ct", "mri", "xray"]


def test_metrics_equal_hand_computed_values():
    m = classification_metrics(Y_TRUE, PROBS, NAMES)
    assert m["n"] == 6
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision per class: 1/2, 2/3, 1/1; recall: 1/2, 2/2, 1/2
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # F1 per class: 1/2, 4/5, 2/3
    assert m["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # Multi-class MCC: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    # with c=4 correct, s=6, predicted counts p=(2,3,1), true counts t=(2,2,2).
    assert m["mcc"] == pytest.approx((4 * 6 - (4 + 6 + 2)) / math.sqrt((36 - 14) * (36 - 12)))
    # One-vs-rest AUC: class 0 ranks 7 of its 8 (positive, negative) pairs right,
    # classes 1 and 2 all of them.
    assert m["per_class"]["ct"]["auc"] == pytest.approx(7 / 8)
    assert m["per_class"]["mri"]["auc"] == pytest.approx(1.0)
    assert m["per_class"]["xray"]["auc"] == pytest.approx(1.0)
    assert m["auc"] == pytest.approx((7 / 8 + 1 + 1) / 3)
    assert m["auc"] == pytest.approx(
        roc_auc_score(Y_TRUE, PROBS, multi_class="ovr", average="macro")
    )
    assert m["auc_classes"] == 3
    assert m["per_class"]["mri"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "auc": 1.0, "support": 2}
    )


def test_auc_of_a_class_without_images_is_undefined_not_an_error():
    y = [0, 0, 1, 1]
    probs = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["per_class"]["c"]["auc"] is None
    assert m["auc_classes"] == 2
    assert m["auc"] == pytest.approx(1.0)  # both defined classes are ranked perfectly
    assert m["per_class"]["c"]["support"] == 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 5], np.ones((2, 2)) / 2, ["a", "b"])


def test_table_shows_summary_per_class_and_confusion_matrix():
    text = format_metrics_table(classification_metrics(Y_TRUE, PROBS, NAMES))
    lines = text.splitlines()
    assert lines[0].split() == ["images", "accuracy", "AUC", "precision", "recall", "f1", "MCC"]
    assert lines[1].split()[:2] == ["6", "0.6667"]
    assert any(line.split()[:2] == ["mri", "0.6667"] for line in lines)
    assert any(line.split() == ["2", "xray", "1", "0", "1"] for line in lines)


def sklearn_table2(y: np.ndarray, probs: np.ndarray) -> dict:
    """scikit-learn's Table 2 of (N,) classes and (N, C) probabilities, macro over all C."""
    labels = list(range(probs.shape[1]))
    pred = probs.argmax(axis=1)
    per = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    macro = precision_recall_fscore_support(
        y, pred, labels=labels, average="macro", zero_division=0
    )
    aucs = [
        roc_auc_score(y == c, probs[:, c]) if 0 < (y == c).sum() < y.size else None for c in labels
    ]
    defined = [a for a in aucs if a is not None]
    return {
        "accuracy": accuracy_score(y, pred),
        "precision": macro[0],
        "recall": macro[1],
        "f1": macro[2],
        "mcc": matthews_corrcoef(y, pred),
        "auc": float(np.mean(defined)) if defined else None,
        "auc_classes": len(defined),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "per_class": [
            {
                "precision": per[0][c],
                "recall": per[1][c],
                "f1": per[2][c],
                "auc": aucs[c],
                "support": int(per[3][c]),
            }
            for c in labels
        ],
    }


def random_case(rng: np.random.Generator, n: int, c: int, kind: str):
    y = rng.integers(0, c, n)
    probs = rng.dirichlet(np.ones(c), size=n)
    if kind == "ties":  # few distinct scores: many tied within every class's column
        probs = np.round(probs, 1)
    elif kind == "never_predicted":  # class 0 never the argmax, though it has images
        probs[:, 0] = 0.0
        y[:2] = 0
    elif kind == "no_support":  # the last class has no image, yet is predicted
        y = np.minimum(y, c - 2)
        probs[: n // 3, c - 1] = 2.0
    elif kind == "one_class":  # every image of one class: no AUC is defined
        y[:] = 1
    return y, probs


@pytest.mark.parametrize("kind", ["random", "ties", "never_predicted", "no_support", "one_class"])
def test_metrics_equal_scikit_learn(kind):
    rng = np.random.default_rng(len(kind))
    for trial in range(6):
        n, c = int(rng.integers(5, 60)), int(rng.integers(3, 6))
        y, probs = random_case(rng, n, c, kind)
        names = [f"class{k}" for k in range(c)]
        got, sk = classification_metrics(y, probs, names), sklearn_table2(y, probs)
        for key in ("accuracy", "precision", "recall", "f1", "mcc", "auc"):
            if sk[key] is None:
                assert got[key] is None, (kind, trial, key)
            else:
                assert got[key] == pytest.approx(sk[key], abs=1e-12), (kind, trial, key)
        assert got["auc_classes"] == sk["auc_classes"]
        assert got["confusion_matrix"] == sk["confusion_matrix"]
        for name, expected in zip(names, sk["per_class"], strict=True):
            assert got["per_class"][name] == pytest.approx(expected, abs=1e-12), (kind, name)
    if kind == "never_predicted":
        assert got["per_class"]["class0"]["precision"] == 0 and got["per_class"]["class0"]["auc"]
    if kind == "no_support":
        assert got["per_class"][names[-1]]["support"] == 0
        assert got["per_class"][names[-1]]["auc"] is None


def test_auc_with_ties_and_weights_equals_scikit_learn():
    rng = np.random.default_rng(7)
    score = np.round(rng.random(50), 1)  # 11 distinct scores for 50 items: ties
    is_class = rng.random(50) < 0.3
    assert one_vs_rest_auc(is_class, score) == pytest.approx(
        roc_auc_score(is_class, score), abs=1e-12
    )
    weights = rng.integers(0, 4, size=(4, 50)).astype(np.float64)  # a bootstrap's counts
    for b, got in enumerate(weighted_auc(is_class, score, weights)):
        expected = roc_auc_score(is_class, score, sample_weight=weights[b])
        assert got == pytest.approx(expected, abs=1e-12)
    assert math.isnan(one_vs_rest_auc(np.zeros(5, bool), np.arange(5.0)))
