"""``modlabel train DATA --resume-from RUN``: a finished run's model fine-tuned on another
data set into a run of the same layout (export reads it), refused where the classes
differ; and the noise of a shifted synthetic archive (``modlabel synth --noise``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from modlabel.cli import app
from modlabel.synth import CLASS_NAMES, image_seed, render_image

keras = pytest.importorskip("keras")

from modlabel.train.data import discover_split  # noqa: E402
from modlabel.train.errors import RunError  # noqa: E402
from modlabel.train.finetune import (  # noqa: E402
    FINETUNE_LEARNING_RATE,
    check_unchanged,
    file_sha256,
)
from modlabel.train.fit import train_run  # noqa: E402

runner = CliRunner()


def _kernel(run: Path) -> np.ndarray:
    model = keras.saving.load_model(run / "model.keras", compile=False)
    return model.get_layer("logits").get_weights()[0]


def test_a_run_is_fine_tuned_from_its_model_into_a_run_that_exports(
    tiny_run: Path, tiny_archive: Path, tmp_path: Path
):
    from modlabel.export.onnx_export import export_run
    from modlabel.model import OnnxModel

    before = file_sha256(tiny_run / "model.keras")
    out = tmp_path / "tuned"
    result = runner.invoke(
        app,
        ["train", str(tiny_archive), "--out", str(out), "--resume-from", str(tiny_run),
         "--epochs", "1", "--batch-size", "8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    source, tuned = (json.loads((r / "run.json").read_text()) for r in (tiny_run, out))
    for key in ("class_names", "input_size", "mean", "std", "backbone", "head_filters"):
        assert tuned[key] == source[key], key
    assert tuned["fine_tuned_from"]["run"] == str(tiny_run.resolve())
    assert tuned["fine_tuned_from"]["model_sha256"] == before
    assert tuned["hyperparameters"]["learning_rate"] == FINETUNE_LEARNING_RATE
    assert tuned["status"] == "finished" and tuned["epochs_trained"] == 1
    for name in ("model.keras", "split.csv", "history.csv", "metrics.json"):
        assert (out / name).is_file(), name
    assert file_sha256(tiny_run / "model.keras") == before  # the source run is untouched
    # It started from the source's weights: one epoch at 1e-4 moves them a little, where
    # a fresh initialization would be unrelated to them.
    old, new = _kernel(tiny_run), _kernel(out)
    assert not np.array_equal(old, new)
    assert np.corrcoef(old.ravel(), new.ravel())[0, 1] > 0.95

    onnx_file = export_run(out, tmp_path / "tuned.onnx").out_path
    assert OnnxModel(onnx_file).info.class_names == source["class_names"]


def test_resuming_a_fine_tuning_checks_its_source_model_is_the_same(tmp_path: Path):
    source = tmp_path / "run"
    source.mkdir()
    (source / "model.keras").write_bytes(b"the weights")
    record = {"run": str(source), "model_sha256": file_sha256(source / "model.keras")}
    assert check_unchanged(record) == source / "model.keras"
    (source / "model.keras").write_bytes(b"other weights")
    with pytest.raises(RunError, match="has changed since it began"):
        check_unchanged(record)
    (source / "model.keras").unlink()
    with pytest.raises(RunError, match="is gone"):
        check_unchanged(record)


def _partial_archive(tiny_archive: Path, root: Path, *, drop: str, extra: str) -> Path:
    root.mkdir()
    for name in CLASS_NAMES:
        if name != drop:
            (root / name).symlink_to(tiny_archive / name, target_is_directory=True)
    shutil.copytree(tiny_archive / drop, root / extra)
    return root


def test_a_data_set_of_other_classes_is_refused_in_one_line(
    tiny_run: Path, tiny_archive: Path, tmp_path: Path
):
    data = _partial_archive(tiny_archive, tmp_path / "data", drop=CLASS_NAMES[0], extra="photo")
    out = tmp_path / "tuned"
    with pytest.raises(RunError, match=f"missing {CLASS_NAMES[0]}; not in the model: photo"):
        train_run(data, out, resume_from=tiny_run, epochs=1, verbose=False)
    assert not out.exists()

    result = runner.invoke(
        app, ["train", str(data), "--out", str(out), "--resume-from", str(tiny_run)]
    )
    assert result.exit_code == 1
    assert "fine-tuning keeps the model's classes" in result.output
    assert "Traceback" not in result.output


def test_options_that_define_another_model_are_refused(tiny_run: Path, tmp_path: Path):
    result = runner.invoke(
        app,
        ["train", str(tmp_path), "--out", str(tmp_path / "x"), "--resume-from", str(tiny_run),
         "--backbone", "vgg16", "--input-size", "64"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--backbone, --input-size" in result.output
    with pytest.raises(RunError, match="not a finished run"):
        train_run(tmp_path, tmp_path / "y", resume_from=tmp_path / "nothing", verbose=False)
    with pytest.raises(RunError, match="pass one of them"):
        train_run(tmp_path, tmp_path / "y", resume=True, resume_from=tiny_run, verbose=False)


def test_a_sparse_split_keeps_small_and_empty_classes_in_training(
    tiny_archive: Path, tmp_path: Path
):
    data = tmp_path / "reviewed"
    few, empty, *rest = CLASS_NAMES
    (data / empty).mkdir(parents=True)
    (data / few).mkdir()
    shutil.copy(next((tiny_archive / few).iterdir()), data / few / "one.jpg")
    for name in rest:
        shutil.copytree(tiny_archive / name, data / name)
    split = discover_split(data, seed=0, sparse=True)
    counts = split.counts()
    assert split.class_names == sorted(CLASS_NAMES)
    assert counts["train"][few] == 1 and counts["val"][few] == counts["test"][few] == 0
    assert counts["train"][empty] == 0
    assert all(counts["val"][name] == 1 for name in rest)
    with pytest.raises(Exception, match="at least 3 images"):
        discover_split(data, seed=0)  # a fresh run needs every class in every split


def test_noise_shifts_the_style_and_none_changes_nothing():
    args = (CLASS_NAMES[2], 96)
    plain = np.asarray(render_image(args[0], image_seed(0, 2, 0), args[1]).image, np.float32)
    same = np.asarray(render_image(*args[:1], image_seed(0, 2, 0), args[1], noise=0.0).image)
    noisy = np.asarray(render_image(args[0], image_seed(0, 2, 0), args[1], noise=0.1).image)
    assert np.array_equal(plain, same)
    difference = noisy.astype(np.float32) - plain
    # 0.1 of the full scale is 25.5 grey levels; clipping at black and white takes a little.
    assert 15 < difference.std() < 27
    with pytest.raises(ValueError, match="noise"):
        render_image(args[0], image_seed(0, 2, 0), args[1], noise=-0.1)
