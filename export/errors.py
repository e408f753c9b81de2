"""Errors of ``modlabel export``, with messages that say what went wrong."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modlabel.errors import ModlabelError

if TYPE_CHECKING:
    from .parity import ParityResult


class ExportError(ModlabelError):
    """A run that cannot be exported: missing files, an unexpected model shape,
    a tf2onnx failure, or an unsupported opset."""


class ParityError(ExportError):
    """The ONNX graph does not reproduce the Keras model within tolerance.

    ``result`` holds the measured differences; the message names each one that
    is out of bounds.
    """

    def __init__(self, message: str, result: ParityResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class QuantizationError(ExportError):
    """An int8 model that cannot be made or is refused: it disagrees with the
    fp32 model beyond ``--min-agreement``, its head no longer explains its
    logits, or the run's images to calibrate and check it on cannot be read."""
