"""The more map methods (``maps``, ``perturb``) against independent references.

* Grad-CAM++, LayerCAM, XGrad-CAM, HiResCAM: pytorch-grad-cam's own formulas (written
  out below from its ``get_cam_weights``/``get_cam_image``, channels first) fed with
  gradients taken by finite differences through an ONNX head cut at the activations,
  and with TensorFlow's GradientTape on the trained ``tiny_run`` Keras model.
* Ablation-CAM: each channel zeroed in turn, the ONNX head (and the Keras head) re-run.
* Eigen-CAM: pytorch-grad-cam's ``get_2d_projection`` (a numpy SVD per image).
* Score-CAM: a loop over every channel through the toy ONNX model, masks upsampled by PIL.
* RISE: seeded determinism, and a model whose score depends on one region only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from toy_onnx import OPSET, noise_pixels, toy_model, write_pngs
from typer.testing import CliRunner

from modlabel import maps, perturb
from modlabel.calibration import calibrated_softmax
from modlabel.cli import app
from modlabel.cli.options import METHOD_NAMES_HELP, RISE_MASKS_HELP_DEFAULT
from modlabel.decode import load_pixels
from modlabel.evaluation import GroundTruth, localize_images
from modlabel.infer import label_pixels
from modlabel.model import OnnxModel

INPUT_HW = (12, 16)  # the toy's activations: (6, 8, K), non-square
K = 6
CLASSES = ("a", "b", "c", "d")
GRADIENT_METHODS = ("gradcampp", "layercam", "xgradcam", "hirescam")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = toy_model(
        tmp_path_factory.mktemp("methods") / "toy.onnx",
        input_hw=INPUT_HW,
        channels=K,
        classes=CLASSES,
        seed=4,
    )
    return OnnxModel(path)


@pytest.fixture(scope="module")
def labels(toy):
    return label_pixels(toy, noise_pixels(3, INPUT_HW, seed=3))


# -- pytorch-grad-cam's definitions, channels first (N, K, H, W), float64 ----------------


def cam_image(weights, activations):
    """BaseCAM.get_cam_image, then the ReLU of compute_cam_per_layer."""
    return np.maximum((weights[:, :, None, None] * activations).sum(axis=1), 0)


def reference_maps(activations, grads):
    """Each gradient method of pytorch-grad-cam from (N, H, W, K) activations and
    gradients. Grad-CAM++'s eps is 0, as ``maps.gradcampp_from`` explains."""
    a = activations.transpose(0, 3, 1, 2).astype(np.float64)
    g = grads.transpose(0, 3, 1, 2).astype(np.float64)
    sum_activations = a.sum(axis=(2, 3))
    g2, g3 = g**2, g**3
    aij = g2 / (2 * g2 + sum_activations[:, :, None, None] * g3)
    aij = np.where(g != 0, aij, 0)
    gradcampp = cam_image((np.maximum(g, 0) * aij).sum(axis=(2, 3)), a)
    layercam = np.maximum((np.maximum(g, 0) * a).sum(axis=1), 0)
    xweights = (g * a / (sum_activations[:, :, None, None] + 1e-7)).sum(axis=(2, 3))
    xgradcam = cam_image(xweights, a)
    hirescam = np.maximum((g * a).sum(axis=1), 0)
    return {"gradcampp": gradcampp, "layercam": layercam, "xgradcam": xgradcam,
            "hirescam": hirescam}  # fmt: skip


def get_2d_projection(activations):
    """pytorch-grad-cam's utils/svd_on_activations.get_2d_projection, on (N, K, H, W)."""
    projections = []
    for act in activations:
        reshaped = act.reshape(act.shape[0], -1).transpose()
        reshaped = reshaped - reshaped.mean(axis=0)
        _, _, vt = np.linalg.svd(reshaped, full_matrices=True)
        projections.append((reshaped @ vt[0, :]).reshape(act.shape[1:]))
    return np.float64(projections)


def assert_maps_close(got, expected, rtol=1e-4):
    """Relative to each map's largest value (the batch's for an all-zero map, which a ReLU
    can give); the batch must not be all zero."""
    largest = np.abs(expected).max()
    assert largest > 0
    scale = np.maximum(np.abs(expected).max(axis=(1, 2), keepdims=True), 1e-3 * largest)
    assert np.all(np.abs(got - expected) <= rtol * scale), np.abs(got - expected).max()


