"""Calibrate an exported model on its run's splits: temperature and out-of-set threshold.

The run's ``split.csv`` names each image's split and class; the images are
decoded as the scan decodes them (``modlabel.decode.load_pixels`` and
``normalize`` with the run's mean and std) and run through the exported graph.

* The temperature T is fitted on the validation split (minimum NLL of
  softmax(logits / T), ``modlabel.calibration.fit_temperature``).
* The out-of-set score is the Mahalanobis distance of the GAP embedding to the
  nearest class mean; the means and the class-shared covariance come from the
  training split (at most ``FIT_PER_CLASS`` images a class), and the threshold
  is the score's value on the validation split above which at most
  ``ood_rate`` of it lies.
* The test split (val if there is none) gives the expected calibration error
  before and after, and the share of it the threshold flags.

Needs numpy and the model's own outputs only (no TensorFlow).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from modlabel.calibration import (
    calibrated_softmax,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from modlabel.decode import load_pixels, normalize
from modlabel.errors import ImageError
from modlabel.metadata import ModelInfo
from modlabel.ood import DEFAULT_OOD_RATE, OutOfSetRule, gap_embedding, rate_threshold
from modlabel.train.rundir import SPLIT_CSV

from .errors import ExportError

BATCH = 32
# Training images a class that the class means and covariance are taken from: enough
# for a covariance of K = 512 channels with the shrinkage, and a bounded export time.
FIT_PER_CLASS = 200

# (N, H, W, 3) float32 normalized batch -> (logits (N, C), activations (N, h, w, K))
Outputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class CalibrationReport:
    """What calibration fitted and measured.

    nll_*: mean negative log-likelihood (nats) on the validation split at T = 1
    and at the fitted T; ece_*: expected calibration error (15 bins) on
    ``test_split`` before and after; test_flagged: the share of ``test_split``
    the out-of-set threshold flags.
    """

    temperature: float
    validation_images: int
    nll_before: float
    nll_after: float
    test_split: str
    test_images: int
    ece_before: float
    ece_after: float
    rule: OutOfSetRule
    test_flagged: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "fitted_on": "val",
            "validation_images": self.validation_images,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "ece_split": self.test_split,
            "ece_images": self.test_images,
            "ece_bins": 15,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "ood_flagged_on_test": self.test_flagged,
        }


def split_images(
    run_dir: str | Path, run: dict[str, Any], split: str
) -> tuple[list[Path], list[int]]:
    """The paths and class indices of one split of RUN/split.csv, in file order.

    Empty when the run has no split.csv or its ``data_dir`` cannot be reached.
    """
    data_dir = run.get("data_dir")
    split_file = Path(run_dir) / SPLIT_CSV
    if not data_dir or not Path(data_dir).is_dir() or not split_file.is_file():
        return [], []
    index = {str(name): i for i, name in enumerate(run["class_names"])}
    paths: list[Path] = []
    labels: list[int] = []
    try:
        with split_file.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("split") == split and row.get("class") in index:
                    paths.append(Path(data_dir) / row["path"])
                    labels.append(index[row["class"]])
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ExportError(f"{split_file}: cannot read: {exc}") from None
    return paths, labels


def split_outputs(
    outputs_of: Outputs, info: ModelInfo, paths: list[Path], labels: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, C) float64 logits, (N, K) GAP embeddings and (N,) labels of the images
    that decode (the others are skipped)."""
    logits: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    kept: list[int] = []
    for start in range(0, len(paths), BATCH):
        pixels = []
        for path, label in zip(
            paths[start : start + BATCH], labels[start : start + BATCH], strict=True
        ):
            try:
                pixels.append(load_pixels(path, info.input_size)[0])
            except ImageError:
                continue
            kept.append(label)
        if pixels:
            lg, act = outputs_of(normalize(np.stack(pixels), info.mean, info.std))
            logits.append(np.asarray(lg, dtype=np.float64))
            embeddings.append(gap_embedding(act))
    if not logits:
        k = info.head_weights.shape[0]
        return np.zeros((0, len(info.class_names))), np.zeros((0, k)), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(embeddings), np.asarray(kept, dtype=np.int64)


def calibrate(
    run_dir: str | Path,
    run: dict[str, Any],
    info: ModelInfo,
    outputs_of: Outputs,
    *,
    ood_rate: float = DEFAULT_OOD_RATE,
) -> CalibrationReport | None:
    """Fit T and the out-of-set rule; None when the run's validation or training
    images cannot be read."""
    if not 0.0 <= ood_rate < 1.0:
        raise ExportError(f"--ood-rate {ood_rate}: choose a share in [0, 1)")
    val_logits, val_emb, val_y = split_outputs(outputs_of, info, *split_images(run_dir, run, "val"))
    paths, labels = split_images(run_dir, run, "train")
    fit_paths: list[Path] = []
    fit_labels: list[int] = []
    per_class: dict[int, int] = {}
    for path, label in zip(paths, labels, strict=True):
        if per_class.get(label, 0) < FIT_PER_CLASS:
            per_class[label] = per_class.get(label, 0) + 1
            fit_paths.append(path)
            fit_labels.append(label)
    _, train_emb, train_y = split_outputs(outputs_of, info, fit_paths, fit_labels)
    if len(val_y) == 0 or len(train_y) == 0:
        return None
    temperature = fit_temperature(val_logits, val_y)
    rule = OutOfSetRule.fit(
        train_emb, train_y, len(info.class_names), rate=ood_rate, images=int(len(val_y))
    )
    rule = replace(rule, threshold=rate_threshold(rule.scores_of(val_emb), ood_rate))
    test_split = "test"
    test_logits, test_emb, test_y = split_outputs(
        outputs_of, info, *split_images(run_dir, run, "test")
    )
    if len(test_y) == 0:
        test_split, test_logits, test_emb, test_y = "val", val_logits, val_emb, val_y
    return CalibrationReport(
        temperature=temperature,
        validation_images=int(len(val_y)),
        nll_before=negative_log_likelihood(val_logits, val_y),
        nll_after=negative_log_likelihood(val_logits, val_y, temperature),
        test_split=test_split,
        test_images=int(len(test_y)),
        ece_before=expected_calibration_error(calibrated_softmax(test_logits), test_y),
        ece_after=expected_calibration_error(calibrated_softmax(test_logits, temperature), test_y),
        rule=rule,
        test_flagged=float(np.mean(rule.flags(rule.scores_of(test_emb)))),
    )
