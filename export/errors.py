"""Errors of ``modlabel export``, with messages that say what went wrong."""

from __future__ import annotations

from modlabel.errors import ModlabelError


class ExportError(ModlabelError):
    """A run that cannot be exported: missing files, an unexpected model shape,
    a tf2onnx failure, or an unsupported opset."""


class QuantizationError(ExportError):
    """An int8 model that cannot be made or is refused: it disagrees with the
    fp32 model beyond ``--min-agreement``, its head no longer explains its
    logits, or the run's images to calibrate and check it on cannot be read."""
