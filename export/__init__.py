"""Export: a training run to the one ONNX file the runtime needs.

``export_run(RUN, OUT)`` converts RUN/model.keras with tf2onnx into a graph
with outputs ``logits`` and ``activations``, writes the class names, the
preprocessing and the dense head into its metadata, and checks it against
Keras before writing (``ParityError`` when they differ). With ``train/``, the
only package that imports TensorFlow, and only when an export runs.
"""

from .errors import ExportError
from .onnx_export import ExportReport, export_run, model_info_from_run
from .parity import ParityError, ParityResult, check_parity

__all__ = [
    "ExportError",
    "ExportReport",
    "ParityError",
    "ParityResult",
    "check_parity",
    "export_run",
    "model_info_from_run",
]
