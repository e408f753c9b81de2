"""explain: a Figure-5-style PNG per image from a real ONNX model, errors per file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modlabel import geometry, maps, overlay, perturb
from modlabel.decode import load_pixels
from modlabel.explain import explain_images
from modlabel.metadata import ModelInfo
from modlabel.model import OnnxModel

CLASSES = ["ct", "mri", "xray"]
INPUT = (48, 48)


def build_onnx(path: Path) -> Path:
    """A small conv -> crm_conv -> GAP -> Dense model, exported to modlabel's
    ONNX contract (outputs "logits" and "activations", "modlabel" metadata)."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    tf2onnx = pytest.importorskip("tf2onnx")
    import onnx

    keras.utils.set_random_seed(0)
    inp = keras.Input((*INPUT, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    acts = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="crm_conv")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(acts)
    dense = keras.layers.Dense(len(CLASSES), bias_initializer="random_normal")
    net = keras.Model(inp, [dense(pooled), acts])

    spec = [tf.TensorSpec((None, *INPUT, 3), tf.float32, name="image")]

    @tf.function(input_signature=spec)
    def serve(image):
        logits, activations = net(image)
        return {"logits": logits, "activations": activations}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=17)
    weights, bias = (v.numpy() for v in dense.weights)
    info = ModelInfo(
        class_names=CLASSES,
        input_size=INPUT,
        mean=(127.5,) * 3,
        std=(64.0,) * 3,
        head_weights=weights,
        head_bias=bias,
        backbone="test",
        cut_layer="crm_conv",
        activation_shape=(12, 12, 32),
    )
    entry = proto.metadata_props.add()
    entry.key, entry.value = "modlabel", info.to_json()
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> OnnxModel:
    return OnnxModel(build_onnx(tmp_path_factory.mktemp("model") / "explain.onnx"))


@pytest.fixture
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    wide = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 255, (90, 210, 3), dtype=np.uint8)).save(wide)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(rng.integers(0, 255, (120, 80), dtype=np.uint8), "L").save(gray)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    other = tmp_path / "sub"
    other.mkdir()
    twin = other / "wide.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(twin)
    return [wide, broken, gray, tmp_path / "missing.jpg", twin]


def test_explain_writes_one_figure_per_readable_image(model, images, tmp_path):
    out = tmp_path / "figures"
    results = explain_images([str(p) for p in images], model, out)
    assert [r.path for r in results] == [str(p) for p in images]

    good = [results[i] for i in (0, 2, 4)]
    for r in good:
        assert r.error is None
        assert r.label in CLASSES and 0 < r.confidence <= 1
        assert r.figure.parent == out and r.figure.exists()
        with Image.open(r.figure) as fig:
            assert fig.format == "PNG" and fig.width > 2 * fig.height
        assert set(r.roi) == {"cam", "gradcam", "crm"}
    assert len({r.figure for r in good}) == 3  # same stem, different files

    # the label is the model's on exactly the pixels scan would feed it
    pixels, _ = load_pixels(images[0], INPUT)
    logits, acts = model.run(model.preprocess(pixels[None]))
    assert results[0].class_index == int(np.argmax(logits))
    expected = maps.crm(acts, model.info.head_weights, bias=model.info.head_bias)[0]
    assert results[0].roi["crm"] == geometry.roi_stats(expected, INPUT)

    broken, missing = results[1], results[3]
    assert broken.figure is None and broken.label is None and "cannot decode" in broken.error
    assert missing.error == "no such file or directory"
    assert sorted(p.name for p in out.iterdir()) == [
        "gray.explain.png",
        "wide-2.explain.png",
        "wide.explain.png",
    ]


def test_explain_more_methods_and_batches(model, images, tmp_path):
    good = [images[0], images[2], images[4]]
    few_masks = perturb.Options(rise_masks=64)  # RISE's 2000 would cost seconds here
    results = explain_images(
        good, model, tmp_path, methods=list(maps.METHODS), batch_size=2, perturbation=few_masks
    )
    assert all(r.error is None for r in results)
    assert set(results[0].roi) == set(maps.METHODS)
    with pytest.raises(ValueError, match="unknown map methods"):
        explain_images(good, model, tmp_path, methods=["saliency"])


def test_overlay_lines_up_and_keeps_the_image_below_threshold():
    image = np.full((60, 150, 3), 100, np.uint8)
    m = np.zeros((3, 5), np.float32)
    m[2, 4] = 1.0  # bottom-right cell
    blended = overlay.overlay(image, m)
    assert blended.shape == image.shape and blended.dtype == np.uint8
    changed = np.any(blended != image, axis=2)
    ys, xs = np.nonzero(changed)
    assert ys.min() >= 40 - 10 and xs.min() >= 120 - 30  # near the cell, bilinear edge
    np.testing.assert_array_equal(blended[:30, :90], image[:30, :90])
    heat = overlay.heatmap_rgb(m)
    assert heat.shape == (3, 5, 3) and heat.dtype == np.uint8
    np.testing.assert_array_equal(heat[2, 4], overlay._lookup_table("jet")[255])
    with pytest.raises(ValueError, match="colormap"):
        overlay.heatmap_rgb(m, "no-such-map")