# -- an ONNX head cut at the activations, and gradients by finite differences ------------


def head_session(weights, bias):
    """(N, h, w, K) activations -> ReduceMean over (h, w) -> MatMul W -> Add b: logits."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["activations"], ["pooled"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], ["logits"]),
        ],
        "head",
        [helper.make_tensor_value_info("activations", TensorProto.FLOAT, ["N", None, None, K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weights.shape[1]])],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda acts: session.run(["logits"], {"activations": acts.astype(np.float32)})[0]


def finite_difference_gradients(head, activations, classes, delta=1.0):
    """dS_c / dA by central differences, every element of each image perturbed in one
    batch. The head is linear above the cut, so a large delta loses nothing."""
    n, h, w, k = activations.shape
    steps = np.eye(h * w * k, dtype=np.float32).reshape(-1, h, w, k) * delta
    grads = np.zeros(activations.shape)
    for i in range(n):
        out = head(np.concatenate([activations[i] + steps, activations[i] - steps]))
        score = out[:, classes[i]].astype(np.float64)
        grads[i] = ((score[: len(steps)] - score[len(steps) :]) / (2 * delta)).reshape(h, w, k)
    return grads


def test_gradient_methods_equal_pytorch_grad_cam_on_finite_difference_gradients(toy, labels):
    info = toy.info
    head = head_session(info.head_weights, info.head_bias)
    acts = labels.activations
    np.testing.assert_allclose(head(acts), labels.logits, rtol=1e-5, atol=1e-5)
    for classes in (labels.top, np.array([3, 0, 1])):
        grads = finite_difference_gradients(head, acts, classes)
        expected = reference_maps(acts, grads)
        for name in GRADIENT_METHODS:
            got = maps.closed_form(name, acts, info.head_weights, class_index=classes)
            assert got.shape == acts.shape[:3] and got.dtype == np.float32
            assert_maps_close(got, expected[name])


def test_ablationcam_equals_zeroing_each_channel_through_the_onnx_head(toy, labels):
    info = toy.info
    head = head_session(info.head_weights, info.head_bias)
    acts = labels.activations
    classes = np.array([2, 1, 0])
    rows = np.arange(len(acts))
    full = head(acts)[rows, classes].astype(np.float64)
    weights = np.zeros((len(acts), K))
    for k in range(K):
        ablated = acts.copy()
        ablated[..., k] = 0
        weights[:, k] = (full - head(ablated)[rows, classes]) / full
    expected = cam_image(weights, acts.transpose(0, 3, 1, 2).astype(np.float64))
    got = maps.closed_form(
        "ablationcam", acts, info.head_weights, bias=info.head_bias, class_index=classes
    )
    assert_maps_close(got, expected, rtol=1e-3)  # float32 score differences


# -- TensorFlow: the trained tiny_run model ----------------------------------------------


@pytest.fixture(scope="module")
def keras_parts(tiny_run):
    pytest.importorskip("tensorflow")
    from modlabel.export.onnx_export import load_keras_model, model_info_from_run, two_output_model
    from modlabel.train.rundir import GAP_LAYER, HEAD_LAYER

    keras_model = load_keras_model(tiny_run)
    info = model_info_from_run(tiny_run, keras_model)
    return two_output_model(keras_model), info, keras_model.get_layer(GAP_LAYER), \
        keras_model.get_layer(HEAD_LAYER)  # fmt: skip


def test_gradient_methods_and_ablation_equal_tensorflow(keras_parts):
    import tensorflow as tf

    two_outputs, info, gap, dense = keras_parts
    images = np.random.default_rng(1).normal(size=(4, *info.input_size, 3)).astype(np.float32)
    classes = np.array([0, 3, 5, 6]) % len(info.class_names)
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        logits, acts = two_outputs(x, training=False)
        score = tf.reduce_sum(tf.gather(logits, classes, axis=1, batch_dims=1))
    grads = tape.gradient(score, acts).numpy()
    acts = acts.numpy()
    expected = reference_maps(acts, grads)
    for name in GRADIENT_METHODS:
        got = maps.closed_form(name, acts, info.head_weights, class_index=classes)
        assert_maps_close(got, expected[name])

    # Ablation-CAM: the Keras head re-run with each channel zeroed.
    full = logits.numpy()[np.arange(4), classes].astype(np.float64)
    k = acts.shape[3]
    ablated = np.repeat(acts[None], k, axis=0)
    ablated[np.arange(k), ..., np.arange(k)] = 0
    scores = dense(gap(ablated.reshape(-1, *acts.shape[1:]))).numpy().reshape(k, 4, -1)
    weights = (full[:, None] - scores[:, np.arange(4), classes].T) / full[:, None]
    expected = cam_image(weights, acts.transpose(0, 3, 1, 2).astype(np.float64))
    got = maps.closed_form(
        "ablationcam", acts, info.head_weights, bias=info.head_bias, class_index=classes
    )
    assert_maps_close(got, expected, rtol=2e-3)


# -- Eigen-CAM ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["more locations than channels", "more channels"])
def test_eigencam_is_the_first_principal_component_with_a_fixed_sign(labels, shape):
    rng = np.random.default_rng(5)
    if shape == "more channels":  # 12 locations, 20 channels: the other Gram matrix
        acts = np.maximum(rng.normal(size=(3, 3, 4, 20)), 0).astype(np.float32)
    else:
        noise = np.maximum(rng.normal(size=(2, 6, 8, K)), 0).astype(np.float32)
        acts = np.concatenate([labels.activations, noise])
    n, k = len(acts), acts.shape[3]
    weights = np.zeros((k, 2), np.float32)  # Eigen-CAM looks at no head
    got = maps.closed_form("eigencam", acts, weights)
    reference = get_2d_projection(acts.transpose(0, 3, 1, 2).astype(np.float64))
    centered = acts.reshape(n, -1, k) - acts.reshape(n, -1, k).mean(axis=1)[:, None]
    channel_sum = centered.sum(axis=2).reshape(reference.shape)
    for image, projection in enumerate(reference):
        # The sign: the projection correlates positively with the centered channel sum.
        signed = projection if (projection * channel_sum[image]).sum() >= 0 else -projection
        expected = np.maximum(signed, 0)
        assert expected.max() > 0
        np.testing.assert_allclose(got[image], expected, rtol=1e-4, atol=1e-5 * expected.max())
    # The same map whatever the order of the channels, and linear in the activations.
    np.testing.assert_allclose(
        maps.closed_form("eigencam", acts[..., ::-1], weights), got, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        maps.closed_form("eigencam", 2 * acts, weights), 2 * got, rtol=1e-4, atol=1e-5
    )


# -- Score-CAM ---------------------------------------------------------------------------


def pil_upsample(channel, size_hw):
    image = Image.fromarray(channel.astype(np.float32), mode="F")
    return np.asarray(image.resize(size_hw[::-1], Image.Resampling.BILINEAR), np.float64)


def test_scorecam_equals_a_loop_over_channels_through_the_model(toy, labels):
    inputs = labels.inputs
    acts = labels.activations
    classes = np.array([1, 3, 0])
    weights = np.zeros((len(acts), K))
    for n in range(len(acts)):
        for k in range(K):
            channel = acts[n, :, :, k]
            if channel.max() == channel.min():
                continue
            up = pil_upsample(channel, INPUT_HW)
            mask = (up - up.min()) / (up.max() - up.min())
            logits, _ = toy.run((inputs[n] * mask[..., None])[None].astype(np.float32))
            weights[n, k] = calibrated_softmax(logits)[0, classes[n]]
    expected = cam_image(weights, acts.transpose(0, 3, 1, 2).astype(np.float64))
    got = labels.maps(["scorecam"], class_index=classes)["scorecam"]
    assert got.shape == acts.shape[:3] and got.dtype == np.float32
    assert_maps_close(got, expected, rtol=1e-4)


def test_scorecam_skips_constant_channels_and_bounds_its_batches(toy, labels):
    acts = labels.activations.copy()
    acts[0, :, :, 2] = 0.0  # a dead ReLU channel
    acts[1, :, :, 4] = 3.0  # a constant one
    sizes = []

    def logits_of(batch):
        sizes.append(len(batch))
        return toy.run(batch)[0]

    forward = perturb.Forward(labels.inputs, logits_of, perturb.Options(batch_size=4))
    weights = perturb.score_cam_weights(acts, np.array([0, 1, 2]), forward)
    assert weights[0, 2] == 0 and weights[1, 4] == 0
    assert np.all(np.delete(weights.ravel(), [2, K + 4]) > 0)
    assert sum(sizes) == 3 * K - 2 and max(sizes) <= 4


# -- RISE --------------------------------------------------------------------------------


def test_rise_masks_are_seeded_and_the_same_in_any_chunks():
    all_at_once = next(perturb.rise_masks(50, (20, 28), grid=4, keep=0.3, seed=7))
    chunked = np.concatenate(list(perturb.rise_masks(50, (20, 28), grid=4, keep=0.3, seed=7,
                                                     batch_size=8)))  # fmt: skip
    np.testing.assert_array_equal(all_at_once, chunked)
    assert all_at_once.shape == (50, 20, 28) and all_at_once.dtype == np.float32
    assert all_at_once.min() >= 0 and all_at_once.max() <= 1
    assert abs(all_at_once.mean() - 0.3) < 0.08  # each cell kept with probability p
    other = next(perturb.rise_masks(50, (20, 28), grid=4, keep=0.3, seed=8))
    assert not np.array_equal(all_at_once, other)


REGION = (slice(2, 7), slice(9, 14))  # rows 2-6, columns 9-13 of a 16 x 16 image


def region_model():
    """A real ONNX model whose class-0 logit is 4 * the mean of the image over REGION only
    (class 1: logit 0), so only REGION can explain class 0."""
    region = np.zeros((1, 16, 16, 1), np.float32)
    region[0, REGION[0], REGION[1], 0] = 4.0 / (5 * 5 * 3)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["image", "region"], ["inside"]),
            helper.make_node("ReduceSum", ["inside", "axes"], ["score"], keepdims=0),
            helper.make_node("Unsqueeze", ["score", "one"], ["column"]),
            helper.make_node("Sub", ["column", "column"], ["zero"]),
            helper.make_node("Concat", ["column", "zero"], ["logits"], axis=1),
        ],
        "region",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 16, 16, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[
            numpy_helper.from_array(region, "region"),
            numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"image": x})[0]


def test_rise_peaks_where_the_score_comes_from_and_is_deterministic():
    logits_of = region_model()
    inputs = np.ones((2, 16, 16, 3), np.float32)
    options = perturb.Options(rise_masks=400, rise_grid=4, seed=3, batch_size=64)
    forward = perturb.Forward(inputs, logits_of, options)
    saliency = perturb.rise(np.array([0, 1]), forward)
    assert saliency.shape == (2, 16, 16) and saliency.dtype == np.float32
    inside = np.zeros((16, 16), bool)
    inside[REGION] = True
    class0 = saliency[0]
    assert inside.ravel()[class0.argmax()]
    assert class0[inside].mean() > class0[~inside].mean() + 0.05
    # Class 1's score falls where class 0's rises: its map is low in the region.
    assert saliency[1][inside].mean() < saliency[1][~inside].mean()
    np.testing.assert_array_equal(perturb.rise(np.array([0, 1]), forward), saliency)
    reseeded = perturb.Forward(inputs, logits_of, perturb.Options(rise_masks=400, rise_grid=4))
    assert not np.array_equal(perturb.rise(np.array([0, 1]), reseeded), saliency)


# -- the registry and the commands -------------------------------------------------------


def test_the_registry_says_what_each_method_needs():
    assert maps.default_methods() == ("cam", "gradcam", "crm")
    model_methods = {n for n, m in maps.METHODS.items() if m.needs == "model"}
    assert model_methods == {"scorecam", "rise"}
    assert set(maps.closed_form_methods()) == set(maps.METHODS) - model_methods
    assert maps.parse_methods("all") == tuple(maps.METHODS)
    assert maps.parse_methods("all", model=False) == maps.closed_form_methods()
    with pytest.raises(ValueError, match=r"\['rise'\] run the model.*these can run: cam"):
        maps.parse_methods("cam,rise", model=False)
    with pytest.raises(ValueError, match="run the model"):
        maps.compute_maps(np.ones((1, 2, 2, K)), np.ones((K, 2)), bias=None, methods=["scorecam"])
    with pytest.raises(ValueError, match="known: cam, .*scorecam, rise"):
        maps.parse_methods("gradcam, scorecamm")
    # The help texts, made without the registry, name every method and RISE's default.
    assert METHOD_NAMES_HELP.split(", ") == list(maps.METHODS)
    assert RISE_MASKS_HELP_DEFAULT == perturb.RISE_MASKS


def test_explain_draws_the_new_methods_and_takes_rise_masks(toy, tmp_path):
    (path,) = write_pngs(tmp_path / "images", 1)
    runner = CliRunner()
    args = ["explain", str(path), "--model", str(toy.path), "--out", str(tmp_path / "out")]
    methods = ["eigencam", "scorecam", "rise"]
    ok = runner.invoke(
        app, [*args, "--methods", ",".join(methods), "--rise-masks", "8", "--format", "json"]
    )
    assert ok.exit_code == 0, ok.output
    (result,) = json.loads(ok.output)
    assert list(result["roi"]) == methods and Path(result["figure"]).exists()
    assert all(0 < roi["ratio"] <= 1 for roi in result["roi"].values())

    bad = runner.invoke(app, [*args, "--methods", "gradcam++"])
    message = " ".join(re.sub("[\u2500-\u257f]", " ", bad.output).split())  # no box, no wraps
    assert bad.exit_code == 2 and "unknown map methods ['gradcam++']" in message
    assert f"known: {', '.join(maps.METHODS)} (or all)" in message


def test_localize_scores_forward_pass_methods_when_asked(toy, tmp_path):
    paths = write_pngs(tmp_path / "images", 3)
    records = []
    for p in paths:  # each image's truth is the toy's label, so that every map is scored
        predicted = label_pixels(toy, load_pixels(p, INPUT_HW)[0][None])[0].label
        records.append((GroundTruth(str(p), predicted, None, None, ((0, 0, 10, 10),), ()), str(p)))
    report = localize_images(
        records, toy, source="test", methods=["ablationcam", "scorecam", "rise"],
        perturbation=perturb.Options(rise_masks=16),
    )  # fmt: skip
    assert report.methods == ("ablationcam", "scorecam", "rise") and report.correct == 3
    for method in report.methods:
        row = report.row("all", method)
        assert row.images == 3 and 0 < row.roi_ratio <= 100


def test_report_takes_rise_masks_for_its_evaluation_and_faithfulness(toy, tmp_path, monkeypatch):
    """report --truth --methods rise --rise-masks N: every RISE map of the evaluation
    (its localization pass and its faithfulness sample) is drawn with N masks."""
    paths = write_pngs(tmp_path / "images", 3)
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    runner = CliRunner()
    scanned = runner.invoke(app, ["scan", str(tmp_path / "images"), "--model", str(toy.path),
                                  "--db", db, "--quiet"])  # fmt: skip
    assert scanned.exit_code == 0, scanned.output
    truth = tmp_path / "truth.csv"  # each image's truth is its label: every map is scored
    lines = ["path,label"]
    for p in paths:
        lines.append(f"{p},{label_pixels(toy, load_pixels(p, INPUT_HW)[0][None])[0].label}")
    truth.write_text("\n".join(lines) + "\n")
    counts = []
    real = perturb.rise_masks

    def counted(count, *args, **kwargs):
        counts.append(count)
        return real(count, *args, **kwargs)

    monkeypatch.setattr(perturb, "rise_masks", counted)
    out = runner.invoke(app, ["report", "--db", db, "--out", str(tmp_path / "report"),
                              "--truth", str(truth), "--methods", "crm,rise",
                              "--rise-masks", "8", "--faithfulness", "2", "--quiet"])  # fmt: skip
    assert out.exit_code == 0, out.output
    # One localization batch of 3 images, then 2 faithfulness images one at a time.
    assert counts == [8, 8, 8]
