"""modlabel's training: backbones cut as in the paper, the CRM head, the recipe,
hyperparameter search and evaluation. With ``export``, the only TensorFlow user.

Modules follow the data: ``data`` (archive -> splits -> tf.data), ``augment``,
``backbones`` (model), ``fit`` (train a run), ``search``, ``evaluate``.
"""

import os

# Most of TensorFlow's C++ start-up chatter (CPU features, ...) is noise for a user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
