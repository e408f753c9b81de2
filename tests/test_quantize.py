"""int8 quantization of the tiny test model: real onnxruntime calibration, no mocks.

The agreement gate is exercised on a model made bad on purpose: calibrated on
one black image, its activation ranges are far too narrow for real images, so
its labels disagree with fp32's; the gate is then set just above the
agreement it measured.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from modlabel.cli import app
from modlabel.decode import load_pixels, normalize
from modlabel.export.errors import QuantizationError
from modlabel.export.onnx_export import CPU
from modlabel.export.quantize import (
    CalibrationImages,
    QuantizeOptions,
    evaluation_split,
    int8_path,
    quantize_run,
    split_image_paths,
)
from modlabel.maps import crm
from modlabel.model import OnnxModel
from modlabel.scan import scan_archive
from modlabel.store import class_counts, list_models, open_db
from modlabel.train.rundir import RUN_JSON, SPLIT_CSV


@pytest.fixture(scope="module")
def int8(tiny_run: Path, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("int8") / "tiny.int8.onnx"
    return quantize_run(tiny_run, tiny_onnx, out, calibration=16, min_agreement=0.0)


def test_int8_path_sits_beside_the_fp32_model():
    assert int8_path("models/m.onnx") == Path("models/m.int8.onnx")
    assert int8_path("m") == Path("m.int8.onnx")


def test_int8_model_has_float_outputs_and_the_fp32_metadata(int8, tiny_onnx):
    proto = onnx.load(str(int8.out_path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert {o.name: o.type.tensor_type.elem_type for o in proto.graph.output} == {
        "logits": onnx.TensorProto.FLOAT,
        "activations": onnx.TensorProto.FLOAT,
    }

    fp32, model = OnnxModel(tiny_onnx, providers=CPU), OnnxModel(int8.out_path, providers=CPU)
    assert {o.name: o.type for o in model.session.get_outputs()} == {
        "logits": "tensor(float)",
        "activations": "tensor(float)",
    }
    assert model.info.class_names == fp32.info.class_names
    np.testing.assert_array_equal(model.info.head_weights, fp32.info.head_weights)
    record = model.info.extra["quantization"]
    assert record["method"] == "int8-static-qdq"
    assert record["calibration_images"] == int8.calibration_images == 16
    assert record["fp32_sha256"] == fp32.sha256 != model.sha256 == int8.sha256
    assert record["evaluation"]["agreement"] == int8.fidelity.agreement
    assert model.identity != fp32.identity


def test_fidelity_equals_an_independent_computation(int8, tiny_run, tiny_onnx):
    split, paths = evaluation_split(tiny_run)
    assert split == int8.evaluation_split == "test"
    fp32, model = OnnxModel(tiny_onnx, providers=CPU), OnnxModel(int8.out_path, providers=CPU)
    info = fp32.info
    pixels = np.stack([load_pixels(p, info.input_size)[0] for p in paths])
    batch = normalize(pixels, info.mean, info.std)
    (ref_logits, ref_acts), (logits, acts) = fp32.run(batch), model.run(batch)
    assert acts.dtype == np.float32

    def corr(a, b):
        return np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1]

    head = {"bias": info.head_bias, "pooling": info.pooling}
    maps = [crm(a, info.head_weights, **head) for a in (ref_acts, acts)]
    per_image = [corr(a, b) for a, b in zip(*maps, strict=True)]
    f = int8.fidelity
    assert f.images == len(paths)
    assert 0.0 <= f.agreement <= 1.0
    assert f.agreement == np.mean(ref_logits.argmax(1) == logits.argmax(1))
    for value in (f.logits_correlation, f.crm_correlation_min, f.crm_correlation_mean):
        assert -1.0 <= value <= 1.0
    assert f.logits_correlation == pytest.approx(corr(ref_logits, logits), abs=1e-6)
    assert f.crm_correlation_min == pytest.approx(min(per_image), abs=1e-6)
    assert f.crm_correlation_mean == pytest.approx(np.mean(per_image), abs=1e-6)
    # The head stays float: the maps explain the int8 logits as they do fp32's.
    pooled = acts.astype(np.float64).mean(axis=(1, 2))
    np.testing.assert_allclose(logits, pooled @ info.head_weights + info.head_bias, atol=1e-4)


def test_calibration_images_come_from_the_training_split(tiny_run, tiny_onnx):
    from onnxruntime.quantization import CalibrationDataReader

    paths = split_image_paths(tiny_run, "train", limit=10)
    rows = list(csv.DictReader((tiny_run / SPLIT_CSV).open()))
    train = {r["path"] for r in rows if r["split"] == "train"}
    assert len(paths) == 10 and {p.relative_to(p.parents[1]).as_posix() for p in paths} <= train
    assert len({p.parent.name for p in paths[:7]}) == 7  # classes in turn
    reader = CalibrationImages(paths, OnnxModel(tiny_onnx, providers=CPU).info, batch_size=4)
    assert isinstance(reader, CalibrationDataReader)
    shapes = []
    while (feed := reader.get_next()) is not None:
        shapes.append(feed["image"].shape)
    assert shapes == [(4, 48, 48, 3), (4, 48, 48, 3), (2, 48, 48, 3)] and reader.images == 10


def black_calibrated_run(tiny_run: Path, tiny_archive: Path, tmp_path: Path) -> Path:
    """A copy of tiny_run whose training split is one black image."""
    data = tmp_path / "data"
    shutil.copytree(tiny_archive, data)
    Image.new("RGB", (64, 64)).save(data / "black.png")
    run = tmp_path / "run"
    run.mkdir()
    doc = json.loads((tiny_run / RUN_JSON).read_text())
    (run / RUN_JSON).write_text(json.dumps({**doc, "data_dir": str(data)}))
    rows = [r for r in csv.DictReader((tiny_run / SPLIT_CSV).open()) if r["split"] != "train"]
    with (run / SPLIT_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, ["split", "class", "path"])
        writer.writeheader()
        black = {"split": "train", "class": rows[0]["class"], "path": "black.png"}
        writer.writerows([*rows, black])
    return run


def test_the_gate_refuses_below_min_agreement_and_writes_nothing(
    tiny_run, tiny_archive, tiny_onnx, tmp_path
):
    run = black_calibrated_run(tiny_run, tiny_archive, tmp_path)
    written = quantize_run(run, tiny_onnx, tmp_path / "bad.int8.onnx", min_agreement=0.0)
    measured = written.fidelity.agreement
    assert written.calibration_images == 1 and measured < 1.0

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(QuantizationError, match="below --min-agreement"):
        quantize_run(run, tiny_onnx, out_dir / "m.int8.onnx", min_agreement=measured + 1e-6)
    assert list(out_dir.iterdir()) == []


def test_a_quantized_head_is_refused(tiny_run, tiny_onnx, tmp_path):
    with pytest.raises(QuantizationError, match="does not explain"):
        quantize_run(
            tiny_run,
            tiny_onnx,
            tmp_path / "m.int8.onnx",
            calibration=8,
            min_agreement=0.0,
            options=QuantizeOptions(quantize_head=True),
        )
    assert list(tmp_path.iterdir()) == []


def test_a_scan_with_the_int8_model_stores_rows_under_its_own_identity(
    int8, tiny_archive, sqlite_url, tmp_path
):
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(tiny_archive.rglob("*.jpg"))[:3]:
        shutil.copy(path, few / path.name)
    model = OnnxModel(int8.out_path, providers=CPU)
    engine = open_db(sqlite_url)
    stats = scan_archive([few], model, engine, class_min_confidence=0.0)
    assert stats.labeled == 3 and stats.errors == 0
    (row,) = list_models(engine)
    assert row.identity == model.identity == f"tiny-{int8.sha256[:12]}"
    assert sum(class_counts(engine, row.id).values()) == 3


def test_export_cli_writes_the_int8_model_beside_the_fp32_one(tiny_run, tmp_path):
    out = tmp_path / "m.onnx"
    args = ["export", str(tiny_run), "--out", str(out), "--quantize", "int8"]
    result = CliRunner().invoke(app, [*args, "--calibration", "8", "--min-agreement", "0"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "m.int8.onnx").is_file()
    assert "label agreement with fp32" in result.output
    assert "logits correlation" in result.output and "CRM correlation" in result.output

    result = CliRunner().invoke(app, [*args[:4], "--quantize", "fp16"])
    assert result.exit_code == 2 and "fp16" in result.output
