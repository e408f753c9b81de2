"""Layer-wise CRM (Eq. 6-7 by ablation): equal to the closed form at the last conv layer,
to a per-element brute force at an intermediate layer and behind a hidden dense layer,
and drawn by explain and localize with --layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from foreign_onnx import INPUT, MASK, cnn_nchw, masked
from toy_onnx import noise_pixels, write_pngs
from typer.testing import CliRunner

from modlabel.adopt import adopt_model
from modlabel.cli import app
from modlabel.errors import ModelError
from modlabel.infer import label_pixels
from modlabel.layer_crm import LayerCut, layer_crm
from modlabel.metadata import LOGITS
from modlabel.model import OnnxModel

runner = CliRunner()
CLASSES = ["a", "b", "c"]
# float32 scores S and S(l, m) differ by little at a location: their difference keeps
# fewer digits than either, so maps are compared relative to their largest value.
TOLERANCE = 1e-5
# Weights of the brute-force models: with std 0.1 a removal moves the scores of a
# 4 x 4 map by ~1e-3 against biases of ~0.1, so float32's rounding of the scores alone is
# ~1e-5 of the map; with 0.3, ~2e-6 (measured over seeds).
BRUTE_FORCE_STD = 0.3


def assert_same_map(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert want.max() > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * float(want.max()))


def brute_force(masked_path: Path, model: OnnxModel, pixels: np.ndarray, hw: tuple[int, int]):
    """R(l, m) = sum_c (S_c - S_c(l, m))^2, one full run of the masked model per element."""
    session = ort.InferenceSession(str(masked_path), providers=["CPUExecutionProvider"])
    x = model.feed(model.preprocess(pixels))
    h, w = hw
    full = session.run([LOGITS], {INPUT: x, MASK: np.ones((1, 1, h, w), np.float32)})[0]
    out = np.zeros((len(x), h, w), np.float64)
    for i in range(h):
        for j in range(w):
            mask = np.ones((1, 1, h, w), np.float32)
            mask[0, 0, i, j] = 0
            removed = session.run([LOGITS], {INPUT: x, MASK: mask})[0]
            out[:, i, j] = ((full.astype(np.float64) - removed) ** 2).sum(axis=1)
    return out


def adopted(tmp_path: Path, **kwargs) -> OnnxModel:
    layer = kwargs.pop("layer", None)
    source = cnn_nchw(tmp_path / "net.onnx", **kwargs)
    out = adopt_model(source, tmp_path / "adopted.onnx", class_names=CLASSES, layer=layer)
    return OnnxModel(out.path, device="cpu")


def test_at_the_last_conv_layer_it_is_the_closed_form(toy_onnx, tmp_path):
    """modlabel's own (NHWC) toy, cut at its NCHW Relu, and an adopted NCHW model."""
    pixels = noise_pixels(3, (32, 32))
    toy = OnnxModel(toy_onnx, device="cpu")
    cut = LayerCut(toy, "relu")
    assert cut.layout == "nchw" and cut.sides == ()
    assert_same_map(layer_crm(cut, toy.preprocess(pixels)), label_pixels(toy, pixels).crm())

    model = adopted(tmp_path, input_hw=(16, 16))
    pixels = noise_pixels(3, (16, 16), seed=1)
    got = layer_crm(LayerCut(model, model.info.cut_layer), model.preprocess(pixels))
    assert_same_map(got, label_pixels(model, pixels).crm())


def test_at_an_intermediate_layer_it_is_the_brute_force(tmp_path):
    """Cut inside a residual block (the Add also reads relu2 from below the cut) and at a
    MaxPool's output; batches of 5 ablations cross from one image to the next."""
    source = cnn_nchw(tmp_path / "net.onnx", residual=True, input_hw=(12, 12), std=BRUTE_FORCE_STD)
    model = OnnxModel(
        adopt_model(source, tmp_path / "a.onnx", class_names=CLASSES).path, device="cpu"
    )
    pixels = noise_pixels(2, (12, 12), seed=3)
    for layer, hw, sides in (("relu3", (6, 6), ("relu2",)), ("pool1", (6, 6), ())):
        cut = LayerCut(model, layer)
        assert tuple(s.name for s in cut.sides) == sides
        got = layer_crm(cut, model.preprocess(pixels), batch_size=5)
        want = brute_force(masked(model.path, layer, tmp_path / "m.onnx"), model, pixels, hw)
        assert_same_map(got, want.astype(np.float32))
    # Not the closed form of the last layer: another layer, another map.
    assert got.shape == label_pixels(model, pixels).crm().shape


