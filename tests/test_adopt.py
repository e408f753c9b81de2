"""adopt: ONNX CNNs modlabel did not export (PyTorch-style NCHW models built with
onnx.helper, a Keras model exported by tf2onnx) taken in, checked, and run end to end
through scan, explain, report and localize."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from foreign_onnx import INPUT, cnn_nchw
from onnx import TensorProto, helper, numpy_helper
from toy_onnx import write_pngs
from typer.testing import CliRunner

from modlabel import adopt, maps
from modlabel.adopt import Preprocessing, adopt_model
from modlabel.cli import app
from modlabel.errors import ExitCode, ModelError
from modlabel.groundtruth import GROUND_TRUTH_NAME
from modlabel.metadata import ModelInfo
from modlabel.model import OnnxModel

runner = CliRunner()
CLASSES = ["a", "b", "c"]
IMAGENET = ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]


def classes_file(folder: Path, names: list[str] = CLASSES) -> Path:
    path = folder / "classes.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def original_outputs(path: Path, feed: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: feed})[0]


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("head", ["gemm", "matmul"])
def test_a_pytorch_style_model_is_adopted_with_its_head(tmp_path, opset, head):
    source = cnn_nchw(tmp_path / "net.onnx", head=head, opset=opset, softmax=head == "matmul")
    result = runner.invoke(
        app,
        ["adopt", str(source), "--out", str(tmp_path / "adopted.onnx"),
         "--classes", str(classes_file(tmp_path)), *IMAGENET],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "GlobalAveragePool" in result.output

    model = OnnxModel(tmp_path / "adopted.onnx", device="cpu")
    info = model.info
    assert (info.layout, info.activations_layout, info.layer_wise_only) == ("nchw", "nchw", False)
    assert info.class_names == CLASSES and info.input_size == (16, 16)
    assert info.activation_shape == (8, 8, 8) and info.cut_layer == "relu2"
    np.testing.assert_allclose(info.mean, np.array([0.485, 0.456, 0.406]) * 255, rtol=1e-12)
    np.testing.assert_allclose(info.std, np.array([0.229, 0.224, 0.225]) * 255, rtol=1e-12)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(source).graph.initializer}
    fc_w = weights["fc_w"].T if head == "gemm" else weights["fc_w"]  # Gemm's transB=1
    np.testing.assert_array_equal(info.head_weights, fc_w)
    np.testing.assert_array_equal(info.head_bias, weights["fc_b"])

    # The runtime feeds (N, 3, H, W) and hands the maps (N, h, w, K), whatever the file's layout.
    pixels = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    x = model.preprocess(pixels)
    logits, activations = model.run(x)
    assert activations.shape == (4, 8, 8, 8)
    want = original_outputs(source, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    if head == "matmul":  # the original's output is the softmax; the logits are before it
        want = np.log(want) - np.log(want).mean(axis=1, keepdims=True)
        logits = logits - logits.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    scores = maps.terms(activations, info.head_weights, bias=info.head_bias).scores
    if head == "gemm":
        np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-6)


def test_an_adopted_nchw_model_scans_explains_reports_and_localizes(tmp_path, tiny_archive):
    names = sorted(p.name for p in tiny_archive.iterdir() if p.is_dir())
    source = cnn_nchw(tmp_path / "net.onnx", classes=len(names), input_hw=(32, 32))
    adopted = tmp_path / "adopted.onnx"
    done = runner.invoke(
        app,
        ["adopt", str(source), "--out", str(adopted), "--classes",
         str(classes_file(tmp_path, names)), *IMAGENET],
    )  # fmt: skip
    assert done.exit_code == 0, done.output

    images = tmp_path / "images"
    write_pngs(images, 5)
    db = tmp_path / "labels.db"
    scan = runner.invoke(app, ["scan", str(images), "--model", str(adopted), "--db", str(db)])
    assert scan.exit_code == 0, scan.output
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT label, confidence, crm FROM images").fetchall()
    assert len(rows) == 5
    assert all(label in names and 0 < conf <= 1 and crm for label, conf, crm in rows)

    explain = runner.invoke(
        app,
        ["explain", str(images), "--model", str(adopted), "--out", str(tmp_path / "fig"),
         "--format", "json", "--limit", "2"],
    )  # fmt: skip
    assert explain.exit_code == 0, explain.output
    explained = json.loads(explain.output)
    assert [Path(r["figure"]).is_file() for r in explained] == [True, True]
    assert {"cam", "gradcam", "crm"} <= set(explained[0]["roi"])

    report = runner.invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report" / "report.html").is_file()

    out = tmp_path / "localize.json"
    localize = runner.invoke(
        app,
        ["localize", str(tiny_archive), "--model", str(adopted), "--limit", "7",
         "--methods", "crm", "--layer", "relu1", "--out", str(out)],
    )  # fmt: skip
    assert localize.exit_code == 0, localize.output
    scored = json.loads(out.read_text())
    assert scored["methods"] == ["crm", "crm@relu1"] and scored["images"] == 7
    assert (tiny_archive / GROUND_TRUTH_NAME).is_file()


def test_a_hidden_dense_layer_is_refused_in_one_line_and_adopted_layer_wise(tmp_path):
    source = cnn_nchw(tmp_path / "vggish.onnx", head="hidden")
    args = ["adopt", str(source), "--out", str(tmp_path / "a.onnx"), "--classes",
            str(classes_file(tmp_path))]  # fmt: skip
    refused = runner.invoke(app, args)
    assert refused.exit_code == ExitCode.MODEL
    line = refused.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "GlobalAveragePool \u2192 Flatten \u2192 Gemm \u2192 Relu \u2192 Gemm" in line
    assert "2 dense layers, not pool-plus-dense" in line and "--layer" in line
    assert not (tmp_path / "a.onnx").exists()

    done = runner.invoke(app, [*args, "--layer", "relu2"])
    assert done.exit_code == 0, done.output
    assert "layer-wise only" in done.output
    model = OnnxModel(tmp_path / "a.onnx", device="cpu")
    assert model.info.layer_wise_only and model.info.cut_layer == "relu2"
    assert model.info.head_weights.shape == (0, 3)
    # A scan stores the closed-form CRM, which it has not: one line, exit 4.
    images = tmp_path / "images"
    write_pngs(images, 2)
    scan = runner.invoke(
        app, ["scan", str(images), "--model", str(tmp_path / "a.onnx"), "--db",
              str(tmp_path / "l.db")]
    )  # fmt: skip
    assert scan.exit_code == ExitCode.MODEL and "layer-wise only" in scan.output
    assert "Traceback" not in scan.output


def test_a_token_head_is_refused(tmp_path):
    """A transformer's head averages tokens (N, T, D), not a conv layer's map."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.normal(0, 0.1, (4, 3, 4, 4)).astype(np.float32), "patch"),
        numpy_helper.from_array(np.array([0, 4, -1], np.int64), "tokens_shape"),
        numpy_helper.from_array(rng.normal(0, 0.1, (3, 4)).astype(np.float32), "fc_w"),
    ]
    nodes = [
        helper.make_node("Conv", [INPUT, "patch"], ["patches"], kernel_shape=[4, 4],
                         strides=[4, 4]),
        helper.make_node("Reshape", ["patches", "tokens_shape"], ["tokens_t"]),
        helper.make_node("Transpose", ["tokens_t"], ["tokens"], perm=[0, 2, 1]),
        helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc_w"], ["output"], transB=1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "vit",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        initializer=init,
    )
    path = tmp_path / "vit.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelError, match="no global average pooling before the dense layer"):
        adopt_model(path, tmp_path / "a.onnx", class_names=CLASSES)


