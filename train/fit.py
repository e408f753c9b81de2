"""Train the paper's model on a folder-per-class archive, into a run directory.

Recipe (paper sections 2.1-2.2): input resampled to ``input_size`` and
normalized as ``train.backbones.input_normalization`` says; rotation and
shift augmentation on the training split only (``train.augment``); Adam with
``learning_rate`` and ``beta_1`` (the paper's "momentum"), mini-batches of 10;
L2 regularization on the added layers; class weights ``n / (C * n_c)``
("balanced") against class imbalance. Training stops early when the
validation cross-entropy has not improved for ``patience`` epochs, and the
weights of the epoch with the lowest validation cross-entropy are kept. (Keras'
``val_loss`` adds the L2 penalty, which says nothing about the validation
images and differs between search trials, so the plain cross-entropy is what
we monitor and compare.)

``search=N`` first runs N short trials (``search_epochs`` epochs each) with
hyperparameters drawn from the paper's ranges (``train.search``), then
retrains the best from scratch with the full recipe.

The run directory::

    RUN/run.json          settings, class names, preprocessing, layer names
    RUN/model.keras       best weights, no optimizer (what export reads)
    RUN/metrics.json      test metrics (train.evaluate)
    RUN/history.csv       one row per finished epoch
    RUN/split.csv         the files of each split
    RUN/search.csv        one row per search trial (with search=N)
    RUN/checkpoints/      last.keras (with optimizer), best.weights.h5, state.json

Interrupting (Ctrl-C) keeps the last finished epoch; ``resume=True`` goes on
from it with the run's saved settings.

``resume_from=RUN`` fine-tunes RUN's model on ``data_dir`` into a new run of the
same layout (``train.finetune``: the model, classes and preprocessing of RUN, a
tenth of the learning rate by default); run.json records it under
``fine_tuned_from``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from modlabel.metrics import format_metrics_table

from . import backbones
from .augment import AUGMENTATION
from .data import (
    STATS_MAX_IMAGES,
    Split,
    channel_stats,
    discover_split,
    read_split_csv,
    write_split_csv,
)
from .errors import RunError, TrainingInterrupted
from .evaluate import evaluate_run
from .finetune import (
    FINETUNE_EPOCHS,
    FINETUNE_LEARNING_RATE,
    MODEL_KEYS,
    SourceRun,
    check_same_classes,
    check_unchanged,
    load_source_run,
)
from .recipe import MONITOR, build_for_run, compile_model, datasets
from .rundir import (
    ACTIVATION_LAYER,
    CHECKPOINTS,
    GAP_LAYER,
    HEAD_LAYER,
    HISTORY_CSV,
    METRICS_JSON,
    MODEL_FILE,
    RUN_JSON,
    SPLIT_CSV,
)
from .search import run_search

DEFAULT_EPOCHS = 30
DEFAULT_PATIENCE = 5
DEFAULT_LEARNING_RATE = 1e-3


def train_run(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    backbone: str = "tiny",
    input_size: tuple[int, int] = (300, 300),
    epochs: int | None = None,
    batch_size: int = 10,
    seed: int = 0,
    weights: str = "none",
    learning_rate: float | None = None,
    beta_1: float = 0.9,
    l2: float = 1e-4,
    patience: int = DEFAULT_PATIENCE,
    search: int = 0,
    search_epochs: int = 2,
    head_filters: int | None = None,
    resume: bool = False,
    resume_from: str | Path | None = None,
    verbose: bool = True,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> Path:
    """Train, keep the best epoch, evaluate on the test split; returns the run dir.

    input_size: (height, width). epochs: the most epochs to train (default
    DEFAULT_EPOCHS); on resume, None keeps the run's own number. learning_rate:
    default DEFAULT_LEARNING_RATE, FINETUNE_LEARNING_RATE with ``resume_from``.
    With ``resume``, every other setting is read from the run's run.json.
    ``resume_from``: a finished run whose model is fine-tuned on ``data_dir``
    (``train.finetune``); its backbone, input size, head and normalization are
    the new run's, and ``backbone``, ``input_size``, ``weights``,
    ``head_filters`` and ``search`` do not apply. ``callbacks`` are extra Keras
    callbacks for the final training.
    """
    out = Path(out_dir).expanduser()
    say = _printer(verbose)
    if resume and resume_from is not None:
        raise RunError(
            "--resume continues the run at --out, --resume-from starts a new one from "
            "another run's model: pass one of them"
        )
    if resume:
        config, split = _load_for_resume(out)
        if epochs is not None:
            config["hyperparameters"]["epochs"] = int(epochs)
        say(
            f"resuming {out} ({config['backbone']}, {config['input_size'][0]}x"
            f"{config['input_size'][1]}, seed {config['seed']}) with its saved settings"
        )
    else:
        if (out / RUN_JSON).exists():
            raise RunError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --out"
            )
        hyperparameters = {
            "optimizer": "adam",
            "learning_rate": learning_rate,
            "beta_1": beta_1,
            "beta_2": 0.999,
            "l2": l2,
            "batch_size": batch_size,
            "patience": patience,
            "epochs": epochs,
            "monitor": MONITOR,
            "search": search,
            "search_epochs": search_epochs,
        }
        if resume_from is not None:
            if search:
                raise RunError("--search trains fresh models: it does not go with --resume-from")
            config, split = _start_finetune(data_dir, out, resume_from, seed, hyperparameters)
            say(f"fine-tuning the model of {config['fine_tuned_from']['run']} on {split.root}")
        else:
            if learning_rate is None:
                hyperparameters["learning_rate"] = DEFAULT_LEARNING_RATE
            hyperparameters["epochs"] = int(epochs or DEFAULT_EPOCHS)
            split = discover_split(data_dir, seed=seed)
            # Bad backbone, input size or weights fail here, before the run dir is made.
            backbones.build_model(
                backbone,
                len(split.class_names),
                input_size,
                weights=weights,
                head_filters=head_filters,
            )
            _make_dir(out)
            write_split_csv(split, out / SPLIT_CSV)
            config = _new_config(
                split,
                backbone=backbone,
                input_size=input_size,
                seed=seed,
                weights=weights,
                head_filters=head_filters,
                hyperparameters=hyperparameters,
                say=say,
            )
        _write_json(out / RUN_JSON, config)
    say(_describe(config))

    state = _read_state(out)
    if state.get("finished") and (out / MODEL_FILE).exists():
        say("this run has finished training; evaluating its model")
    else:
        _set_seed(config["seed"])
        hp = config["hyperparameters"]
        try:
            if hp.get("search") and not state.get("epoch"):
                best = run_search(split, config, out, say=say)
                hp.update(best)
                _write_json(out / RUN_JSON, config)
            _fit(split, config, out, resume=resume, say=say, extra_callbacks=callbacks or [])
        except KeyboardInterrupt:
            done = _read_state(out).get("epoch", 0)
            raise TrainingInterrupted(
                f"training interrupted after {done} finished epoch(s); continue with "
                f"`modlabel train ... --out {out} --resume`"
            ) from None

    metrics = evaluate_run(out)
    if verbose:
        print(f"\ntest metrics ({out / METRICS_JSON}):")
        print(format_metrics_table(metrics))
    return out


def _new_config(
    split: Split,
    *,
    backbone: str,
    input_size: tuple[int, int],
    seed: int,
    weights: str,
    head_filters: int | None,
    hyperparameters: dict[str, Any],
    say,
) -> dict[str, Any]:
    height, width = int(input_size[0]), int(input_size[1])
    spec = backbones.get_backbone(backbone)
    normalization = backbones.input_normalization(backbone, weights)
    train_paths, train_labels = split.paths_labels("train")
    if normalization is None:
        say(
            f"measuring the per-channel mean and std of the training split "
            f"({min(len(train_paths), STATS_MAX_IMAGES)} images)"
        )
        mean, std = channel_stats(train_paths, (height, width), seed=seed)
        source = "training split (per-channel mean and std of resampled RGB pixels)"
    else:
        mean, std = (list(v) for v in normalization)
        source = f"{backbone} ImageNet preprocessing"
    class_weights = _class_weights(split)
    if weights not in ("none", "imagenet"):
        weights = str(Path(weights).expanduser().resolve())
    return {
        "format": 1,
        "status": "training",
        "data_dir": str(split.root),
        "class_names": split.class_names,
        "input_size": [height, width],
        "channel_order": "RGB",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "normalization_source": source,
        "backbone": backbone,
        "weights": weights,
        "cut_layer": spec.cut_layer,
        "paper_cut_layer": spec.paper_cut,
        "activation_layer": ACTIVATION_LAYER,
        "gap_layer": GAP_LAYER,
        "head_layer": HEAD_LAYER,
        "head_filters": int(head_filters or spec.default_head_filters),
        "seed": int(seed),
        "hyperparameters": hyperparameters,
        "augmentation": AUGMENTATION,
        "class_weights": class_weights,
        "class_weighting": "balanced: n_train / (num_classes * n_train_of_class)",
        "split_counts": split.counts(),
        "split_source": split.source,
    }


def _start_finetune(
    data_dir: str | Path,
    out: Path,
    resume_from: str | Path,
    seed: int,
    hyperparameters: dict[str, Any],
) -> tuple[dict[str, Any], Split]:
    """A new fine-tuning run at ``out`` of the model of ``resume_from`` on ``data_dir``:
    the split (written to ``out``) and run.json's content."""
    source = load_source_run(resume_from)
    if out.resolve() == source.path:
        raise RunError(f"--out {out} is the run to fine-tune: choose another --out")
    split = discover_split(data_dir, seed=seed, sparse=True)
    check_same_classes(source, data_dir, split.class_names)
    hp = dict(hyperparameters)
    if hp["learning_rate"] is None:
        hp["learning_rate"] = FINETUNE_LEARNING_RATE
    hp["epochs"] = int(hp["epochs"] or FINETUNE_EPOCHS)
    # The loaded model's L2 regularizers are the source run's: record those.
    hp["l2"] = source.config.get("hyperparameters", {}).get("l2", hp["l2"])
    _make_dir(out)
    write_split_csv(split, out / SPLIT_CSV)
    return _finetune_config(split, source, seed=seed, hyperparameters=hp), split


