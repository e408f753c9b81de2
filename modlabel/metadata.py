"""What an ONNX file says about itself: modlabel's metadata (``ModelInfo``).

The ONNX file is all the runtime needs. Its contract:

* one input ``image``: (N, H, W, 3) float32, RGB, already resampled to the
  model's input size and normalized as ``(pixels - mean) / std``;
* two outputs: ``logits`` (N, C) float32, the dense layer's pre-softmax scores,
  and ``activations`` (N, h, w, K) float32, the last conv layer (the one that
  feeds global average pooling);
* the metadata entry ``modlabel`` (see ``ModelInfo``), a JSON document with the
  class names, the input size, the preprocessing, and the dense head's weights
  (K, C) and bias (C) that the maps are computed from; ``extra`` carries the
  fitted temperature and out-of-set rule.

``export/`` writes files of this shape with ``ModelInfo.to_json``; ``model``
reads them with onnxruntime, without TensorFlow.

A model that ``modlabel adopt`` took in (any ONNX CNN, a PyTorch export say) may
differ in three ways, each stated in its metadata: ``layout`` (the input is
(N, 3, H, W) for "nchw"), ``activations_layout`` (the activations are
(N, K, h, w) for "nchw"; ``model`` hands them on as (N, h, w, K) whatever the
file says), and ``layer_wise_only`` (the head is not pooling plus one dense
layer: no closed-form maps, only layer-wise CRM; the head's weights are then
(0, C) and its bias zeros). Its ``cut_layer`` is the activations' tensor in the graph,
where layer-wise CRM is drawn unless told another (``layer_crm``).
"""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from .codec import decode_array, encode_array
from .errors import ModelError
from .ood import OutOfSetRule

METADATA_KEY = "modlabel"
METADATA_FORMAT = 1
INPUT_NAME = "image"
LOGITS = "logits"
ACTIVATIONS = "activations"
LAYOUTS = ("nhwc", "nchw")  # channels last (Keras, modlabel's export), channels first (PyTorch)


