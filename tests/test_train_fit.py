"""train.fit / search / evaluate / data on a tiny drawn archive, for real."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image, ImageDraw

from modlabel.train.data import discover_split
from modlabel.train.errors import DataError, RunError, TrainingInterrupted, WeightsError
from modlabel.train.evaluate import evaluate_run
from modlabel.train.fit import train_run

SHAPES = ("bar", "box", "column", "cross", "disc", "dots", "wedge")
TINY = {
    "backbone": "tiny",
    "input_size": (32, 32),
    "batch_size": 10,
    "verbose": False,
    "head_filters": 16,
}


def draw_archive(root: Path, per_class: int, *, seed: int = 0) -> Path:
    """root/<shape>/<i>.jpg: one bright shape per class on a dark background."""
    rng = np.random.default_rng(seed)
    for name in SHAPES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = 40 + int(rng.integers(0, 8)), 40
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 60, 3)))
            draw, fill = ImageDraw.Draw(img), (int(rng.integers(160, 256)),) * 3
            if name == "bar":
                draw.rectangle([0, h * 0.4, w, h * 0.6], fill=fill)
            elif name == "box":
                draw.rectangle([w * 0.25, h * 0.25, w * 0.75, h * 0.75], fill=fill)
            elif name == "column":
                draw.rectangle([w * 0.4, 0, w * 0.6, h], fill=fill)
            elif name == "cross":
                draw.line([0, 0, w, h], fill=fill, width=4)
                draw.line([0, h, w, 0], fill=fill, width=4)
            elif name == "disc":
                draw.ellipse([w * 0.2, h * 0.2, w * 0.8, h * 0.8], fill=fill)
            elif name == "dots":
                for _ in range(8):
                    x, y = int(rng.integers(0, w - 5)), int(rng.integers(0, h - 5))
                    draw.ellipse([x, y, x + 5, y + 5], fill=fill)
            else:
                draw.polygon([(w / 2, h * 0.1), (w * 0.9, h * 0.9), (w * 0.1, h * 0.9)], fill=fill)
            img.save(root / name / f"{i:02d}.jpg")
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return draw_archive(tmp_path_factory.mktemp("shapes"), 6)


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_train_run_writes_all_run_files(archive: Path, tmp_path: Path):
    run = train_run(archive, tmp_path / "run", epochs=2, seed=0, **TINY)
    for name in (
        "run.json",
        "model.keras",
        "metrics.json",
        "history.csv",
        "split.csv",
        "checkpoints/last.keras",
        "checkpoints/best.weights.h5",
    ):
        assert (run / name).is_file(), name
    config = json.loads((run / "run.json").read_text())
    assert config["class_names"] == sorted(SHAPES)
    assert config["input_size"] == [32, 32]
    assert config["backbone"] == "tiny" and config["weights"] == "none"
    assert (
        config["cut_layer"],
        config["activation_layer"],
        config["gap_layer"],
        config["head_layer"],
    ) == ("tiny_block5_relu", "crm_conv", "gap", "logits")
    assert config["split_counts"]["train"] == dict.fromkeys(SHAPES, 4)
    assert config["split_counts"]["test"] == dict.fromkeys(SHAPES, 1)
    assert config["class_weights"] == dict.fromkeys(SHAPES, 1.0)
    assert len(config["mean"]) == 3 and all(s > 1 for s in config["std"])
    assert config["status"] == "finished" and config["activation_shape"] == [2, 2, 16]
    assert [row["epoch"] for row in _history(run)] == ["1", "2"]

    # The contract export builds on: logits out, crm_conv reachable, and the
    # logits are the Dense head applied to the mean of the activations.
    model = keras.saving.load_model(run / "model.keras")
    assert getattr(model, "optimizer", None) is None  # best weights only
    two = keras.Model(model.inputs, [model.output, model.get_layer("crm_conv").output])
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    logits, activations = two.predict(x, verbose=0)
    kernel, bias = model.get_layer("logits").get_weights()
    np.testing.assert_allclose(
        logits, activations.mean(axis=(1, 2)) @ kernel + bias, rtol=1e-4, atol=1e-5
    )

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 7
    assert {
        "accuracy",
        "auc",
        "precision",
        "recall",
        "f1",
        "mcc",
        "confusion_matrix",
        "per_class",
    } <= set(metrics)
    val = evaluate_run(run, "val")
    assert val["n"] == 7 and (run / "metrics_val.json").is_file()

    with pytest.raises(RunError, match="--resume"):
        train_run(archive, run, epochs=1, **TINY)


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt


def test_interrupted_training_resumes_from_its_last_epoch(archive: Path, tmp_path: Path):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="after 1 finished epoch"):
        train_run(archive, out, epochs=3, seed=1, callbacks=[_StopAfterFirstEpoch()], **TINY)
    assert not (out / "model.keras").exists()
    assert len(_history(out)) == 1
    saved = keras.saving.load_model(out / "checkpoints" / "last.keras")
    steps_per_epoch = int(saved.optimizer.iterations.numpy())
    assert steps_per_epoch == 3  # 28 training images in batches of 10

    train_run(archive, out, resume=True, verbose=False)
    assert [row["epoch"] for row in _history(out)] == ["1", "2", "3"]
    resumed = keras.saving.load_model(out / "checkpoints" / "last.keras")
    assert int(resumed.optimizer.iterations.numpy()) == 3 * steps_per_epoch
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["finished"] and state["epoch"] == 3
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert (out / "metrics.json").is_file()


def test_search_runs_trials_and_retrains_the_best(archive: Path, tmp_path: Path):
    run = train_run(archive, tmp_path / "run", epochs=1, search=2, search_epochs=1, **TINY)
    with (run / "search.csv").open(newline="") as f:
        trials = list(csv.DictReader(f))
    assert [t["trial"] for t in trials] == ["1", "2"]
    for t in trials:
        assert 1e-5 <= float(t["learning_rate"]) <= 1e-1
        assert 0.8 <= float(t["beta_1"]) <= 0.99
        assert 1e-10 <= float(t["l2"]) <= 1e-1
    best = min(trials, key=lambda t: float(t["best_val_cross_entropy"]))
    hp = json.loads((run / "run.json").read_text())["hyperparameters"]
    assert hp["search_best_trial"] == int(best["trial"])
    assert hp["learning_rate"] == pytest.approx(float(best["learning_rate"]), rel=1e-5)
    assert (run / "model.keras").is_file() and (run / "metrics.json").is_file()


def test_presplit_folders_are_used_and_missing_val_is_carved(tmp_path: Path):
    for split, count in (("train", 12), ("test", 2)):
        draw_archive(tmp_path / split, count, seed=len(split))
    split = discover_split(tmp_path)
    counts = split.counts()
    assert counts["test"] == dict.fromkeys(SHAPES, 2)
    assert counts["val"] == dict.fromkeys(SHAPES, 1)  # 1/12 of 12, carved from train
    assert counts["train"] == dict.fromkeys(SHAPES, 11)
    assert split.source["test"] == "folder" and "carved" in split.source["val"]


def test_flat_archive_split_is_seeded_and_stratified(archive: Path):
    first, again, other = (discover_split(archive, seed=s) for s in (0, 0, 1))
    assert first.files == again.files
    assert first.files["test"] != other.files["test"]
    assert first.counts()["val"] == dict.fromkeys(SHAPES, 1)


def test_data_errors_say_what_is_expected(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        discover_split(tmp_path / "empty")
    draw_archive(tmp_path / "few", 2)
    with pytest.raises(DataError, match="at least 3 images"):
        discover_split(tmp_path / "few")
    with pytest.raises(RunError, match="no run to resume"):
        train_run(tmp_path / "few", tmp_path / "nothing", resume=True, verbose=False)


def test_bad_weights_fail_before_a_run_is_written(archive: Path, tmp_path: Path):
    with pytest.raises(WeightsError, match="no such file"):
        train_run(archive, tmp_path / "run", weights=str(tmp_path / "missing.h5"), **TINY)
    assert not (tmp_path / "run").exists()


def test_same_seed_gives_the_same_model(archive: Path, tmp_path: Path):
    runs = [train_run(archive, tmp_path / f"run{i}", epochs=1, seed=4, **TINY) for i in (1, 2)]
    first, second = (keras.saving.load_model(run / "model.keras").get_weights() for run in runs)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_training_commands_are_quiet_by_default(tiny_run):
    """TensorFlow's C++ start-up chatter (oneDNN, CPU features, cuInit on a machine without
    a GPU) is hidden unless --verbose."""
    import subprocess
    import sys

    quiet = subprocess.run(
        [sys.executable, "-m", "modlabel", "evaluate", str(tiny_run)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    noise = [
        line
        for line in quiet.stderr.splitlines()
        if line[:5] in ("I0000", "W0000", "E0000") or "absl::InitializeLog" in line
    ]
    assert noise == [], quiet.stderr
    assert "accuracy" in quiet.stdout


def test_training_and_export_ship_inside_modlabels_namespace():
    import importlib.util

    import modlabel.export
    import modlabel.train

    assert modlabel.train.load_tensorflow and modlabel.export.export_run
    assert importlib.util.find_spec("train") is None  # no top-level package to clash with
    assert importlib.util.find_spec("export") is None
