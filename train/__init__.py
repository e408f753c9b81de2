"""modlabel's training: backbones cut as in the paper, the CRM head, the recipe,
hyperparameter search and evaluation. With ``modlabel.export``, the only TensorFlow user.

Shipped as ``modlabel.train`` (the folder ``train/`` of the repository).
Modules follow the data: ``data`` (archive -> splits -> tf.data), ``augment``,
``backbones`` (model), ``recipe`` (what training and search share), ``fit`` (train a
run), ``finetune`` (what a run fine-tuned from another takes from it), ``search``,
``evaluate``; ``rundir`` names a run directory's files for all of them and for export.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any


def load_tensorflow(*, verbose: bool = False) -> Any:
    """Import TensorFlow and start its devices, with its C++ start-up logs silenced.

    TensorFlow and XLA print a dozen lines to the process's stderr on start-up
    (oneDNN notes, CPU features, "could not find cuda drivers", a failed
    ``cuInit`` on a machine without a GPU), from native code and before their
    own log level applies, so a newcomer reads them as failures. They are
    written while stderr's file descriptor points at a scratch file, shown only
    when the import fails; ``verbose`` leaves them on stderr.
    """
    if verbose or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryFile(mode="w+b") as scratch:
        try:
            with _stderr_to(scratch.fileno()):
                import tensorflow as tf

                tf.config.list_physical_devices()  # device probing logs now, not mid-training
        except BaseException:
            scratch.seek(0)
            sys.stderr.write(scratch.read().decode("utf-8", errors="replace"))
            raise
    return tf


@contextlib.contextmanager
def _stderr_to(fd: int):
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
