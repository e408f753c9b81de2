"""The training recipe that a run's training (``train.fit``) and each trial of the
hyperparameter search (``train.search``) share: the run's model, its optimizer, loss
and metrics, its datasets, and the score both monitor.

Both train the model that ``build_for_run`` makes from the run's config, compiled by
``compile_model``, on the datasets of ``datasets``, and compare epochs (fit) and trials
(search) by ``MONITOR``.
"""

from __future__ import annotations

from typing import Any

import keras

from . import backbones
from .data import Split, make_dataset

# The plain validation cross-entropy. Keras' ``val_loss`` adds the L2 penalty, which says
# nothing about the validation images and differs between search trials.
MONITOR = "val_cross_entropy"


def compile_model(model: keras.Model, *, learning_rate: float, beta_1: float) -> keras.Model:
    """Adam on the sparse cross-entropy of the logits; accuracy and the plain
    cross-entropy (without the L2 penalty) as metrics."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate, beta_1=beta_1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # Weighted by the per-sample weights: class weights in training, and on
        # validation 0 for an unreadable file, 1 otherwise.
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="cross_entropy"),
        ],
    )
    return model


def build_for_run(config: dict[str, Any], *, l2: float | None = None) -> keras.Model:
    """The run's model, freshly initialized (or with its pretrained backbone)."""
    return backbones.build_model(
        config["backbone"],
        len(config["class_names"]),
        tuple(config["input_size"]),
        weights=config["weights"],
        l2=config["hyperparameters"]["l2"] if l2 is None else l2,
        head_filters=config["head_filters"],
    )


def datasets(split: Split, config: dict[str, Any]):
    """(train, val) tf.data pipelines of the run: train shuffled, augmented and
    weighted by the class weights (as per-sample weights)."""
    hp = config["hyperparameters"]
    common = {
        "input_size": tuple(config["input_size"]),
        "mean": config["mean"],
        "std": config["std"],
        "batch_size": hp["batch_size"],
        "seed": config["seed"],
    }
    weights = [config["class_weights"][name] for name in config["class_names"]]
    train = make_dataset(
        *split.paths_labels("train"), class_weights=weights, shuffle=True, augment=True, **common
    )
    val = make_dataset(*split.paths_labels("val"), **common)
    return train, val
