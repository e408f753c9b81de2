"""Evaluate a run's model on one split: the paper's Table 2 metrics (section 4.1).

The images are decoded and normalized exactly as in training (no
augmentation); class probabilities are the softmax of the model's logits; the
numbers come from ``modlabel.metrics.classification_metrics``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np

from modlabel.calibration import (
    ECE_BINS,
    calibrated_softmax,
    expected_calibration_error,
    fit_temperature,
)
from modlabel.decode import normalize
from modlabel.decode_pool import DecodeRequest, image_pool
from modlabel.metrics import classification_metrics

from .data import SPLITS, read_split_csv
from .errors import RunError
from .rundir import METRICS_JSON, MODEL_FILE, RUN_JSON, SPLIT_CSV


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    *,
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Metrics of RUN/model.keras on ``split`` of RUN/split.csv.

    Writes RUN/metrics.json for the test split (RUN/metrics_<split>.json for
    another) and returns the same dict. ``data_dir`` overrides the archive's
    location recorded in run.json (for an archive that has moved); batch_size
    only changes speed (default 32).
    """
    run = Path(run_dir).expanduser()
    if split not in SPLITS:
        raise RunError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    for name in (RUN_JSON, MODEL_FILE, SPLIT_CSV):
        if not (run / name).exists():
            raise RunError(f"{run}: not a finished training run (no {name})")
    config = json.loads((run / RUN_JSON).read_text())
    root = Path(data_dir).expanduser() if data_dir else Path(config["data_dir"])
    files = read_split_csv(run / SPLIT_CSV, root, config["class_names"])
    paths, labels = files.paths_labels(split)
    if not paths:
        raise RunError(f"{run}: the {split} split has no images")
    missing = [p for p in paths[:50] if not os.path.exists(p)]
    if missing:
        raise RunError(f"{missing[0]}: not found; pass the archive's new location as data_dir")

    model = keras.saving.load_model(run / MODEL_FILE, compile=False)
    logits, y = _logits(model, config, paths, labels, batch_size or 32)
    probs = calibrated_softmax(logits)
    metrics = classification_metrics(y, probs, config["class_names"])
    metrics.update(
        split=split,
        skipped=len(paths) - int(y.size),
        run=str(run.resolve()),
        backbone=config["backbone"],
    )
    # Temperature scaling as `modlabel export` fits it: on the validation split.
    val = files.paths_labels("val") if files.files.get("val") else ([], np.zeros(0))
    val_logits, val_y = _logits(model, config, *val, batch_size or 32)
    if val_y.size:
        temperature = fit_temperature(val_logits, val_y)
        metrics["calibration"] = {
            "temperature": temperature,
            "fitted_on": "val",
            "bins": ECE_BINS,
            "ece_before": expected_calibration_error(probs, y),
            "ece_after": expected_calibration_error(calibrated_softmax(logits, temperature), y),
        }
    name = METRICS_JSON if split == "test" else f"metrics_{split}.json"
    (run / name).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _logits(
    model: keras.Model, config: dict[str, Any], paths: list[str], labels: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float64 logits and (N,) labels of the images that decode.

    The images are read and decoded in isolated workers, exactly as a scan decodes them
    (``modlabel.decode_pool``): an evaluation of an archive's images is as safe as a scan."""
    if not paths:
        return np.zeros((0, len(config["class_names"]))), np.zeros(0, dtype=np.int64)
    size = tuple(int(v) for v in config["input_size"])
    logits, y_true, pending, pending_y = [], [], [], []

    def flush() -> None:
        if pending:
            inputs = normalize(np.stack(pending), config["mean"], config["std"])
            logits.append(np.asarray(model(inputs, training=False)))
            y_true.append(np.asarray(pending_y))
            pending.clear()
            pending_y.clear()

    with image_pool(size) as pool:
        items = list(zip(paths, labels, strict=True))
        for (_path, label), image in pool.map(items, lambda item: DecodeRequest(str(item[0]))):
            if image.pixels is None:
                continue  # a file that cannot be decoded is left out, as before
            pending.append(image.pixels)
            pending_y.append(label)
            if len(pending) >= batch:
                flush()
        flush()
    if not logits:
        return np.zeros((0, len(config["class_names"]))), np.zeros(0, dtype=np.int64)
    return np.concatenate(logits).astype(np.float64), np.concatenate(y_true)
