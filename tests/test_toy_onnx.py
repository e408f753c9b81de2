"""The toy model (tests/toy_onnx.py) keeps modlabel's ONNX contract: modlabel loads it, its
logits are the metadata's head over its pooled activations, and a real scan labels
images with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sqlalchemy as sa
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper
from toy_onnx import noise_pixels, toy_model, write_pngs

from modlabel.config import sqlite_url
from modlabel.decode import load_pixels, normalize
from modlabel.metadata import ACTIVATIONS, INPUT_NAME, LOGITS
from modlabel.model import OnnxModel

CPU = ["CPUExecutionProvider"]


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def reference_activations(batch: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The toy's Conv (3x3, stride 2, pad 1) + Relu in numpy, on and to NHWC:
    batch (N, H, W, 3) -> (N, ceil(H/2), ceil(W/2), K) float64."""
    padded = np.pad(batch.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = sliding_window_view(padded, (3, 3), axis=(1, 2))[:, ::2, ::2]  # n i j c a b
    conv = np.einsum("nijcab,kcab->nijk", windows, weights["conv_w"].astype(np.float64))
    return np.maximum(conv + weights["conv_b"], 0.0)


def test_modlabel_loads_the_toy_model_with_the_graphs_own_head(toy_onnx):
    info = OnnxModel(toy_onnx, device="cpu").info
    assert info.class_names == ["a", "b", "c"]
    assert info.input_size == (32, 32) and info.activation_shape == (16, 16, 8)
    assert info.temperature == 1.0 and info.out_of_set is None
    graph = onnx.load(toy_onnx).graph
    matmul = next(n for n in graph.node if n.op_type == "MatMul")
    add = next(n for n in graph.node if n.op_type == "Add")
    weights = initializers(toy_onnx)
    # Bit for bit the arrays the graph's head computes with.
    np.testing.assert_array_equal(info.head_weights, weights[matmul.input[1]])
    np.testing.assert_array_equal(info.head_bias, weights[add.input[1]])


def test_logits_are_the_metadata_head_over_the_pooled_nhwc_activations(toy_onnx):
    info = OnnxModel(toy_onnx, device="cpu").info
    session = ort.InferenceSession(str(toy_onnx), providers=CPU)
    batch = normalize(noise_pixels(5, info.input_size, seed=3), info.mean, info.std)
    logits, activations = session.run([LOGITS, ACTIVATIONS], {INPUT_NAME: batch})
    assert logits.shape == (5, 3) and activations.shape == (5, 16, 16, 8)
    pooled = activations.astype(np.float64).mean(axis=(1, 2))
    expected = pooled @ info.head_weights.astype(np.float64) + info.head_bias
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    # The activations are the conv's output in NHWC, not a reshaped NCHW buffer.
    reference = reference_activations(batch, initializers(toy_onnx))
    np.testing.assert_allclose(activations, reference, rtol=0, atol=1e-5)
    assert (activations > 0).any() and (activations == 0).any()


def test_the_options_shape_the_model_and_the_out_of_set_rule_flags_a_blank_image(tmp_path):
    path = toy_model(
        tmp_path / "toy.onnx",
        classes=("x", "y"),
        input_hw=(24, 40),
        channels=4,
        seed=1,
        temperature=2.0,
        out_of_set=True,
    )
    model = OnnxModel(path, device="cpu")
    info = model.info
    assert info.class_names == ["x", "y"] and info.input_size == (24, 40)
    assert info.activation_shape == (12, 20, 4) and info.head_weights.shape == (4, 2)
    assert info.temperature == 2.0
    rule = info.out_of_set
    assert rule is not None and rule.means.shape == (2, 4) and rule.threshold > 0
    pixels = np.concatenate([noise_pixels(20, (24, 40), seed=9), np.zeros((1, 24, 40, 3), "u1")])
    _, activations = model.run(model.preprocess(pixels))
    flags = rule.flags(rule.scores(activations))
    assert flags[-1]  # the blank image
    assert flags[:-1].mean() <= 0.25  # noise like the noise the rule was fitted on


def test_the_same_seed_gives_the_same_file(tmp_path):
    first = toy_model(tmp_path / "1.onnx").read_bytes()
    assert toy_model(tmp_path / "2.onnx").read_bytes() == first
    assert toy_model(tmp_path / "3.onnx", seed=1).read_bytes() != first


def test_modlabel_scan_labels_pngs_with_the_toy_model(toy_onnx, tmp_path):
    folder = tmp_path / "images"
    pngs = write_pngs(folder, 5)
    db = tmp_path / "labels.db"
    done = subprocess.run(
        [sys.executable, "-m", "modlabel", "scan", str(folder), "--model", str(toy_onnx),
         "--db", str(db)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr

    engine = sa.create_engine(sqlite_url(db))
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT path, label, confidence, crm, error FROM images ORDER BY path")
        ).all()
    engine.dispose()
    assert [Path(r.path).name for r in rows] == [p.name for p in pngs]
    model = OnnxModel(toy_onnx, device="cpu")
    pixels = np.stack([load_pixels(p, model.info.input_size)[0] for p in pngs])
    logits, _ = model.run(model.preprocess(pixels))
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for row, p in zip(rows, probabilities, strict=True):
        assert row.error is None and row.crm
        assert row.label == model.info.class_names[int(p.argmax())]
        assert abs(row.confidence - p.max()) < 1e-5  # T = 1: the plain softmax
