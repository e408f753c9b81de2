"""Infer: the one path from pixels to what modlabel says about an image.

Every command that labels an image (scan, the Ray scan, explain, localize, the
report's evaluation, bench) goes through ``label_batch``, so each says the same
about the same image:

* the calibrated probabilities, softmax(logits / T) with the model's fitted
  temperature (``ModelInfo.temperature``; 1 for a model exported before);
* the label, its calibrated confidence, the runner-up and its probability;
* the out-of-set score and flag of the model's rule (``ood``; None for a model
  without one);
* the activations, their GAP embedding (the K-vector the dense head sees) and
  the maps of any registered method (``maps``), drawn for the predicted class.

The label is the argmax of the logits (the temperature changes no label).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from . import maps, perturb
from .calibration import calibrated_softmax
from .errors import ModelError
from .model import OnnxModel
from .ood import gap_embedding


@dataclass(frozen=True)
class ImageLabel:
    """What modlabel says about one image."""

    label: str
    confidence: float  # calibrated probability of ``label``
    runner_up: str
    runner_up_probability: float
    probabilities: dict[str, float]  # every class, calibrated
    ood_score: float | None
    out_of_set: bool | None  # None: the model has no out-of-set rule
    class_index: int

    def stored_label(self, *, abstain: bool = False) -> str | None:
        """The label as a scan stores it: none for a flagged image when ``abstain``."""
        return None if abstain and self.out_of_set else self.label


@dataclass(frozen=True)
class Labels:
    """A batch's outcome: N images, C classes.

    logits: (N, C) float32; probabilities: (N, C) float64, calibrated; top and
    second: (N,) int, the predicted class and the runner-up; ood_score: (N,)
    float64 or None; out_of_set: (N,) bool or None; activations: (N, h, w, K);
    inputs: (N, H, W, 3) float32, the batch as the model saw it (for the maps that run
    the model again: ``perturb``, and a layer's CRM, ``LayerMaps``).
    """

    model: OnnxModel
    logits: np.ndarray
    probabilities: np.ndarray
    top: np.ndarray
    second: np.ndarray
    ood_score: np.ndarray | None
    out_of_set: np.ndarray | None
    activations: np.ndarray
    inputs: np.ndarray

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def __getitem__(self, i: int) -> ImageLabel:
        names = self.model.info.class_names
        p = self.probabilities[i]
        top, second = int(self.top[i]), int(self.second[i])
        return ImageLabel(
            label=names[top],
            confidence=float(p[top]),
            runner_up=names[second],
            runner_up_probability=float(p[second]),
            probabilities={n: float(v) for n, v in zip(names, p, strict=True)},
            ood_score=None if self.ood_score is None else float(self.ood_score[i]),
            out_of_set=None if self.out_of_set is None else bool(self.out_of_set[i]),
            class_index=top,
        )

    @cached_property
    def embedding(self) -> np.ndarray:
        """(N, K) float64: the GAP of the activations, what the dense head sees."""
        return gap_embedding(self.activations)

    def terms(self, class_index: maps.ClassIndex = None) -> maps.Terms:
        """The maps' shared terms, for the predicted class unless ``class_index``.
        ``ModelError`` for a layer-wise-only model: it has no closed-form head."""
        info = self.model.info
        if info.layer_wise_only:
            raise ModelError(
                f"{self.model.path}: the model is layer-wise only (adopted with --layer: no "
                "pool-plus-dense head), so it has no closed-form maps; use --layer"
            )
        return maps.terms(
            self.activations,
            info.head_weights,
            bias=info.head_bias,
            class_index=self.top if class_index is None else class_index,
            pooling=info.pooling,
        )

    def rows(self, index: np.ndarray) -> Labels:
        """The images ``index`` picks (a boolean mask or positions), as a batch of their
        own: the maps of only these (``localize`` draws only the correctly classified)."""

        def pick(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[index]

        return Labels(
            self.model,
            self.logits[index],
            self.probabilities[index],
            self.top[index],
            self.second[index],
            pick(self.ood_score),
            pick(self.out_of_set),
            self.activations[index],
            inputs=self.inputs[index],
        )

    def maps(
        self,
        methods: Sequence[str] | None = None,
        *,
        class_index: maps.ClassIndex = None,
        perturbation: perturb.Options | None = None,
        layer_maps: LayerMaps | None = None,
    ) -> dict[str, np.ndarray]:
        """name -> (N, h, w) float32 of each method (the registry's defaults for None; RISE's
        at the input's size). The methods that run the model again (Score-CAM, RISE) run it
        on ``inputs`` with ``perturbation``'s options (``perturb.Options()`` for None).
        ``layer_maps``' maps (a layer's CRM) are drawn after the methods', on ``inputs``;
        its names among ``methods`` are its to draw."""
        if methods is not None and layer_maps is not None:  # "cam,crm@relu2" as typed too
            methods = [m for m in maps.method_names(methods) if m not in layer_maps.names]
        drawn: dict[str, np.ndarray] = {}
        if methods is None or methods:
            forward = perturb.Forward(
                self.inputs, self._logits_of, perturbation or perturb.Options()
            )
            drawn = maps.maps_of(self.terms(class_index), maps.parse_methods(methods), forward)
        if layer_maps is not None:
            drawn.update(layer_maps(self.inputs))
        return drawn

    def _logits_of(self, inputs: np.ndarray) -> np.ndarray:
        return self.model.run(inputs)[0]

    def crm(self) -> np.ndarray:
        """(N, h, w) float32, the CRM (Eq. 6-7) that a scan stores."""
        return maps.METHODS["crm"].fn(self.terms())


class LayerMaps(Protocol):
    """Maps computed by running part of the model again (``layer_crm.LayerCrm``: CRM at any
    layer), which ``explain`` and ``localize`` draw beside the registry's methods.

    names: the maps' names (``crm@<tensor>``); called with a batch's inputs (N, H, W, 3)
    float32 as the model saw them (``Labels.inputs``), it returns name -> (N, h, w) float32.
    """

    names: tuple[str, ...]

    def __call__(self, inputs: np.ndarray) -> dict[str, np.ndarray]: ...


def label_batch(model: OnnxModel, inputs: np.ndarray) -> Labels:
    """Run the model on (N, H, W, 3) float32 inputs, normalized (``model.preprocess``)."""
    logits, activations = model.run(inputs)
    info = model.info
    probabilities = calibrated_softmax(logits, info.temperature)
    order = np.argsort(-np.asarray(logits, dtype=np.float64), axis=-1, kind="stable")
    top = order[:, 0]
    second = order[:, 1] if order.shape[1] > 1 else order[:, 0]
    rule = info.out_of_set
    score = rule.scores(activations) if rule is not None else None
    flags = rule.flags(score) if rule is not None else None
    return Labels(
        model, logits, probabilities, top, second, score, flags, activations, inputs=inputs
    )


def label_pixels(model: OnnxModel, pixels: np.ndarray) -> Labels:
    """``label_batch`` of (N, H, W, 3) uint8 pixels at the model's input size."""
    return label_batch(model, model.preprocess(np.asarray(pixels)))


def describe(image: ImageLabel) -> dict[str, Any]:
    """The fields every output carries for a labeled image, by name."""
    return {
        "label": image.label,
        "confidence": image.confidence,
        "runner_up": image.runner_up,
        "runner_up_probability": image.runner_up_probability,
        "out_of_set": image.out_of_set,
        "ood_score": image.ood_score,
    }
