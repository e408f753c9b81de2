"""A toy modlabel model: a real, small ONNX CNN in modlabel's contract, made with
``onnx.helper`` alone (no TensorFlow), in milliseconds.

The graph (``modlabel.metadata`` states the contract)::

    image (N, H, W, 3) float32 NHWC
      -> Transpose to NCHW -> Conv (K filters, 3x3, stride 2, pad 1) -> Relu
      -> Transpose to NHWC                                  = activations (N, h, w, K)
      -> (from the NCHW Relu) GlobalAveragePool -> Flatten -> MatMul W (K, C) -> Add b
                                                            = logits (N, C)

with h = ceil(H / 2), w = ceil(W / 2). The metadata entry ``modlabel`` is written by
modlabel's own ``ModelInfo.to_json`` and carries the very W and b of the MatMul and the
Add, so logits = GAP(activations) @ W + b and the CAM/CRM that modlabel computes from the
activations explain the logits, as in an exported model.

``toy_onnx`` (session-scoped fixture, imported by conftest.py) is the default toy model.
The runtime tests use it instead of the TensorFlow-trained ``tiny_onnx``, so they run in a
virtual environment without TensorFlow (``make test-runtime``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from modlabel.decode import normalize
from modlabel.metadata import ACTIVATIONS, INPUT_NAME, LOGITS, METADATA_KEY, ModelInfo
from modlabel.ood import OutOfSetRule, gap_embedding, rate_threshold

OPSET = 17
IR_VERSION = 8  # what opset 17 came with; read by every onnxruntime modlabel supports
MEAN = STD = (127.5, 127.5, 127.5)  # pixels / 127.5 - 1
BACKBONE = "toy"
CONV = "toy_conv"
# The out-of-set rule is fitted, as export fits it, on the embeddings of seeded noise
# images (the toy's "training split"): a blank image is then far out of set.
OOD_FIT_IMAGES = 64
OOD_RATE = 0.05


def toy_model(
    path: str | Path,
    *,
    classes: Sequence[str] = ("a", "b", "c"),
    input_hw: tuple[int, int] = (32, 32),
    channels: int = 8,
    seed: int = 0,
    temperature: float = 1.0,
    out_of_set: bool = False,
) -> Path:
    """Write a toy model to ``path`` (an .onnx file) and return the path.

    classes: the class names (C of them); input_hw: (H, W) of the input; channels: K, the
    activations' channels; seed: the seed of all weights (the same seed, the same file);
    temperature: ``extra["temperature"]``; out_of_set: also store an out-of-set rule
    (``extra["out_of_set"]``, as ``OutOfSetRule.to_dict`` writes it).
    """
    height, width = (int(v) for v in input_hw)
    num_classes, k = len(classes), int(channels)
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0.0, 0.4, size=(k, 3, 3, 3)).astype(np.float32)  # (K, 3, kh, kw)
    conv_b = rng.normal(0.0, 0.1, size=k).astype(np.float32)
    head_w = rng.normal(0.0, 1.0, size=(k, num_classes)).astype(np.float32)  # (K, C)
    head_b = rng.normal(0.0, 0.1, size=num_classes).astype(np.float32)
    h, w = (height + 1) // 2, (width + 1) // 2

    graph = helper.make_graph(
        [
            helper.make_node("Transpose", [INPUT_NAME], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node(
                "Conv",
                ["nchw", "conv_w", "conv_b"],
                ["conv"],
                name=CONV,
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("Transpose", ["relu"], [ACTIVATIONS], perm=[0, 2, 3, 1]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
            helper.make_node("MatMul", ["embedding", "head_w"], ["scores"]),
            helper.make_node("Add", ["scores", "head_b"], [LOGITS]),
        ],
        "modlabel_toy",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", height, width, 3])],
        [
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", num_classes]),
            helper.make_tensor_value_info(ACTIVATIONS, TensorProto.FLOAT, ["N", h, w, k]),
        ],
        initializer=[
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(conv_b, "conv_b"),
            numpy_helper.from_array(head_w, "head_w"),
            numpy_helper.from_array(head_b, "head_b"),
        ],
    )
    model = helper.make_model(
        graph,
        producer_name="modlabel tests/toy_onnx.py",
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)

    info = ModelInfo(
        class_names=[str(c) for c in classes],
        input_size=(height, width),
        mean=MEAN,
        std=STD,
        head_weights=head_w,
        head_bias=head_b,
        backbone=BACKBONE,
        cut_layer=CONV,
        activation_shape=(h, w, k),
        extra={"temperature": float(temperature)},
    )
    if out_of_set:
        rule = _fit_out_of_set(model, info, seed)
        info = dataclasses.replace(info, extra={**info.extra, "out_of_set": rule.to_dict()})
    helper.set_model_props(model, {METADATA_KEY: info.to_json()})

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)
    return out


def noise_pixels(count: int, input_hw: tuple[int, int], *, seed: int = 0) -> np.ndarray:
    """Seeded uniform noise: (count, H, W, 3) uint8, the toy's "in-set" images."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, *input_hw, 3), dtype=np.uint8)


def write_pngs(folder: str | Path, count: int = 6, *, seed: int = 0) -> list[Path]:
    """``count`` seeded noise PNGs of assorted sizes (none the toy's input size) in
    ``folder``; returns their paths, sorted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        size = (int(rng.integers(20, 80)), int(rng.integers(20, 80)), 3)
        path = folder / f"noise_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, size=size, dtype=np.uint8)).save(path)
        paths.append(path)
    return sorted(paths)


def _fit_out_of_set(model: onnx.ModelProto, info: ModelInfo, seed: int) -> OutOfSetRule:
    """The rule ``export.calibrate`` would fit, on noise images labeled by the toy itself:
    class means and shared covariance of their GAP embeddings, threshold flagging at most
    OOD_RATE of them."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = noise_pixels(OOD_FIT_IMAGES, info.input_size, seed=seed + 1)
    logits, activations = session.run(
        [LOGITS, ACTIVATIONS], {INPUT_NAME: normalize(pixels, info.mean, info.std)}
    )
    embeddings = gap_embedding(activations)
    rule = OutOfSetRule.fit(embeddings, logits.argmax(axis=1), len(info.class_names), rate=OOD_RATE)
    threshold = rate_threshold(rule.scores_of(embeddings), OOD_RATE)
    return dataclasses.replace(rule, threshold=threshold, images=OOD_FIT_IMAGES)


@pytest.fixture(scope="session")
def toy_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default toy model: classes a, b, c; 32x32 input; 8 channels; T = 1; no
    out-of-set rule."""
    return toy_model(tmp_path_factory.mktemp("toy") / "toy.onnx")
