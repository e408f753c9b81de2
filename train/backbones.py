"""Backbones cut where the paper cuts them, topped with the paper's CRM head.

Every model is ``backbone (up to the cut layer) -> Conv2D(head_filters, 3x3,
same padding, ReLU) "crm_conv" -> GlobalAveragePooling2D "gap" -> Dense(C)
"logits"``: a flat functional Keras model whose single output is the logits
(no softmax), and whose ``crm_conv`` output is the activation map that CAM and
CRM weigh (paper sections 2.2 and 3).

Cut layers and the real map sizes at the default 300x300 input (tested):

===========  ====================  ====================  ========================
backbone     paper's cut           cut layer (Keras 3)   map at 300x300 (h, w, K)
===========  ====================  ====================  ========================
vgg16        deepest conv layer    ``block5_conv3``      18 x 18 x 512
inceptionv3  after ``mixed6``      ``mixed6``            17 x 17 x 768
xception     after ``add_11``      ``block13_add``       10 x 10 x 1024
tiny         (not in the paper)    ``tiny_block5_relu``  18 x 18 x 128
===========  ====================  ====================  ========================

``crm_conv`` keeps the spatial size, so the CRM maps have the sizes above with
``head_filters`` channels (512 for the paper backbones, 128 for tiny).

Xception: the paper's ``add_11`` is an automatic name. Keras numbers unnamed
layers per process (the first Xception built gets ``add`` .. ``add_11``, a
second one ``add_12`` .. ``add_23``), so the name is not stable. In a fresh
process ``add_11`` is the twelfth and last residual addition, the one that
closes the exit-flow block after ``block13_pool``; that is the layer we cut at,
found by structure (the ``Add`` fed by ``block13_pool``) and renamed
``block13_add``. Its map is 10x10 at 300x300 (and at Xception's native
299x299), not the 17x17 the paper reports for both models: the paper's size
holds for InceptionV3's ``mixed6`` only. The end of Xception's middle flow
(``add_10`` in a fresh process) would give 19x19x728 maps.

Input preprocessing (``input_normalization``): the runtime feeds RGB pixels,
bilinear-resized to the input size, as ``(pixels - mean) / std`` per channel.

* ``weights="none"`` (any backbone) and ``tiny`` always: mean and std are the
  per-channel statistics of the training split (``train.data.channel_stats``),
  stored in run.json.
* ``vgg16`` pretrained (``imagenet`` or a weights file): Keras' "caffe"
  preprocessing, the ImageNet BGR mean (103.939, 116.779, 123.68) written in
  RGB order, std 1. VGG16's ImageNet weights expect BGR input; instead of a
  channel flip in the graph, the input-channel axis of ``block1_conv1``'s
  kernel is reversed after loading, which makes the network take RGB and give
  the same outputs (up to float rounding).
* ``inceptionv3`` and ``xception`` pretrained: Keras' "tf" preprocessing,
  ``pixels / 127.5 - 1``, i.e. mean 127.5 and std 127.5 on RGB.

``weights`` is ``"none"`` (random initialization), ``"imagenet"`` (Keras'
own download and cache under ``$KERAS_HOME/models``), or the path of a local
``.h5`` / ``.weights.h5`` file holding the backbone's weights in Keras' layout
(for the paper backbones: Keras' ``*_notop.h5`` ImageNet file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from .errors import BackboneError, WeightsError
from .rundir import ACTIVATION_LAYER, GAP_LAYER, HEAD_LAYER

# Keras' ImageNet preprocessing, as (mean, std) on RGB pixels in [0, 255].
CAFFE_RGB = ((123.68, 116.779, 103.939), (1.0, 1.0, 1.0))
TF_RGB = ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5))

WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone and where to cut it.

    build: (input_shape, weights) -> the full headless Keras model.
    cut_layer: the stable name of the layer whose output feeds the head.
    paper_cut: the paper's name for it.
    min_size: the smallest input side Keras accepts.
    imagenet_file: Keras' no-top ImageNet weights file (None: none exist).
    pretrained_normalization: (mean, std) that pretrained weights expect.
    default_head_filters: ``crm_conv``'s filters unless told otherwise.
    """

    name: str
    build: Callable[[tuple[int, int, int], str | None], keras.Model]
    cut_layer: str
    paper_cut: str
    min_size: int
    imagenet_file: str | None
    pretrained_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None
    default_head_filters: int = 512

    @property
    def imagenet_url(self) -> str | None:
        if self.imagenet_file is None:
            return None
        folder = self.imagenet_file.split("_weights")[0]
        return f"{WEIGHTS_URL}{folder}/{self.imagenet_file}"


