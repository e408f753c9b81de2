"""A run directory's names: its files, and the layers of the CRM head that run.json names.

``train.fit`` and ``train.search`` write a run, ``train.evaluate`` and ``modlabel.export``
read it; these names are the contract between them, kept here once. No TensorFlow is
imported here, so that importing ``modlabel.export`` stays cheap (it imports TensorFlow
only when an export runs).
"""

from __future__ import annotations

RUN_JSON = "run.json"  # settings, class names, preprocessing, layer names
MODEL_FILE = "model.keras"  # best weights, no optimizer (what export reads)
SPLIT_CSV = "split.csv"  # the files of each split
METRICS_JSON = "metrics.json"  # test metrics (metrics_<split>.json for another split)
HISTORY_CSV = "history.csv"  # one row per finished epoch
SEARCH_CSV = "search.csv"  # one row per search trial
CHECKPOINTS = "checkpoints"  # last.keras, best.weights.h5, state.json

# The CRM head's layers as train.backbones builds them: export falls back on these where
# run.json does not name them.
ACTIVATION_LAYER = "crm_conv"
GAP_LAYER = "gap"
HEAD_LAYER = "logits"
