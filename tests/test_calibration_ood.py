"""Calibrated confidences (temperature scaling) and out-of-set detection, end to end:
the temperature export fits, the ECE, the threshold, the scan's columns, --abstain, and
flagged images left out of counts, averages and queries."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from typer.testing import CliRunner

from modlabel import store
from modlabel.calibration import expected_calibration_error, fit_temperature
from modlabel.cli import app
from modlabel.decode import load_pixels
from modlabel.metadata import METADATA_KEY
from modlabel.model import OnnxModel
from modlabel.ood import OutOfSetRule, rate_threshold
from modlabel.queries import load_query, open_query
from modlabel.scan import scan_archive


def _split_outputs(run: Path, model: OnnxModel, split: str):
    """Logits, activations and labels of one split of the run, computed here independently."""
    config = json.loads((run / "run.json").read_text())
    names = config["class_names"]
    with (run / "split.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    pixels = [
        load_pixels(Path(config["data_dir"]) / r["path"], model.info.input_size)[0] for r in rows
    ]
    logits, activations = model.run(model.preprocess(np.stack(pixels)))
    return logits.astype(np.float64), activations, np.array([names.index(r["class"]) for r in rows])


def _nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    z = logits / t
    log_norm = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def _with_extra(src: Path, dst: Path, **changes) -> Path:
    """A copy of an exported model with metadata ``extra`` keys replaced (None: removed)."""
    import onnx

    proto = onnx.load(str(src))
    (entry,) = [p for p in proto.metadata_props if p.key == METADATA_KEY]
    doc = json.loads(entry.value)
    for key, value in changes.items():
        if value is None:
            doc["extra"].pop(key, None)
        else:
            doc["extra"][key] = value
    entry.value = json.dumps(doc)
    onnx.save(proto, str(dst))
    return dst


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(store.images)).mappings().all()
    return {r["path"]: dict(r) for r in rows}


# -- calibration -------------------------------------------------------------------


def test_the_stored_temperature_lowers_the_validation_nll(tiny_run, tiny_onnx):
    model = OnnxModel(tiny_onnx)
    t = model.info.temperature
    assert t > 0 and t != 1.0
    logits, _, labels = _split_outputs(tiny_run, model, "val")
    assert _nll(logits, labels, t) < _nll(logits, labels, 1.0)
    # and it is the minimum (within the search's bounds)
    assert (
        _nll(logits, labels, t)
        <= min(_nll(logits, labels, t * 1.05), _nll(logits, labels, t / 1.05)) + 1e-9
    )
    calibration = model.info.extra["calibration"]
    assert calibration["nll_after"] <= calibration["nll_before"]


def test_fit_temperature_finds_a_known_temperature():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(4000, 5)) * 3
    labels = np.array([rng.choice(5, p=np.exp(r) / np.exp(r).sum()) for r in true])
    assert fit_temperature(true * 2.5, labels) == pytest.approx(2.5, rel=0.1)


def test_ece_matches_a_hand_computation():
    probs = np.array([
        [0.95, 0.05],  # bin (14/15, 1]: correct
        [0.96, 0.04],  # same bin: wrong
        [0.30, 0.70],  # bin (10/15, 11/15]: correct
        [0.55, 0.45],  # bin (8/15, 9/15]: wrong
    ])  # fmt: skip
    labels = np.array([0, 1, 1, 1])
    by_hand = 2 / 4 * abs(0.5 - 0.955) + 1 / 4 * abs(1 - 0.70) + 1 / 4 * abs(0 - 0.55)
    assert expected_calibration_error(probs, labels) == pytest.approx(by_hand)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_threshold_flags_at_most_the_rate():
    scores = np.arange(100.0)
    assert np.mean(scores > rate_threshold(scores, 0.05)) == 0.05
    assert np.mean(scores > rate_threshold(scores, 0.0)) == 0.0


# -- out of set ---------------------------------------------------------------------


def test_the_test_split_flagged_share_is_near_the_rate(tiny_run, tiny_onnx):
    model = OnnxModel(tiny_onnx)
    rule = model.info.out_of_set
    assert rule is not None and rule.rate == 0.05
    _, activations, _ = _split_outputs(tiny_run, model, "test")
    share = float(np.mean(rule.flags(rule.scores(activations))))
    # A tiny run has a handful of test images; a share of 2 of 8 is within reach of chance.
    assert share <= rule.rate + 0.25
    assert model.info.extra["calibration"]["ood_flagged_on_test"] == pytest.approx(share)


def _blank_scores(model: OnnxModel) -> np.ndarray:
    h, w = model.info.input_size
    blank = np.stack([load_pixels(_png(np.full((64, 80, 3), v)), (h, w))[0] for v in (0, 255)])
    _, activations = model.run(model.preprocess(blank))
    return model.info.out_of_set.scores(activations)


@pytest.fixture
def blank_flagging_onnx(tiny_onnx, tmp_path) -> Path:
    """The tiny model with its threshold set explicitly, below a blank image's score.

    The tiny run's validation split has 7 images (its threshold is their largest
    score) and its covariance comes from 42 training images in 128 dimensions, so
    its own threshold need not flag a blank image; the demo model's does
    (benchmarks/bench_ood.py: every black, white and gray image).
    """
    model = OnnxModel(tiny_onnx)
    doc = {**model.info.out_of_set.to_dict(), "threshold": 0.9 * float(_blank_scores(model).min())}
    return _with_extra(tiny_onnx, tmp_path / "blank-flagging.onnx", out_of_set=doc)


def test_a_blank_image_is_flagged(blank_flagging_onnx):
    model = OnnxModel(blank_flagging_onnx)
    assert model.info.out_of_set.flags(_blank_scores(model)).all()


def test_scan_stores_scores_and_abstain_gives_a_null_label(
    tiny_archive, blank_flagging_onnx, tmp_path
):
    tiny_onnx = blank_flagging_onnx
    archive = tmp_path / "archive"
    shutil.copytree(tiny_archive / "chest_xray", archive / "chest_xray")
    (archive / "blank.png").write_bytes(_png(np.zeros((50, 50, 3))))
    db = store.open_db(f"sqlite:///{tmp_path / 'a.db'}")
    model = OnnxModel(tiny_onnx)
    scan_archive([archive], model, db, class_min_confidence=0.0)
    rows = _rows(db)
    assert all(r["ood_score"] is not None and r["out_of_set"] is not None for r in rows.values())
    blank = rows[str(archive / "blank.png")]
    assert blank["out_of_set"] is True and blank["label"] is not None  # kept without --abstain
    with db.connect() as conn:
        temperature = conn.execute(sa.select(store.models.c.temperature)).scalar_one()
    assert temperature == pytest.approx(model.info.temperature)

    abstaining = store.open_db(f"sqlite:///{tmp_path / 'b.db'}")
    result = CliRunner().invoke(
        app,
        ["scan", str(archive), "--model", str(tiny_onnx), "--db", str(abstaining.url), "--abstain"],
    )
    assert result.exit_code == 0, result.output
    blank = _rows(abstaining)[str(archive / "blank.png")]
    assert blank["out_of_set"] is True and blank["label"] is None
    assert blank["probabilities"] is not None and blank["error"] is None


@pytest.fixture
def flag_all_onnx(tiny_onnx, tmp_path) -> Path:
    """The tiny model with its threshold set explicitly below any score: it flags everything."""
    rule = OnnxModel(tiny_onnx).info.out_of_set
    doc = {**rule.to_dict(), "threshold": -1.0}
    return _with_extra(tiny_onnx, tmp_path / "flag-all.onnx", out_of_set=doc)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_flagged_images_leave_counts_averages_and_queries(
    backend, tiny_archive, flag_all_onnx, tiny_onnx, tmp_path, request
):
    url = (
        f"sqlite:///{tmp_path / 'f.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = store.open_db(url)
    archive = tmp_path / "archive"
    shutil.copytree(tiny_archive / "brain_mri", archive / "brain_mri")
    files = sorted(str(p) for p in archive.rglob("*.jpg"))
    model = OnnxModel(flag_all_onnx)
    scan_archive([archive], model, engine, class_min_confidence=0.0)
    model_id = store.ensure_model(
        engine, identity=model.identity, sha256=model.sha256, backbone=model.info.backbone,
        class_names=model.info.class_names, input_size=model.info.input_size,
        activation_shape=model.info.activation_shape, path=str(model.path),
    )  # fmt: skip
    assert store.class_counts(engine, model_id) == {}
    assert store.sum_class_maps(engine, model_id, 0.0)[0] == {}
    with engine.connect() as conn:
        assert (
            conn.execute(
                sa.select(sa.func.count())
                .select_from(store.class_maps)
                .where(store.class_maps.c.model_id == model_id)
            ).scalar()
            == 0
        )

    def run(name: str, **params) -> list:
        query = load_query(name)
        if "model" in query.parameters:
            params["model"] = model.identity
        with open_query(engine, query, params) as rows:
            return list(rows.rows)

    flagged = run("out-of-set")
    assert sorted(r[0] for r in flagged) == [p for p in files if p.startswith(str(archive))]
    assert all(r[3] is not None for r in flagged)
    assert run("by-label", label="brain_mri", min_confidence=0.0) == []
    assert run("low-confidence", threshold=1.01) == []
    # class-counts counts them apart: no image in a class, every flagged one in out_of_set
    mine = [r for r in run("class-counts") if r[0] == model.identity]
    assert sum(r[2] for r in mine) == 0 and sum(r[3] for r in mine) == len(flagged)

    # the same images under the tiny model as exported: counted again where not flagged
    plain = OnnxModel(tiny_onnx)
    scan_archive([archive], plain, engine, class_min_confidence=0.0)
    with open_query(engine, load_query("out-of-set"), {"model": plain.identity}) as rows:
        n_flagged = len(list(rows.rows))
    with open_query(engine, load_query("class-counts"), {}) as rows:
        counted = sum(r[2] for r in rows.rows if r[0] == plain.identity)
    assert counted + n_flagged == len(files)


def test_a_model_without_a_threshold_flags_nothing(tiny_archive, tiny_onnx, tmp_path):
    old = _with_extra(
        tiny_onnx, tmp_path / "old.onnx", out_of_set=None, temperature=None, calibration=None
    )
    model = OnnxModel(old)
    assert model.info.out_of_set is None and model.info.temperature == 1.0
    archive = tmp_path / "archive"
    shutil.copytree(tiny_archive / "ultrasound", archive / "ultrasound")
    (archive / "blank.png").write_bytes(_png(np.zeros((50, 50, 3))))
    engine = store.open_db(f"sqlite:///{tmp_path / 'o.db'}")
    scan_archive([archive], model, engine)
    rows = _rows(engine)
    assert all(r["out_of_set"] is None and r["ood_score"] is None for r in rows.values())
    assert all(r["label"] is not None for r in rows.values())
    # probabilities are the plain softmax (T = 1)
    path = sorted(rows)[0]
    logits, _ = model.run(model.preprocess(load_pixels(path, model.info.input_size)[0][None]))
    p = np.exp(logits[0] - logits[0].max())
    assert rows[path]["confidence"] == pytest.approx(float(p.max() / p.sum()), rel=1e-6)


def test_a_malformed_rule_is_a_model_error(tiny_onnx, tmp_path):
    from modlabel.errors import ModelError

    bad = _with_extra(
        tiny_onnx, tmp_path / "bad.onnx", out_of_set={"score": "mahalanobis", "threshold": 1}
    )
    with pytest.raises(ModelError, match="out_of_set"):
        OnnxModel(bad)
    with pytest.raises(ModelError, match="temperature"):
        OnnxModel(_with_extra(tiny_onnx, tmp_path / "t.onnx", temperature=-1))


def test_rule_round_trips_through_metadata():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 6))
    labels = np.repeat(np.arange(3), 20)
    rule = OutOfSetRule.fit(emb, labels, 3)
    back = OutOfSetRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    np.testing.assert_array_equal(back.whitening, rule.whitening)
    np.testing.assert_array_equal(back.scores_of(emb), rule.scores_of(emb))
    assert math.isfinite(back.threshold)


def test_a_perfectly_separated_split_keeps_the_temperature_at_one():
    """The likelihood of a split classified without error keeps falling as T -> 0: no
    evidence to calibrate on, and sharpening would make every image look certain."""
    labels = np.arange(7).repeat(10)
    logits = np.full((70, 7), -5.0)
    logits[np.arange(70), labels] = 5.0
    assert fit_temperature(logits, labels) == 1.0
