"""modlabel.metrics against values computed by hand (no TensorFlow)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from modlabel.metrics import classification_metrics, format_metrics_table

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