def _finetune_config(
    split: Split, source: SourceRun, *, seed: int, hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """run.json of a fine-tuned run: the source run's model, classes and preprocessing
    (``finetune.MODEL_KEYS``), this data set's files and class weights."""
    kept = {key: source.config[key] for key in MODEL_KEYS if key in source.config}
    return {
        "format": 1,
        "status": "training",
        "data_dir": str(split.root),
        **kept,
        "seed": int(seed),
        "hyperparameters": hyperparameters,
        "augmentation": AUGMENTATION,
        "class_weights": _class_weights(split),
        "class_weighting": "balanced: n_train / (num_classes * n_train_of_class)",
        "split_counts": split.counts(),
        "split_source": split.source,
        "fine_tuned_from": source.record(),
    }


def _class_weights(split: Split) -> dict[str, float]:
    """ "Balanced" class weights ``n_train / (C * n_train_of_class)`` (0 for a class
    without training images, which only fine-tuning allows)."""
    _, train_labels = split.paths_labels("train")
    counts = np.bincount(train_labels, minlength=len(split.class_names))
    return {
        name: float(len(train_labels) / (len(counts) * n)) if n else 0.0
        for name, n in zip(split.class_names, counts, strict=True)
    }


def _describe(config: dict[str, Any]) -> str:
    hp = config["hyperparameters"]
    counts = config["split_counts"]
    lines = [
        f"backbone {config['backbone']} (weights {config['weights']}), cut at "
        f"{config['cut_layer']}, input {config['input_size'][0]}x{config['input_size'][1]}",
        f"classes: {', '.join(config['class_names'])}",
        "images: " + ", ".join(f"{s} {sum(counts[s].values())}" for s in ("train", "val", "test")),
        "mean "
        + ", ".join(f"{v:.3f}" for v in config["mean"])
        + "; std "
        + ", ".join(f"{v:.3f}" for v in config["std"])
        + f" ({config['normalization_source']})",
        "class weights: " + ", ".join(f"{k} {v:.3f}" for k, v in config["class_weights"].items()),
        f"adam lr {hp['learning_rate']:.3g} beta_1 {hp['beta_1']:.3g}, L2 {hp['l2']:.3g}, "
        f"batch {hp['batch_size']}, up to {hp['epochs']} epochs, patience {hp['patience']}",
    ]
    return "\n".join(lines)


def _fit(
    split: Split,
    config: dict[str, Any],
    out: Path,
    *,
    resume: bool,
    say,
    extra_callbacks: list[keras.callbacks.Callback],
) -> None:
    hp = config["hyperparameters"]
    ckpt = out / CHECKPOINTS
    _make_dir(ckpt)
    state = _read_state(out)
    last = ckpt / "last.keras"
    if resume and last.exists() and state.get("epoch"):
        model = keras.saving.load_model(last)
        initial_epoch = int(state["epoch"])
        say(
            f"continuing after epoch {initial_epoch} (best {MONITOR} {state.get('best')} "
            f"at epoch {state.get('best_epoch')})"
        )
    else:
        keras.utils.set_random_seed(config["seed"])
        source = config.get("fine_tuned_from")
        if source is not None:
            start = keras.saving.load_model(check_unchanged(source), compile=False)
        else:
            start = build_for_run(config)
        model = compile_model(start, learning_rate=hp["learning_rate"], beta_1=hp["beta_1"])
        initial_epoch, state = 0, {}
    _keep_history_rows(out / HISTORY_CSV, initial_epoch)
    train_ds, val_ds = datasets(split, config)
    checkpoint = RunCheckpoint(out, patience=hp["patience"], state=state)
    # A run stopped (by patience or its last epoch) but killed before it was
    # finalized has nothing left to train.
    if initial_epoch < hp["epochs"] and checkpoint.state["wait"] < hp["patience"]:
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=hp["epochs"],
            initial_epoch=initial_epoch,
            shuffle=False,
            callbacks=[checkpoint, *extra_callbacks],
            verbose=_keras_verbosity(say),
        )
    if not (ckpt / "best.weights.h5").exists():
        raise RunError(
            f"{out}: no epoch finished with a finite {MONITOR}; try a lower learning rate"
        )
    # model.keras holds the best weights without the optimizer's state.
    best = keras.Model.from_config(model.get_config())
    best.load_weights(ckpt / "best.weights.h5")
    _atomic_save(best, out / MODEL_FILE)
    config["status"] = "finished"
    config["best_epoch"] = checkpoint.state["best_epoch"]
    config["best_" + MONITOR] = checkpoint.state["best"]
    config["epochs_trained"] = checkpoint.state["epoch"]
    config["activation_shape"] = list(backbones.activation_shape(best))
    _write_json(out / RUN_JSON, config)
    checkpoint.state["finished"] = True
    _write_json(ckpt / "state.json", checkpoint.state)
    say(
        f"best epoch {config['best_epoch']} ({MONITOR} {config['best_' + MONITOR]:.4f}); "
        f"saved {out / MODEL_FILE}"
    )


