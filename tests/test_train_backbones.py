"""train.backbones: each backbone cut at its layer, the CRM head, weights routes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from modlabel.train.backbones import (
    BACKBONES,
    CUT_LAYERS,
    activation_shape,
    build_model,
    input_normalization,
)
from modlabel.train.errors import BackboneError, WeightsError

# (backbone, small input side, a layer of the full network that must be cut away)
SMALL = [
    ("vgg16", 32, "block5_pool"),
    ("inceptionv3", 75, "mixed7"),
    ("xception", 71, "block14_sepconv1"),
    ("tiny", 32, None),
]
# The map sizes the docs state for 300x300 inputs: (h, w, channels at the cut).
AT_300 = {
    "vgg16": (18, 18, 512),
    "inceptionv3": (17, 17, 768),
    "xception": (10, 10, 1024),
    "tiny": (18, 18, 128),
}


@pytest.mark.parametrize(("name", "side", "cut_away"), SMALL)
def test_backbone_is_cut_at_its_layer_with_the_crm_head(name, side, cut_away):
    model = build_model(name, 5, (side, side), weights="none", l2=1e-4)
    names = [layer.name for layer in model.layers]
    cut = CUT_LAYERS[name]
    assert cut in names
    # Nothing of the backbone after the cut: only the head follows it.
    assert names[names.index(cut) + 1 :] == ["crm_conv", "gap", "logits"]
    if cut_away:
        assert cut_away not in names
    conv, gap, dense = (model.get_layer(n) for n in ("crm_conv", "gap", "logits"))
    assert conv.input is model.get_layer(cut).output
    assert isinstance(conv, keras.layers.Conv2D)
    assert conv.kernel_size == (3, 3) and conv.padding == "same"
    assert conv.activation is keras.activations.relu
    assert isinstance(gap, keras.layers.GlobalAveragePooling2D)
    assert isinstance(dense, keras.layers.Dense)
    assert dense.activation is keras.activations.linear  # logits: no softmax in the model
    filters = BACKBONES[name].default_head_filters
    cut_shape = model.get_layer(cut).output.shape
    assert tuple(conv.output.shape) == (None, cut_shape[1], cut_shape[2], filters)
    assert tuple(gap.output.shape) == (None, filters)
    assert tuple(dense.kernel.shape) == (filters, 5)
    assert tuple(model.output.shape) == (None, 5)
    # L2 on the added layers only.
    assert conv.kernel_regularizer is not None and dense.kernel_regularizer is not None
    assert all(
        getattr(layer, "kernel_regularizer", None) is None
        for layer in model.layers
        if layer.name not in ("crm_conv", "logits")
    )
    # It runs, and export's two-output model can be built from it.
    two = keras.Model(model.inputs, [model.output, model.get_layer("crm_conv").output])
    logits, activations = two.predict(np.zeros((1, side, side, 3), np.float32), verbose=0)
    assert logits.shape == (1, 5) and activations.shape[1:] == conv.output.shape[1:]


@pytest.mark.parametrize("name", sorted(AT_300))
def test_map_sizes_at_300_are_the_documented_ones(name):
    model = build_model(name, 7, (300, 300))
    cut_shape = tuple(model.get_layer(CUT_LAYERS[name]).output.shape[1:])
    assert cut_shape == AT_300[name]
    assert activation_shape(model) == (*AT_300[name][:2], BACKBONES[name].default_head_filters)


def test_xception_cut_is_the_paper_add_11_whatever_keras_numbers_it():
    # A second Xception in the process gets add_12..add_23; the cut must not move.
    for _ in range(2):
        model = build_model("xception", 3, (71, 71))
        add = model.get_layer("block13_add")
        assert isinstance(add, keras.layers.Add)
        assert model.get_layer("block13_pool").output in add.input


def test_head_filters_and_errors():
    assert activation_shape(build_model("tiny", 3, (32, 32), head_filters=8))[2] == 8
    with pytest.raises(BackboneError, match="unknown backbone 'resnet'"):
        build_model("resnet", 3, (32, 32))
    with pytest.raises(BackboneError, match="at least 75x75"):
        build_model("inceptionv3", 3, (64, 64))
    with pytest.raises(WeightsError, match="no such file"):
        build_model("tiny", 3, (32, 32), weights="/nonexistent/w.weights.h5")
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        build_model("tiny", 3, (32, 32), weights="imagenet")


def test_normalization_per_backbone_and_weights():
    assert input_normalization("tiny", "none") is None
    assert input_normalization("vgg16", "none") is None
    assert input_normalization("vgg16", "imagenet") == ((123.68, 116.779, 103.939), (1, 1, 1))
    assert input_normalization("xception", "/w.h5") == ((127.5,) * 3, (127.5,) * 3)


def _backbone_layers(model: keras.Model) -> dict[str, list[np.ndarray]]:
    head = {"crm_conv", "gap", "logits"}
    return {
        layer.name: layer.get_weights()
        for layer in model.layers
        if layer.name not in head and layer.get_weights()
    }


def test_weights_file_route_loads_saved_backbone_weights(tmp_path: Path):
    source = BACKBONES["tiny"].build((32, 32, 3), None)
    # Give BatchNorm statistics non-default values, so they are checked too.
    source.set_weights(
        [
            w + np.random.default_rng(0).normal(size=w.shape).astype(w.dtype) ** 2
            for w in source.get_weights()
        ]
    )
    path = tmp_path / "tiny_backbone.weights.h5"
    source.save_weights(path)
    model = build_model("tiny", 3, (32, 32), weights=str(path))
    loaded = _backbone_layers(model)
    assert set(loaded) == {layer.name for layer in source.layers if layer.get_weights()}
    for layer in source.layers:
        for expected, got in zip(layer.get_weights(), loaded.get(layer.name, []), strict=True):
            np.testing.assert_array_equal(got, expected)


def test_vgg16_weights_h5_file_is_loaded_and_taken_from_bgr_to_rgb(tmp_path: Path):
    # A Keras-2-style whole-model .h5 of VGG16 stands in for Keras' ImageNet file.
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.h5"
    source.save(path)
    model = build_model("vgg16", 3, (32, 32), weights=str(path))
    for layer in source.layers:
        if not layer.get_weights():
            continue
        kernel, bias = model.get_layer(layer.name).get_weights()
        expected_kernel, expected_bias = layer.get_weights()
        if layer.name == "block1_conv1":
            # ImageNet VGG16 expects BGR; its first kernel is reordered to take RGB.
            expected_kernel = expected_kernel[:, :, ::-1, :]
        np.testing.assert_array_equal(kernel, expected_kernel)
        np.testing.assert_array_equal(bias, expected_bias)
    # Same outputs: the flipped kernel on RGB equals the original on BGR.
    image = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
    ours = keras.Model(model.inputs, model.get_layer("block5_conv3").output)
    keras_own = keras.Model(source.inputs, source.get_layer("block5_conv3").output)
    np.testing.assert_allclose(
        ours.predict(image, verbose=0),
        keras_own.predict(image[..., ::-1], verbose=0),
        rtol=1e-4,
        atol=1e-4,
    )


def test_imagenet_weights_offline_say_how_to_pass_a_local_file(tmp_path: Path):
    # A fresh process with an empty Keras cache and no network at all.
    script = textwrap.dedent("""
        import socket, sys

        def no_network(*args, **kwargs):
            raise OSError("network is unreachable")

        socket.socket.connect = no_network
        socket.create_connection = no_network
        from modlabel.train.backbones import build_model
        from modlabel.train.errors import WeightsError
        try:
            build_model("vgg16", 7, (32, 32), weights="imagenet")
        except WeightsError as exc:
            print(exc)
            sys.exit(3)
    """)
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stdout
    assert "--weights /path/to/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" in message