def test_behind_a_hidden_dense_layer_and_in_explain(tmp_path):
    """A head adopt refuses (Gemm -> Relu -> Gemm), adopted with --layer: layer-wise only,
    its CRM by ablation equals the brute force, and explain draws it."""
    model = adopted(tmp_path, head="hidden", layer="relu2", input_hw=(8, 8), std=BRUTE_FORCE_STD)
    assert model.info.layer_wise_only
    pixels = noise_pixels(2, (8, 8), seed=4)
    got = layer_crm(LayerCut(model, "relu2"), model.preprocess(pixels), max_batch_bytes=1)
    want = brute_force(masked(model.path, "relu2", tmp_path / "m.onnx"), model, pixels, (4, 4))
    assert_same_map(got, want.astype(np.float32))
    with pytest.raises(ModelError, match="layer-wise only"):
        label_pixels(model, pixels).crm()

    images = tmp_path / "images"
    write_pngs(images, 2)
    result = runner.invoke(
        app,
        ["explain", str(images), "--model", str(model.path), "--out", str(tmp_path / "fig"),
         "--format", "json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    explained = json.loads(result.output)
    assert [list(r["roi"]) for r in explained] == [["crm@relu2"], ["crm@relu2"]]
    assert all(Path(r["figure"]).is_file() for r in explained)


def test_explain_layer_draws_it_beside_the_methods(toy_onnx, tmp_path):
    images = tmp_path / "images"
    write_pngs(images, 1)
    result = runner.invoke(
        app,
        ["explain", str(images), "--model", str(toy_onnx), "--out", str(tmp_path / "fig"),
         "--format", "json", "--methods", "crm", "--layer", "relu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (explained,) = json.loads(result.output)
    # The same map twice (the last conv layer): the same ROI.
    assert explained["roi"]["crm@relu"] == explained["roi"]["crm"]


def test_a_layer_that_is_not_one_is_named(toy_onnx):
    toy = OnnxModel(toy_onnx, device="cpu")
    with pytest.raises(ModelError, match="no tensor 'nope'.*include nchw, conv, relu"):
        LayerCut(toy, "nope")
    with pytest.raises(ModelError, match="the logits are not computed from 'activations'"):
        LayerCut(toy, "activations")  # an output beside the logits, not below them
    bad = runner.invoke(
        app, ["explain", "x.png", "--model", str(toy_onnx), "--layer", "nope"]
    )  # fmt: skip
    assert bad.exit_code == 4 and "no tensor 'nope'" in bad.output


def test_labels_draw_a_layers_crm_beside_the_methods_for_the_rows_picked(toy_onnx):
    """Labels.maps(layer_maps=): the layer's names among --methods (typed or a list) are
    the layer's to draw; Labels.rows(index) gives the same maps of only those images."""
    from modlabel.layer_crm import LayerCrm

    toy = OnnxModel(toy_onnx, device="cpu")
    labels = label_pixels(toy, noise_pixels(3, (32, 32)))
    layer = LayerCrm(toy, "relu")
    typed = labels.maps("cam, crm@relu", layer_maps=layer)
    listed = labels.maps(["cam", "crm@relu"], layer_maps=layer)
    assert list(typed) == list(listed) == ["cam", "crm@relu"]
    assert_same_map(typed["crm@relu"], labels.crm())
    assert list(labels.maps([], layer_maps=layer)) == ["crm@relu"]
    assert labels.maps([]) == {}
    picked = labels.rows(np.array([True, False, True]))
    assert len(picked) == 2 and picked[1].label == labels[2].label
    some = picked.maps(["cam"], layer_maps=layer)
    np.testing.assert_allclose(some["cam"], typed["cam"][[0, 2]], rtol=1e-6)
    assert_same_map(some["crm@relu"], typed["crm@relu"][[0, 2]])