class RunCheckpoint(keras.callbacks.Callback):
    """Per finished epoch: history row, resumable checkpoint, best weights,
    early stopping. Its state (epoch, best, best_epoch, wait) is saved with the
    checkpoint, so a resumed run stops and keeps the best as if uninterrupted."""

    def __init__(self, out: Path, *, patience: int, state: dict[str, Any] | None = None):
        super().__init__()
        self.out = out
        self.patience = patience
        # best: the lowest MONITOR so far, None until an epoch gives a finite one.
        self.state = {"epoch": 0, "best": None, "best_epoch": None, "wait": 0, **(state or {})}
        self._started = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        logs = dict(logs or {})
        score = float(logs.get(MONITOR, math.nan))
        ckpt = self.out / CHECKPOINTS
        best = self.state["best"]
        if math.isfinite(score) and (best is None or score < best):
            self.state.update(best=score, best_epoch=epoch + 1, wait=0)
            # Written aside and renamed: an interrupt never leaves a torn file to resume from.
            tmp = ckpt / "best.tmp.weights.h5"
            self.model.save_weights(tmp)
            os.replace(tmp, ckpt / "best.weights.h5")
        else:
            self.state["wait"] += 1
        self.state["epoch"] = epoch + 1
        _append_history(self.out / HISTORY_CSV, epoch + 1, logs, time.monotonic() - self._started)
        _atomic_save(self.model, ckpt / "last.keras")
        _write_json(ckpt / "state.json", self.state)
        if self.state["wait"] >= self.patience or not math.isfinite(float(logs.get("loss", 0))):
            self.model.stop_training = True