@dataclass(frozen=True)
class ModelInfo:
    """What the ONNX metadata says about a modlabel model.

    head_weights: (K, C) float32, head_bias: (C,) float32.
    pooling: "mean" (Keras' GlobalAveragePooling2D: S_c = sum_k w_kc * mean_xy f_k + b_c).
    """

    class_names: list[str]
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    head_weights: np.ndarray
    head_bias: np.ndarray
    backbone: str = "unknown"
    cut_layer: str = ""
    activation_shape: tuple[int, int, int] = (0, 0, 0)  # (h, w, K)
    pooling: str = "mean"
    extra: dict[str, Any] = field(default_factory=dict)
    layout: str = "nhwc"  # the input's: (N, H, W, 3) or "nchw" (N, 3, H, W)
    activations_layout: str = "nhwc"  # (N, h, w, K) or "nchw" (N, K, h, w)
    layer_wise_only: bool = False  # no pool-plus-dense head: only layer-wise CRM applies

    def to_json(self) -> str:
        doc = {
            "format": METADATA_FORMAT,
            "class_names": list(self.class_names),
            "input_size": list(self.input_size),
            "preprocessing": {
                "resize": "bilinear",
                "channel_order": "RGB",
                "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std],
            },
            "head": {
                "weights": encode_array(np.asarray(self.head_weights, dtype=np.float32)),
                "bias": encode_array(np.asarray(self.head_bias, dtype=np.float32)),
                "pooling": self.pooling,
                "layer_wise_only": self.layer_wise_only,
            },
            "backbone": self.backbone,
            "cut_layer": self.cut_layer,
            "activation_shape": list(self.activation_shape),
            "layout": {"input": self.layout, "activations": self.activations_layout},
            "input_name": INPUT_NAME,
            "outputs": [LOGITS, ACTIVATIONS],
            "extra": self.extra,
        }
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        """Parse the metadata; ``ModelError`` says what is wrong with it."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"modlabel metadata is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ModelError("modlabel metadata is not a JSON object")
        if doc.get("format") != METADATA_FORMAT:
            raise ModelError(f"unsupported modlabel metadata format {doc.get('format')!r}")
        try:
            pre = doc["preprocessing"]
            info = cls(
                class_names=[str(n) for n in doc["class_names"]],
                input_size=(int(doc["input_size"][0]), int(doc["input_size"][1])),
                mean=tuple(float(v) for v in pre["mean"]),
                std=tuple(float(v) for v in pre["std"]),
                head_weights=decode_array(doc["head"]["weights"]).astype(np.float32),
                head_bias=decode_array(doc["head"]["bias"]).astype(np.float32),
                backbone=str(doc.get("backbone", "unknown")),
                cut_layer=str(doc.get("cut_layer", "")),
                activation_shape=tuple(int(v) for v in doc.get("activation_shape", (0, 0, 0))),
                pooling=doc["head"].get("pooling", "mean"),
                extra=doc.get("extra", {}),
                layout=str(doc.get("layout", {}).get("input", "nhwc")),
                activations_layout=str(doc.get("layout", {}).get("activations", "nhwc")),
                layer_wise_only=bool(doc["head"].get("layer_wise_only", False)),
            )
        except KeyError as exc:
            raise ModelError(f"modlabel metadata lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError, IndexError, AttributeError, binascii.Error) as exc:
            raise ModelError(f"modlabel metadata is malformed ({exc})") from None
        info.check()
        return info

    @property
    def temperature(self) -> float:
        """The temperature T the scan divides the logits by before the softmax
        (``extra["temperature"]``, fitted by export; 1.0 for models exported before)."""
        return float(self.extra.get("temperature", 1.0))

    @cached_property
    def out_of_set(self) -> OutOfSetRule | None:
        """The out-of-set rule of ``extra["out_of_set"]``; None for models exported before."""
        doc = self.extra.get("out_of_set")
        if doc is None:
            return None
        try:
            return OutOfSetRule.from_dict(doc)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ModelError(f"modlabel metadata's out_of_set is malformed ({exc})") from None

    def check(self) -> None:
        """Raise ``ModelError`` when the metadata contradicts itself."""
        n = len(self.class_names)
        if n < 2 or len(set(self.class_names)) != n:
            raise ModelError(f"metadata names {n} classes; a model needs 2 or more, all distinct")
        if self.head_weights.ndim != 2 or self.head_weights.shape[1] != n:
            raise ModelError(
                f"metadata names {n} classes but the head's weights have shape "
                f"{tuple(self.head_weights.shape)} (expected (K, {n}))"
            )
        if self.head_bias.shape != (n,):
            raise ModelError(
                f"the head's bias has shape {tuple(self.head_bias.shape)}, expected ({n},)"
            )
        if min(self.input_size) < 1 or len(self.mean) != 3 or len(self.std) != 3:
            raise ModelError("metadata needs a positive input size and 3 means and 3 stds")
        if any(v == 0 for v in self.std):
            raise ModelError("metadata has a zero std")
        if self.pooling not in ("mean", "sum"):
            raise ModelError(f"unknown pooling {self.pooling!r} (mean or sum)")
        for what, layout in (("input", self.layout), ("activations", self.activations_layout)):
            if layout not in LAYOUTS:
                raise ModelError(f"unknown {what} layout {layout!r} (nhwc or nchw)")
        temperature = self.extra.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
            raise ModelError(f"metadata's temperature {temperature!r} is not a positive number")
        rule = self.out_of_set
        if rule is not None and rule.means.shape != (
            len(self.class_names),
            self.head_weights.shape[0],
        ):
            raise ModelError(
                f"metadata's out-of-set class means have shape {rule.means.shape}; "
                f"expected ({len(self.class_names)}, {self.head_weights.shape[0]})"
            )
