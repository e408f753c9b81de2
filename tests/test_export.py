"""Export: real Keras models through real tf2onnx into onnxruntime, no mocks.

Models come from ``train.backbones.build_model`` with random weights; parity
needs no training. The dense head and every BatchNormalization get random
values too, so that the bias, the head and the folded normalization are all
exercised (Keras initializes them to zeros and ones).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from modlabel.cli import app
from modlabel.decode import normalize
from modlabel.export import ExportError, ParityError, check_parity, export_run
from modlabel.model import OnnxModel
from modlabel.train.rundir import MODEL_FILE, RUN_JSON, SPLIT_CSV

CLASSES = ["ct", "mri", "xray"]
MEAN = [120.5, 110.0, 100.25]
STD = [60.0, 55.5, 50.0]


def write_run(
    run_dir: Path,
    backbone: str,
    input_size: tuple[int, int],
    *,
    head_filters: int = 16,
    data_dir: Path | None = None,
):
    """A run folder as ``modlabel train`` leaves it: model.keras and run.json.

    Returns the Keras model.
    """
    import keras

    from modlabel.train.backbones import CUT_LAYERS, build_model

    keras.utils.set_random_seed(0)
    model = build_model(
        backbone, len(CLASSES), input_size, weights="none", head_filters=head_filters
    )
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for variable, low, high in (
                (layer.gamma, 0.5, 1.5),
                (layer.beta, -0.1, 0.1),
                (layer.moving_mean, -0.1, 0.1),
                (layer.moving_variance, 0.5, 2.0),
            ):
                if variable is not None:
                    variable.assign(rng.uniform(low, high, variable.shape).astype("float32"))
    head = model.get_layer("logits")
    head.kernel.assign(rng.normal(0, 1, head.kernel.shape).astype("float32"))
    head.bias.assign(rng.normal(0, 1, head.bias.shape).astype("float32"))

    run_dir.mkdir(parents=True, exist_ok=True)
    model.save(run_dir / MODEL_FILE)
    run = {
        "class_names": CLASSES,
        "input_size": list(input_size),
        "mean": MEAN,
        "std": STD,
        "backbone": backbone,
        "weights": "none",
        "cut_layer": CUT_LAYERS[backbone],
        "activation_layer": "crm_conv",
        "gap_layer": "gap",
        "head_layer": "logits",
        "head_filters": head_filters,
        "hyperparameters": {"learning_rate": 1e-3, "batch_size": 10},
    }
    if data_dir is not None:
        run["data_dir"] = str(data_dir)
    (run_dir / RUN_JSON).write_text(json.dumps(run))
    return model


def write_archive(root: Path, run_dir: Path) -> None:
    """Two images per class and the run's split.csv naming them."""
    from PIL import Image

    rng = np.random.default_rng(2)
    rows = ["split,class,path"]
    for name in CLASSES:
        for i, split in enumerate(("train", "test")):
            rel = f"{name}/{i}.png"
            (root / name).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (30 + 7 * i, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / rel)
            rows.append(f"{split},{name},{rel}")
    (run_dir / SPLIT_CSV).write_text("\n".join(rows) + "\n")