def _vgg16(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    return keras.applications.VGG16(include_top=False, weights=weights, input_shape=input_shape)


def _inceptionv3(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    return keras.applications.InceptionV3(
        include_top=False, weights=weights, input_shape=input_shape
    )


def _xception(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    base = keras.applications.Xception(include_top=False, weights=weights, input_shape=input_shape)
    # The paper's "add_11": the residual Add that closes block 13 (see module doc).
    pool_output = base.get_layer("block13_pool").output
    for layer in base.layers:
        if isinstance(layer, keras.layers.Add) and any(t is pool_output for t in layer.input):
            layer.name = "block13_add"
            return base
    raise BackboneError("Keras' Xception has no Add layer after block13_pool")  # pragma: no cover


def _tiny(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """Five 3x3 conv blocks (16-32-64-64-128 filters) with BatchNorm and four
    2x2 downsamplings: 300x300 -> 18x18, like VGG16's cut."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, (filters, stride, pool) in enumerate(
        [(16, 2, False), (32, 1, True), (64, 1, True), (64, 1, True), (128, 1, False)], start=1
    ):
        x = keras.layers.Conv2D(
            filters, 3, strides=stride, padding="same", use_bias=False, name=f"tiny_block{i}_conv"
        )(x)
        x = keras.layers.BatchNormalization(name=f"tiny_block{i}_bn")(x)
        x = keras.layers.Activation("relu", name=f"tiny_block{i}_relu")(x)
        if pool:
            x = keras.layers.MaxPooling2D(2, name=f"tiny_block{i}_pool")(x)
    return keras.Model(inputs, x, name="tiny")


BACKBONES: dict[str, Backbone] = {
    spec.name: spec
    for spec in (
        Backbone(
            name="vgg16",
            build=_vgg16,
            cut_layer="block5_conv3",
            paper_cut="block5_conv3 (the deepest conv layer)",
            min_size=32,
            imagenet_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            pretrained_normalization=CAFFE_RGB,
        ),
        Backbone(
            name="inceptionv3",
            build=_inceptionv3,
            cut_layer="mixed6",
            paper_cut="mixed6",
            min_size=75,
            imagenet_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            pretrained_normalization=TF_RGB,
        ),
        Backbone(
            name="xception",
            build=_xception,
            cut_layer="block13_add",
            paper_cut="add_11",
            min_size=71,
            imagenet_file="xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            pretrained_normalization=TF_RGB,
        ),
        Backbone(
            name="tiny",
            build=_tiny,
            cut_layer="tiny_block5_relu",
            paper_cut="(none: modlabel's small CNN for tests and the demo)",
            min_size=16,
            imagenet_file=None,
            pretrained_normalization=None,
            default_head_filters=128,
        ),
    )
}

CUT_LAYERS: dict[str, str] = {name: b.cut_layer for name, b in BACKBONES.items()}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}"
        ) from None


def is_pretrained(weights: str) -> bool:
    """True for ImageNet weights or a weights file, False for ``"none"``."""
    return weights != "none"


def input_normalization(
    backbone: str, weights: str
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) on RGB [0, 255] pixels this backbone and weights need,
    or None when they are to be measured on the training split."""
    spec = get_backbone(backbone)
    if not is_pretrained(weights) or spec.pretrained_normalization is None:
        return None
    return spec.pretrained_normalization


def build_model(
    backbone: str,
    num_classes: int,
    input_size: tuple[int, int],
    *,
    weights: str = "none",
    l2: float = 0.0,
    head_filters: int | None = None,
) -> keras.Model:
    """The backbone cut at its ``cut_layer`` plus the CRM head, uncompiled.

    input_size: (height, width) in pixels. Input: (N, H, W, 3) float32 RGB,
    normalized as ``input_normalization`` says. Output: (N, num_classes)
    logits. ``l2`` regularizes the kernels of the added layers (crm_conv and
    logits) only.
    """
    spec = get_backbone(backbone)
    height, width = int(input_size[0]), int(input_size[1])
    if min(height, width) < spec.min_size:
        raise BackboneError(
            f"{backbone} needs an input of at least {spec.min_size}x{spec.min_size} pixels; "
            f"got {height}x{width}"
        )
    if num_classes < 2:
        raise BackboneError(f"need at least 2 classes; got {num_classes}")
    base = _load_backbone(spec, (height, width, 3), weights)
    features = base.get_layer(spec.cut_layer).output
    regularizer = keras.regularizers.L2(l2) if l2 else None
    x = keras.layers.Conv2D(
        head_filters or spec.default_head_filters,
        3,
        padding="same",
        activation="relu",
        kernel_regularizer=regularizer,
        name=ACTIVATION_LAYER,
    )(features)
    x = keras.layers.GlobalAveragePooling2D(name=GAP_LAYER)(x)
    logits = keras.layers.Dense(num_classes, kernel_regularizer=regularizer, name=HEAD_LAYER)(x)
    return keras.Model(base.input, logits, name=f"modlabel_{backbone}")


def _load_backbone(spec: Backbone, input_shape: tuple[int, int, int], weights: str) -> keras.Model:
    if weights == "none":
        return spec.build(input_shape, None)
    if weights == "imagenet":
        base = _imagenet_backbone(spec, input_shape)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"--weights {weights}: no such file; pass 'imagenet', 'none', or the path of a "
                f".h5 / .weights.h5 file with {spec.name}'s weights"
            )
        if not path.name.endswith(".h5"):
            raise WeightsError(f"--weights {weights}: expected a .h5 or .weights.h5 file")
        base = spec.build(input_shape, None)
        try:
            base.load_weights(str(path))
        except Exception as exc:  # Keras raises ValueError, OSError or KeyError here
            raise WeightsError(
                f"--weights {weights}: cannot load into {spec.name}'s backbone: {exc}"
            ) from None
    if spec.name == "vgg16":
        _bgr_kernel_to_rgb(base.get_layer("block1_conv1"))
    return base


def _imagenet_backbone(spec: Backbone, input_shape: tuple[int, int, int]) -> keras.Model:
    if spec.imagenet_file is None:
        raise WeightsError(f"backbone {spec.name!r} has no ImageNet weights; use --weights none")
    cached = _keras_home() / "models" / spec.imagenet_file
    try:
        return spec.build(input_shape, "imagenet")
    except Exception as exc:
        if cached.is_file():
            raise
        # Keras wraps URLError/HTTPError in a bare Exception; offline lands here.
        raise WeightsError(
            f"cannot download {spec.name}'s ImageNet weights ({exc}). On a machine without "
            f"internet, fetch {spec.imagenet_url} elsewhere and pass "
            f"--weights /path/to/{spec.imagenet_file} (or place it in {cached.parent})"
        ) from None


def _keras_home() -> Path:
    # Keras' own rule (it has no public accessor): $KERAS_HOME, else ~/.keras.
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def _bgr_kernel_to_rgb(conv: keras.layers.Layer) -> None:
    """Reverse the input-channel axis of a conv kernel trained on BGR input, so
    the layer gives the same outputs on the same image in RGB order."""
    kernel, *rest = conv.get_weights()
    conv.set_weights([np.ascontiguousarray(kernel[:, :, ::-1, :]), *rest])


def activation_shape(model: keras.Model) -> tuple[int, int, int]:
    """(h, w, K) of the model's ``crm_conv`` output."""
    shape = model.get_layer(ACTIVATION_LAYER).output.shape
    return int(shape[1]), int(shape[2]), int(shape[3])
