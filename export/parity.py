"""Parity: does the exported ONNX graph compute what the Keras model computes?

Both are fed the same batch and compared three ways:

* logits: ``max |onnx - keras| <= atol_logits``, absolute, since labels and
  scores are made of them;
* activations: ``max |onnx - keras| / max |keras| <= rtol_activations``. The
  scale is the batch's largest activation, not each element: post-ReLU maps are
  mostly exact zeros, where an element-wise relative error means nothing;
* head: the ONNX logits equal ``GAP(onnx activations) @ W + b`` with the head
  that goes into the metadata, within ``atol_logits * max(1, max |logits|)``
  (float32 sums over K channels err in proportion to their size). CAM and CRM
  are computed from the activations and ``W`` alone (paper Eq. 1, 2, 6), so this
  is the check that the maps explain the logits the model reports.

A NaN or an infinity anywhere fails. This module needs numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from modlabel.decode import load_pixels
from modlabel.errors import ImageError

from .errors import ExportError


@dataclass(frozen=True)
class ParityResult:
    """The measured differences between the ONNX graph and the Keras model.

    samples: images in the compared batch.
    max_abs_logits_diff: max |onnx logits - keras logits|.
    max_rel_activations_diff: max |onnx act. - keras act.| / max |keras act.|.
    max_abs_head_diff: max |onnx logits - (GAP(onnx act.) @ W + b)|.
    logits_scale, activations_scale: max |keras logits|, max |keras activations|,
    to read the differences against.
    """

    samples: int
    max_abs_logits_diff: float
    max_rel_activations_diff: float
    max_abs_head_diff: float
    logits_scale: float
    activations_scale: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class ParityError(ExportError):
    """The ONNX graph does not reproduce the Keras model within tolerance.

    ``result`` holds the measured differences; the message names each one that
    is out of bounds.
    """

    def __init__(self, message: str, result: ParityResult | None = None) -> None:
        super().__init__(message)
        self.result = result


def random_pixels(input_size: Sequence[int], samples: int, *, seed: int = 0) -> np.ndarray:
    """Seeded uniform noise images: (samples, H, W, 3) uint8 in [0, 255].

    Off the training distribution, but they drive every op of the graph and
    need no data; real images are added where the run's data can be reached.
    """
    height, width = int(input_size[0]), int(input_size[1])
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(samples, height, width, 3), dtype=np.uint8)


def image_pixels(paths: Sequence[str | Path], input_size: Sequence[int]) -> np.ndarray:
    """The images at ``paths`` decoded and resized as the runtime does them:
    (N, H, W, 3) uint8. Files that cannot be decoded are skipped."""
    height, width = int(input_size[0]), int(input_size[1])
    loaded = []
    for path in paths:
        try:
            loaded.append(load_pixels(path, (height, width))[0])
        except ImageError:
            continue
    if not loaded:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack(loaded)


def check_parity(
    keras_outputs: tuple[np.ndarray, np.ndarray],
    onnx_outputs: tuple[np.ndarray, np.ndarray],
    head_weights: np.ndarray,
    head_bias: np.ndarray,
    *,
    atol_logits: float = 1e-4,
    rtol_activations: float = 1e-4,
) -> ParityResult:
    """Compare (logits (N, C), activations (N, h, w, K)) from Keras and ONNX.

    head_weights: (K, C), head_bias: (C,), as written to the metadata.
    Returns the measured differences; raises ``ParityError`` naming every
    difference out of bounds (the error's ``result`` holds them all).
    """
    keras_logits, keras_acts = (np.asarray(a) for a in keras_outputs)
    onnx_logits, onnx_acts = (np.asarray(a) for a in onnx_outputs)
    for name, expected, got in (
        ("logits", keras_logits, onnx_logits),
        ("activations", keras_acts, onnx_acts),
    ):
        if expected.shape != got.shape:
            raise ParityError(f"ONNX {name} have shape {got.shape}, Keras gives {expected.shape}")
    weights = np.asarray(head_weights, dtype=np.float64)
    bias = np.asarray(head_bias, dtype=np.float64)
    if (
        onnx_acts.ndim != 4
        or weights.shape != (onnx_acts.shape[-1], onnx_logits.shape[-1])
        or bias.shape != (onnx_logits.shape[-1],)
    ):
        raise ParityError(
            f"head weights {weights.shape} and bias {bias.shape} do not fit activations "
            f"{onnx_acts.shape} and logits {onnx_logits.shape}"
        )

    logits_scale = _max_abs(keras_logits)
    activations_scale = _max_abs(keras_acts)
    pooled = onnx_acts.astype(np.float64).mean(axis=(1, 2))
    result = ParityResult(
        samples=int(onnx_logits.shape[0]),
        max_abs_logits_diff=_max_abs_diff(onnx_logits, keras_logits),
        # An all-zero Keras map leaves the absolute difference to speak for itself.
        max_rel_activations_diff=_max_abs_diff(onnx_acts, keras_acts)
        / (activations_scale if activations_scale > 0 else 1.0),
        max_abs_head_diff=_max_abs_diff(onnx_logits, pooled @ weights + bias),
        logits_scale=logits_scale,
        activations_scale=activations_scale,
    )

    head_tolerance = atol_logits * max(1.0, logits_scale)
    failures = []
    # `not (x <= bound)` so that NaN fails too.
    if not result.max_abs_logits_diff <= atol_logits:
        failures.append(
            f"logits differ by up to {result.max_abs_logits_diff:.3g} "
            f"(tolerance {atol_logits:g}; logits up to {logits_scale:.3g})"
        )
    if not result.max_rel_activations_diff <= rtol_activations:
        failures.append(
            f"activations differ by up to {result.max_rel_activations_diff:.3g} "
            f"relative to their largest value {activations_scale:.3g} "
            f"(tolerance {rtol_activations:g})"
        )
    if not result.max_abs_head_diff <= head_tolerance:
        failures.append(
            f"logits differ from GAP(activations) @ W + b by up to "
            f"{result.max_abs_head_diff:.3g} (tolerance {head_tolerance:.3g}): "
            "the head in the metadata does not explain the graph's logits"
        )
    if not (np.isfinite(logits_scale) and np.isfinite(activations_scale)):
        failures.append("Keras outputs contain NaN or infinity")
    if failures:
        raise ParityError(
            f"ONNX export does not match Keras on {result.samples} images: " + "; ".join(failures),
            result,
        )
    return result


def _max_abs(a: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64)).max()) if a.size else 0.0


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return _max_abs(a.astype(np.float64) - b.astype(np.float64))