def keras_outputs(model, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import keras

    both = keras.Model(model.inputs[0], [model.outputs[0], model.get_layer("crm_conv").output])
    logits, activations = both(batch, training=False)
    return np.asarray(logits), np.asarray(activations)


def noise_batch(input_size: tuple[int, int], n: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (n, *input_size, 3), dtype=np.uint8)
    return normalize(pixels, MEAN, STD)


# -- a tiny model, end to end -------------------------------------------------------------

TINY_SIZE = (40, 56)  # not square, so that a height/width swap shows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(run dir, Keras model, report, ONNX path) of one exported tiny run with
    a reachable data directory."""
    root = tmp_path_factory.mktemp("tiny")
    run_dir = root / "run"
    model = write_run(run_dir, "tiny", TINY_SIZE, data_dir=root / "data")
    write_archive(root / "data", run_dir)
    out = root / "models" / "tiny.onnx"
    report = export_run(run_dir, out)
    return run_dir, model, report, out


def test_tiny_export_loads_with_its_metadata(tiny):
    run_dir, model, report, out = tiny
    loaded = OnnxModel(out, providers=["CPUExecutionProvider"])
    info = loaded.info
    dense = model.get_layer("logits")
    assert info.class_names == CLASSES
    assert info.input_size == TINY_SIZE
    assert info.mean == tuple(MEAN) and info.std == tuple(STD)
    assert info.head_weights.dtype == np.float32 and info.head_bias.dtype == np.float32
    assert np.array_equal(info.head_weights, np.asarray(dense.kernel))  # bit for bit
    assert np.array_equal(info.head_bias, np.asarray(dense.bias))
    assert info.backbone == "tiny" and info.cut_layer == "tiny_block5_relu"
    assert info.activation_shape == (2, 3, 16) == report.activation_shape
    assert info.pooling == "mean"
    assert info.extra["run"]["hyperparameters"] == {"learning_rate": 1e-3, "batch_size": 10}
    provenance = info.extra["export"]
    assert provenance["opset"] == 17
    software = provenance["software"]
    assert {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"} <= software.keys()
    assert provenance["parity"]["max_abs_logits_diff"] == report.max_abs_logits_diff
    assert report.sha256 == loaded.sha256 and report.out_path == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.onnx"]  # no temporary left


def test_tiny_export_matches_keras_and_its_own_head(tiny):
    _, model, _, out = tiny
    loaded = OnnxModel(out, providers=["CPUExecutionProvider"])
    for n in (1, 5):  # the batch dimension is free
        batch = noise_batch(TINY_SIZE, n, seed=10 + n)
        logits, activations = loaded.run(batch)
        assert logits.shape == (n, len(CLASSES)) and activations.shape == (n, 2, 3, 16)
        expected_logits, expected_activations = keras_outputs(model, batch)
        np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-4)
        np.testing.assert_allclose(
            activations,
            expected_activations,
            rtol=0,
            atol=1e-4 * np.abs(expected_activations).max(),
        )
        # The head in the metadata reproduces the graph's logits (paper Eq. 1).
        head = activations.mean(axis=(1, 2)) @ loaded.info.head_weights + loaded.info.head_bias
        np.testing.assert_allclose(logits, head, rtol=0, atol=1e-4)
        assert np.abs(logits).max() > 0.1  # the random head makes this a real comparison


def test_tiny_export_checks_real_images_when_the_data_is_there(tiny):
    _, _, report, out = tiny
    assert report.real_images == len(CLASSES)  # one per class, limit 4
    assert report.samples == 4 + len(CLASSES)
    parity = OnnxModel(out, providers=["CPUExecutionProvider"]).info.extra["export"]["parity"]
    assert parity["real_images"] == len(CLASSES) and parity["random_images"] == 4


def test_cli_export_int8_writes_fp32_to_out_and_int8_to_int8_out(tiny, tmp_path):
    """--out is the fp32 model and --int8-out the int8 one, both printed with their
    kind (before, --out model.int8.onnx got fp32 and model.int8.int8.onnx the int8)."""
    run_dir = tiny[0]
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "q" / "quantized.onnx"
    result = CliRunner().invoke(
        app,
        ["export", str(run_dir), "--out", str(fp32), "--quantize", "int8"]
        + ["--int8-out", str(int8), "--calibration", "3", "--min-agreement", "0"],
    )
    assert result.exit_code == 0, result.output
    assert f"fp32: {fp32}\nint8: {int8}" in result.output
    assert sorted(p.name for p in tmp_path.rglob("*.onnx")) == ["m.onnx", "quantized.onnx"]
    info = OnnxModel(fp32, providers=["CPUExecutionProvider"]).info
    q_info = OnnxModel(int8, providers=["CPUExecutionProvider"]).info
    assert "quantization" not in info.extra and "quantization" in q_info.extra


# -- every backbone ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "input_size", "activation_shape"),
    [
        ("tiny", (32, 32), (2, 2, 16)),
        ("vgg16", (32, 64), (2, 4, 16)),
        ("inceptionv3", (75, 75), (3, 3, 16)),
        ("xception", (71, 71), (3, 3, 16)),
    ],
)
def test_parity_for_each_backbone(backbone, input_size, activation_shape, tmp_path):
    write_run(tmp_path / "run", backbone, input_size)
    out = tmp_path / f"{backbone}.onnx"
    report = export_run(tmp_path / "run", out)
    assert report.max_abs_logits_diff <= 1e-4
    assert report.max_rel_activations_diff <= 1e-4
    # Random backbones give small logits; hold them to 1e-4 of their size too.
    assert report.max_abs_logits_diff <= 1e-4 * report.logits_scale
    assert report.activation_shape == activation_shape
    loaded = OnnxModel(out, providers=["CPUExecutionProvider"])
    assert loaded.info.backbone == backbone and loaded.info.activation_shape == activation_shape
    logits, activations = loaded.run(noise_batch(input_size, 2, seed=3))
    assert logits.shape == (2, len(CLASSES)) and activations.shape == (2, *activation_shape)


# -- options and failures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("small") / "run"
    write_run(run_dir, "tiny", (32, 32))
    return run_dir


@pytest.mark.parametrize("opset", [13, 18])
def test_opset_is_honored(small_run, tmp_path, opset):
    import onnx

    out = tmp_path / "m.onnx"
    report = export_run(small_run, out, opset=opset)
    versions = {i.domain: i.version for i in onnx.load(out).opset_import}
    assert versions[""] == opset == report.opset
    info = OnnxModel(out, providers=["CPUExecutionProvider"]).info
    assert info.extra["export"]["opset"] == opset


def test_cli_export_with_opset(small_run, tmp_path):
    import onnx

    out = tmp_path / "cli.onnx"
    result = CliRunner().invoke(app, ["export", str(small_run), "--out", str(out), "--opset", "15"])
    assert result.exit_code == 0, result.output
    assert "parity" in result.output
    assert {i.domain: i.version for i in onnx.load(out).opset_import}[""] == 15


def test_unsupported_opset_is_refused(small_run, tmp_path):
    with pytest.raises(ExportError, match="--opset 99"):
        export_run(small_run, tmp_path / "m.onnx", opset=99)
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_raises_and_writes_nothing(small_run, tmp_path):
    """ONNX (MLAS) and Keras (oneDNN) sum in different orders, so their float32
    results differ in the last bits: at zero tolerance the real check fails."""
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    with pytest.raises(ParityError, match="does not match Keras") as caught:
        export_run(small_run, out, atol_logits=0.0, rtol_activations=0.0)
    result = caught.value.result
    worst = max(
        result.max_abs_logits_diff, result.max_rel_activations_diff, result.max_abs_head_diff
    )
    assert 0 < worst < 1e-4  # real rounding differences, far inside the real tolerances
    assert out.read_bytes() == b"an earlier export"  # the old file is left as it was
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # and no temporary


def test_cli_reports_a_bad_run_cleanly(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    assert "no run.json" in result.output and "Traceback" not in result.output


def test_a_run_whose_classes_do_not_fit_the_head_is_refused(small_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    run = json.loads((run_dir / RUN_JSON).read_text())
    run["class_names"] = ["a", "b"]
    (run_dir / RUN_JSON).write_text(json.dumps(run))
    with pytest.raises(ExportError, match="3 outputs but run.json names 2 classes"):
        export_run(run_dir, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_softmax_head_is_refused(tmp_path):
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="crm_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="logits")(x)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keras.Model(inputs, outputs).save(run_dir / MODEL_FILE)
    (run_dir / RUN_JSON).write_text(
        json.dumps({"class_names": CLASSES, "input_size": [16, 16], "mean": MEAN, "std": STD})
    )
    with pytest.raises(ExportError, match="applies softmax"):
        export_run(run_dir, tmp_path / "m.onnx")


# -- the parity check itself (numpy only) -------------------------------------------------


def consistent_outputs(seed: int = 0):
    """(logits, activations, W, b) with logits = GAP(activations) @ W + b exactly."""
    rng = np.random.default_rng(seed)
    activations = np.maximum(rng.normal(size=(3, 4, 5, 6)), 0).astype(np.float32)
    weights = rng.normal(size=(6, 2)).astype(np.float32)
    bias = rng.normal(size=2).astype(np.float32)
    logits = (activations.astype(np.float64).mean(axis=(1, 2)) @ weights + bias).astype(np.float32)
    return logits, activations, weights, bias


def test_check_parity_passes_identical_outputs():
    logits, activations, weights, bias = consistent_outputs()
    result = check_parity((logits, activations), (logits.copy(), activations.copy()), weights, bias)
    assert result.max_abs_logits_diff == 0 and result.max_rel_activations_diff == 0
    assert result.max_abs_head_diff < 1e-6 and result.samples == 3


def test_check_parity_names_logits_beyond_tolerance():
    logits, activations, weights, bias = consistent_outputs()
    shifted = logits.copy()
    shifted[1, 0] += 3e-4
    with pytest.raises(ParityError, match="logits differ by up to 0.0003") as caught:
        check_parity((shifted, activations), (logits, activations), weights, bias)
    assert caught.value.result.max_abs_logits_diff == pytest.approx(3e-4, rel=1e-3)


def test_check_parity_measures_activations_relative_to_their_peak():
    logits, activations, weights, bias = consistent_outputs()
    peak = float(np.abs(activations).max())
    nudged = activations.copy()
    nudged[0, 0, 0, 0] += 0.5e-4 * peak  # within 1e-4 of the peak: passes
    check_parity((logits, activations), (logits, nudged), weights, bias, atol_logits=1e-3)
    nudged[0, 0, 0, 0] += 2e-4 * peak
    with pytest.raises(ParityError, match="activations differ"):
        check_parity((logits, activations), (logits, nudged), weights, bias, atol_logits=1e-3)


def test_check_parity_fails_on_nan():
    logits, activations, weights, bias = consistent_outputs()
    broken = activations.copy()
    broken[2, 1, 1, 1] = np.nan
    with pytest.raises(ParityError, match="activations differ by up to nan"):
        check_parity((logits, activations), (logits, broken), weights, bias)


def test_check_parity_fails_when_the_head_does_not_explain_the_logits():
    logits, activations, weights, bias = consistent_outputs()
    with pytest.raises(ParityError, match="head in the metadata does not explain"):
        check_parity((logits, activations), (logits, activations), weights, bias + 0.01)


def test_check_parity_fails_on_shape_mismatch():
    logits, activations, weights, bias = consistent_outputs()
    with pytest.raises(ParityError, match="activations have shape"):
        check_parity((logits, activations), (logits, activations[:, :3]), weights, bias)
