"""Fine-tuning: a finished run's model trained further on another data set, such as the
reviewed archive that ``modlabel dataset`` writes (``modlabel train DATA --resume-from
RUN``).

What the new run takes from the source run: the Keras model (``model.keras``, its
weights as the starting point), the class names and their order (the head's outputs), the
input size, the mean and std of the input normalization and the backbone's settings, so
that the new model reads pixels as the old one did and export writes a model of the same
classes. What it takes from the new data set: the files and their split, the class
weights. The data set must have exactly the run's class folders; a class may have few
images or none there (``data.discover_split(sparse=True)``): the head keeps it.

Defaults (``FINETUNE_LEARNING_RATE``, ``FINETUNE_EPOCHS``): a tenth of a fresh run's
learning rate (1e-4 against 1e-3), so that a few hundred reviewed images move the weights
that thousands of training images set without tearing them down (the usual practice of
fine-tuning, e.g. Yosinski et al. 2014, "How transferable are features in deep neural
networks?"), and at most 10 epochs, with the same early stopping on the validation
cross-entropy as a fresh run.

No TensorFlow is imported here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunError
from .rundir import MODEL_FILE, RUN_JSON

FINETUNE_LEARNING_RATE = 1e-4  # a tenth of a fresh run's default (1e-3)
FINETUNE_EPOCHS = 10

# The run.json keys that define the model and how it reads pixels: the fine-tuned run
# keeps them as they are.
MODEL_KEYS = (
    "class_names",
    "input_size",
    "channel_order",
    "mean",
    "std",
    "normalization_source",
    "backbone",
    "weights",
    "cut_layer",
    "paper_cut_layer",
    "activation_layer",
    "gap_layer",
    "head_layer",
    "head_filters",
)


@dataclass(frozen=True)
class SourceRun:
    """A finished run to fine-tune: its folder, run.json and the model file's SHA-256."""

    path: Path
    config: dict[str, Any]
    model_sha256: str

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    def record(self) -> dict[str, Any]:
        """What the new run's run.json keeps under ``fine_tuned_from``."""
        return {
            "run": str(self.path),
            "model_sha256": self.model_sha256,
            "data_dir": self.config.get("data_dir"),
            "best_epoch": self.config.get("best_epoch"),
        }


def load_source_run(run_dir: str | Path) -> SourceRun:
    """The finished run at ``run_dir``; a ``RunError`` (one line) where there is none."""
    path = Path(run_dir).expanduser().resolve()
    config_file, model_file = path / RUN_JSON, path / MODEL_FILE
    if not config_file.is_file() or not model_file.is_file():
        raise RunError(
            f"--resume-from {run_dir}: not a finished run (needs {RUN_JSON} and {MODEL_FILE})"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"--resume-from {run_dir}: cannot read {RUN_JSON}: {exc}") from None
    missing = [key for key in ("class_names", "input_size", "mean", "std") if key not in config]
    if missing:
        raise RunError(f"--resume-from {run_dir}: {RUN_JSON} lacks {', '.join(missing)}")
    return SourceRun(path, config, file_sha256(model_file))


def check_same_classes(source: SourceRun, data_dir: str | Path, class_names: list[str]) -> None:
    """Refuse (``RunError``, one line) a data set whose class folders are not exactly the
    source run's classes: the model's head has one output per class, in that order."""
    theirs, ours = set(source.class_names), set(class_names)
    if theirs == ours:
        return
    parts = []
    if theirs - ours:
        parts.append(f"missing {', '.join(sorted(theirs - ours))}")
    if ours - theirs:
        parts.append(f"not in the model: {', '.join(sorted(ours - theirs))}")
    raise RunError(
        f"{data_dir}: its class folders are not the classes of {source.path} "
        f"({'; '.join(parts)}); fine-tuning keeps the model's classes"
    )


def check_unchanged(record: dict[str, Any]) -> Path:
    """The source model file of a fine-tuned run being resumed, checked to be the one it
    started from (its SHA-256)."""
    model_file = Path(record["run"]) / MODEL_FILE
    if not model_file.is_file():
        raise RunError(f"{model_file}: the model this run fine-tunes is gone")
    if file_sha256(model_file) != record["model_sha256"]:
        raise RunError(f"{model_file}: the model this run fine-tunes has changed since it began")
    return model_file


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