def test_class_overlay_draws_roi_box():
    avg = np.zeros((18, 18), np.float32)
    avg[3:6, 10:15] = 1.0
    img = overlay.class_overlay(avg, (180, 180))
    assert img.shape == (180, 180, 3)
    white = np.all(img == 255, axis=2)
    ys, xs = np.nonzero(white)
    # The box of the heatmap as drawn (upsampled, bilinear, then above 70%), not the coarse
    # grid's cells 10-15 x 3-6 scaled up (100, 30, 150, 60), which the bilinear ramps
    # at the region's edges do not reach.
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (102, 32, 148, 58)
    bg = np.full((40, 70, 3), 128, np.uint8)
    assert overlay.class_overlay(avg, (90, 120), background=bg).shape == (90, 120, 3)


def test_a_new_map_method_is_one_function_and_one_registry_entry(toy_onnx, tmp_path):
    """Adding a method takes a function of ``Terms`` and ``register``: nothing else changes
    before explain draws it, names it and measures its ROI, and ``--methods`` takes it."""
    from toy_onnx import write_pngs

    def half_cam(t: maps.Terms) -> np.ndarray:
        return 0.5 * maps.cam_from(t)

    method = maps.register(maps.Method("half_cam", "CAM / 2", "#17becf", half_cam, "a test"))
    try:
        assert maps.parse_methods("crm,half_cam") == ("crm", "half_cam")
        assert "half_cam" in maps.default_methods() and maps.title("half_cam") == "CAM / 2"
        paths = write_pngs(tmp_path / "images", 3)
        model = OnnxModel(toy_onnx)
        results = explain_images(paths, model, tmp_path / "out", methods=["cam", "half_cam"])
        for r in results:
            assert r.error is None and r.figure.exists()
            assert set(r.roi) == {"cam", "half_cam"}
            assert r.roi["half_cam"] == r.roi["cam"]  # a ROI is relative to the map's own peak
        with pytest.raises(ValueError, match="registered already"):
            maps.register(method)
    finally:
        maps.METHODS.pop("half_cam")


def test_explain_roots_walks_folders_as_scan_does_with_errors_in_place(toy_onnx, tmp_path):
    """Folders are walked (a file under one is explained once, with it); a path the walk
    cannot take is a result with its error, in its place; ``limit`` keeps the first."""
    from toy_onnx import write_pngs

    from modlabel.explain import explain_roots

    paths = write_pngs(tmp_path / "images", 3)
    gone = tmp_path / "gone.png"
    model = OnnxModel(toy_onnx)
    roots = [paths[1], gone, tmp_path / "images"]
    results = explain_roots(roots, model, tmp_path / "out")
    assert [r.path for r in results] == [str(gone), *map(str, paths)]
    assert results[0].error == "no such file or directory" and results[0].figure is None
    assert all(r.error is None and r.figure.exists() for r in results[1:])
    limited = explain_roots(roots, model, tmp_path / "out2", limit=2)
    assert [r.path for r in limited] == [str(gone), str(paths[0])]


def test_explain_figure_has_a_colour_bar(toy_onnx, tmp_path):
    """Under the overlays, the colormap from 0 to 1 ("relevance"): a row of the figure
    runs through jet's own colours in order, over a long stretch (an overlay, blended on
    the image, does not), from the display threshold (below it the bar is faded) to 1."""
    from toy_onnx import write_pngs

    paths = write_pngs(tmp_path / "images", 1)
    (result,) = explain_images(paths, OnnxModel(toy_onnx), tmp_path / "out", methods=["crm"])
    pixels = np.asarray(Image.open(result.figure).convert("RGB")).astype(int)
    jet = overlay._lookup_table(overlay.DEFAULT_CMAP).astype(int)

    def runs_through_the_colormap(row: np.ndarray) -> bool:
        distance = np.abs(row[:, None, :] - jet[None, :, :]).sum(axis=2)
        index = distance.argmin(axis=1)
        matched = distance.min(axis=1) < 25
        shown = index[matched]  # in order, left to right
        return (
            shown.size > 100
            and shown.min() < 70
            and shown.max() > 245
            and bool(np.all(np.diff(shown) >= -3))
        )

    assert any(runs_through_the_colormap(row) for row in pixels[pixels.shape[0] // 2 :])