def test_a_head_misread_is_caught_by_the_check(tmp_path, monkeypatch):
    """The last check re-applies the head read from the graph to the activations; a
    misreading (here: the weights' rows in the wrong order, as a transB read the wrong
    way round would give) is refused, and nothing is written."""
    source = cnn_nchw(tmp_path / "net.onnx")
    real = adopt.find_head

    def misread(graph, output):
        head = real(graph, output)
        return dataclasses.replace(head, weights=head.weights[::-1].copy())

    monkeypatch.setattr(adopt, "find_head", misread)
    with pytest.raises(ModelError, match="the logits differ from the head"):
        adopt_model(source, tmp_path / "a.onnx", class_names=CLASSES)
    assert not (tmp_path / "a.onnx").exists()


def test_what_adopt_cannot_take(tmp_path, toy_onnx):
    with pytest.raises(ModelError, match="a modlabel model already"):
        adopt_model(toy_onnx, tmp_path / "a.onnx", class_names=CLASSES)
    source = cnn_nchw(tmp_path / "net.onnx")
    with pytest.raises(ModelError, match="3 scores per image but 2 class names"):
        adopt_model(source, tmp_path / "a.onnx", class_names=["x", "y"])
    with pytest.raises(ModelError, match="no tensor 'nope'"):
        adopt_model(source, tmp_path / "a.onnx", class_names=CLASSES, layer="nope")
    with pytest.raises(ModelError, match="is 16x16, not"):
        adopt_model(source, tmp_path / "a.onnx", class_names=CLASSES, input_size=(32, 32))
    bad = runner.invoke(
        app, ["adopt", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "a.onnx"),
              "--classes", str(classes_file(tmp_path))]
    )  # fmt: skip
    assert bad.exit_code == ExitCode.MODEL and "no such file" in bad.output