def _append_history(path: Path, epoch: int, logs: dict[str, Any], seconds: float) -> None:
    keys = sorted(k for k in logs if k != "learning_rate")
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["epoch", *keys, "seconds"])
        writer.writerow([epoch, *(f"{float(logs[k]):.6g}" for k in keys), f"{seconds:.1f}"])


def _keep_history_rows(path: Path, epochs_done: int) -> None:
    """Drop history rows of epochs after the checkpoint (a crash between the two)."""
    if not path.exists():
        return
    if epochs_done == 0:
        path.unlink()
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0], *(r for r in rows[1:] if int(r[0]) <= epochs_done)]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


def _load_for_resume(out: Path) -> tuple[dict[str, Any], Split]:
    if not (out / RUN_JSON).exists():
        raise RunError(f"{out}: no run to resume (no {RUN_JSON}); start it without --resume")
    config = json.loads((out / RUN_JSON).read_text())
    split = read_split_csv(out / SPLIT_CSV, config["data_dir"], config["class_names"])
    return config, split


def _read_state(out: Path) -> dict[str, Any]:
    path = out / CHECKPOINTS / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _set_seed(seed: int) -> None:
    import tensorflow as tf

    # Retracing notices (one model per search trial) are noise in a progress log.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    keras.utils.set_random_seed(seed)
    # Same seed, same data and machine -> the same weights, at some cost in speed.
    tf.config.experimental.enable_op_determinism()


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"{path}: cannot create the run directory: {exc.strerror}") from None


def _atomic_save(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _printer(verbose: bool):
    def say(message: str) -> None:
        if verbose:
            print(message, flush=True)

    say.verbose = verbose  # type: ignore[attr-defined]
    return say


def _keras_verbosity(say) -> int:
    if not getattr(say, "verbose", False):
        return 0
    return 1 if sys.stdout.isatty() else 2