def test_a_keras_model_exported_by_tf2onnx_is_adopted(tmp_path):
    """NHWC input, tf2onnx's Transpose to NCHW convs, a Dense named "logits" whose softmax
    output is the graph's "logits": the pre-softmax scores become the logits, the softmax
    output is kept as "logits_original"."""
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    keras = tf.keras
    keras.utils.set_random_seed(0)
    inp = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", bias_initializer="random_normal")(inp)
    x = keras.layers.BatchNormalization(beta_initializer="random_normal")(x)
    x = keras.layers.ReLU(6.0)(x)  # MobileNet's ReLU6: a Clip
    y = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax", bias_initializer="random_normal",
                             name="logits")(x)  # fmt: skip
    net = keras.Model(inp, out)
    spec = [tf.TensorSpec((None, 24, 24, 3), tf.float32, name="input_1")]
    proto, _ = tf2onnx.convert.from_keras(net, input_signature=spec, opset=13)
    source = tmp_path / "keras.onnx"
    onnx.save(proto, source)

    adopted = adopt_model(
        source,
        tmp_path / "adopted.onnx",
        class_names=CLASSES,
        preprocessing=Preprocessing(mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0), scale=127.5),
    )
    info = adopted.info
    assert info.layout == "nhwc" and not info.layer_wise_only
    assert info.activation_shape == (12, 12, 8) and info.mean == (127.5,) * 3
    dense = net.get_layer("logits")
    np.testing.assert_allclose(info.head_weights, dense.kernel.numpy(), rtol=1e-6)
    np.testing.assert_allclose(info.head_bias, dense.bias.numpy(), rtol=1e-6)

    model = OnnxModel(adopted.path, device="cpu")
    pixels = np.random.default_rng(2).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    x = model.preprocess(pixels)
    assert np.allclose(x, pixels / 127.5 - 1, atol=1e-6)
    logits, activations = model.run(x)
    probabilities = np.asarray(net(x, training=False))
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, probabilities, atol=1e-5)
    scores = maps.terms(activations, info.head_weights, bias=info.head_bias).scores
    np.testing.assert_allclose(scores, logits, rtol=1e-4, atol=1e-5)
    outputs = [o.name for o in onnx.load(adopted.path).graph.output]
    assert outputs == ["logits", "activations", "logits_original"]


def test_the_layouts_and_the_layer_wise_flag_round_trip_in_the_metadata():
    info = ModelInfo(
        class_names=CLASSES,
        input_size=(8, 8),
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        head_weights=np.zeros((0, 3), np.float32),
        head_bias=np.zeros(3, np.float32),
        layout="nchw",
        activations_layout="nchw",
        layer_wise_only=True,
    )
    again = ModelInfo.from_json(info.to_json())
    assert (again.layout, again.activations_layout, again.layer_wise_only) == (
        "nchw", "nchw", True
    )  # fmt: skip
    doc = json.loads(info.to_json())
    del doc["layout"], doc["head"]["layer_wise_only"]  # a file exported before: NHWC
    old = ModelInfo.from_json(json.dumps(doc))
    assert (old.layout, old.activations_layout, old.layer_wise_only) == ("nhwc", "nhwc", False)
    for layout, message in (("sideways", "malformed"), ({"input": "nwhc"}, "unknown input")):
        doc["layout"] = layout
        with pytest.raises(ModelError, match=message):
            ModelInfo.from_json(json.dumps(doc))
