"""evaluation: a scanned archive against its ground truth, checked against independent
computations (scikit-learn on the stored rows, the stored CRMs, ``modlabel localize``)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from modlabel import codec, geometry, maps, store
from modlabel.config import sqlite_url as sqlite_url_of
from modlabel.errors import ModelError, ModlabelError
from modlabel.evaluation import (
    RANDOM,
    curve_area,
    evaluate_localization,
    evaluate_truth,
    load_truth,
    localization_scores,
    pixel_order,
    relevance_curves,
    render_truth_html,
)
from modlabel.model import OnnxModel
from modlabel.paths import from_db
from modlabel.scan import scan_archive

SUMMARY = ("accuracy", "auc", "precision", "recall", "f1", "mcc")


def _scan(archive: Path, onnx: Path, url: str) -> tuple[sa.Engine, store.ModelRow]:
    engine = store.open_db(url)
    scan_archive([archive], OnnxModel(onnx), engine, class_min_confidence=0.0)
    return engine, store.pick_model(engine)


@pytest.fixture(scope="module")
def scanned(tiny_archive, tiny_onnx, tmp_path_factory):
    url = sqlite_url_of(tmp_path_factory.mktemp("evaluation-db") / "labels.db")
    return _scan(tiny_archive, tiny_onnx, url)


@pytest.fixture(scope="module")
def evaluated(scanned, tiny_archive, tmp_path_factory):
    engine, model_row = scanned
    out = tmp_path_factory.mktemp("evaluation-report")
    truth = load_truth(tiny_archive / "ground_truth.jsonl")
    return evaluate_truth(engine, model_row, truth, out_dir=out, faithfulness=4, batch_size=16)


def _stored(engine: sa.Engine, model_id: int) -> list[dict]:
    c = store.images.c
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(c.path, c.label, c.probabilities, c.crm).where(c.model_id == model_id)
        )
        return [dict(r._mapping) for r in rows]


# --------------------------------------------------------------- Table 2


def test_table2_equals_scikit_learn_on_the_stored_rows(scanned, evaluated):
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        matthews_corrcoef,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    engine, model_row = scanned
    names = model_row.class_names
    rows = _stored(engine, model_row.id)
    y = np.array([names.index(Path(from_db(r["path"])).parent.name) for r in rows])
    p = np.array([[r["probabilities"][n] for n in names] for r in rows])
    pred = p.argmax(axis=1)

    t2 = evaluated.table2
    assert t2["n"] == len(rows) == evaluated.matching.labeled == 56
    assert t2["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert t2["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    kw = {"average": "macro", "zero_division": 0}
    assert t2["precision"] == pytest.approx(precision_score(y, pred, **kw))
    assert t2["recall"] == pytest.approx(recall_score(y, pred, **kw))
    assert t2["f1"] == pytest.approx(f1_score(y, pred, **kw))
    assert t2["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    m = evaluated.matching
    assert (m.stored_rows, m.with_truth, m.errors, m.without_truth) == (56, 56, 0, 0)
    assert (m.truth_records, m.truth_without_row) == (56, 0)


def test_class_maps_average_the_stored_crms_of_correct_images_only(scanned, evaluated):
    engine, model_row = scanned
    units: dict[str, list[np.ndarray]] = {}
    for r in _stored(engine, model_row.id):
        truth = Path(from_db(r["path"])).parent.name
        if r["label"] == truth:
            units.setdefault(truth, []).append(geometry.normalize_unit(codec.decode_map(r["crm"])))
    assert units, "the tiny model gets no image right"
    assert set(evaluated.class_maps) == set(units)
    for name, class_units in units.items():
        mean = np.mean(class_units, axis=0)
        expected = mean / mean.max()
        got = evaluated.class_maps[name]
        assert got.image_count == len(class_units)
        np.testing.assert_allclose(got.average, expected, rtol=1e-5, atol=1e-6)
        assert got.roi_box == geometry.roi_box(expected)


# --------------------------------------------------------------- localization


def test_localization_is_modlabel_localize_on_the_same_images(evaluated, tiny_archive, tiny_onnx):
    expected = evaluate_localization(tiny_archive, OnnxModel(tiny_onnx), batch_size=16)
    got = evaluated.localization
    assert got.methods == maps.default_methods() and got.size == expected.size
    assert [dataclasses.asdict(c) for c in got.classes] == [
        dataclasses.asdict(c) for c in expected.classes
    ]
    fields = [f.name for f in dataclasses.fields(got.overall[0])]
    for name in [c.class_name for c in expected.classes] + ["all"]:
        for method in maps.default_methods():
            a, b = got.row(name, method), expected.row(name, method)
            for key in fields:
                left, right = getattr(a, key), getattr(b, key)
                if isinstance(left, float):
                    # The two faces batch the images in another order: sums may differ in ulps.
                    assert left == pytest.approx(right, rel=1e-6), (name, method, key)
                else:
                    assert left == right, (name, method, key)
    overall = got.row("all", "crm")
    assert overall.images == got.correct > 0
    for key in ("pointing", "energy", "roi_iou"):
        assert 0 <= getattr(overall, key) <= 1


def test_energy_and_iou_on_hand_built_maps():
    m = np.zeros((2, 4, 4), np.float32)
    m[0, 0, 0] = 3.0  # in the box
    m[0, 3, 3] = 1.0  # out of it, and in the ROI too
    m[0, 2, 2] = -5.0  # negative: no mass
    structures = np.zeros((2, 4, 4), bool)
    structures[:, 0:2, 0:2] = True  # 4 pixels
    nothing = np.zeros((2, 4, 4), bool)
    s = localization_scores(m, structures, nothing)
    assert s.energy[0] == pytest.approx(3 / 4)
    assert s.roi_iou[0] == pytest.approx(1 / 5)  # ROI {(0,0), (3,3)}, union 5 pixels
    assert np.isnan(s.energy[1]) and s.roi_iou[1] == 0.0  # no positive value: empty ROI
    assert np.isnan(localization_scores(m, nothing, nothing).energy).all()


# --------------------------------------------------------------- other truths


def _csv_truth(tiny_archive: Path, path: Path) -> None:
    records = [json.loads(line) for line in (tiny_archive / "ground_truth.jsonl").open()]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "path", "note"])
        for i, r in enumerate(records):
            file = tiny_archive / r["path"]
            # Both forms: absolute, and relative to the CSV's folder.
            shown = file if i % 2 else os.path.relpath(file, path.parent)
            writer.writerow([r["class"], shown, "x"])


def test_a_csv_truth_and_folder_names_give_the_jsonls_table2(
    scanned, evaluated, tiny_archive, tmp_path
):
    engine, model_row = scanned
    truth_csv = tmp_path / "truth <b>.csv"
    _csv_truth(tiny_archive, truth_csv)
    for truth in (load_truth(truth_csv), load_truth(None, from_folders=True)):
        report = evaluate_truth(engine, model_row, truth, out_dir=tmp_path / truth.kind)
        assert not report.has_boxes and report.faithfulness is None
        for key in (*SUMMARY, "n", "confusion_matrix", "per_class"):
            assert report.table2[key] == evaluated.table2[key], (truth.kind, key)
        # Table 3 without boxes: the same ROIs, the box measures undefined.
        crm = report.localization.row("all", "crm")
        assert crm.roi_pixels == pytest.approx(evaluated.localization.row("all", "crm").roi_pixels)
        assert crm.pointing is None and crm.energy is None
        html = render_truth_html(report)
        assert "Localization (Table 3)" in html and "pointing game" not in html
        if truth.kind == "csv":  # autoescaped: the file name holds markup
            assert "truth &lt;b&gt;.csv" in html and "<b>" not in html


def test_relative_stored_paths_are_joined_from_the_current_folder(
    tiny_archive, tiny_onnx, tmp_path, monkeypatch
):
    monkeypatch.chdir(tiny_archive.parent)
    engine, model_row = _scan(Path(tiny_archive.name), tiny_onnx, sqlite_url_of(tmp_path / "r.db"))
    truth = load_truth(tiny_archive / "ground_truth.jsonl")
    # The report passes its own formats on: only csv and json name the tables'.
    report = evaluate_truth(engine, model_row, truth, out_dir=tmp_path, formats={"html", "csv"})
    assert report.matching.labeled == 56
    assert {Path(f).suffix for f in report.files} == {".csv", ".png"}


# --------------------------------------------------------------- files, page, faithfulness


def test_every_table_and_figure_is_written_and_parses(evaluated):
    folder = evaluated.out_dir
    names = {Path(f).name for f in evaluated.files}
    for table in (
        "matching",
        "table2",
        "per_class",
        "confusion_matrix",
        "class_maps",
        "localization",
        "localization_classes",
        "map_scores",
        "faithfulness",
        "faithfulness_curves",
    ):
        assert {f"{table}.csv", f"{table}.json"} <= names
        with (folder / f"{table}.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and rows == [
            {k: "" if v is None else str(v) for k, v in row.items()}
            for row in json.loads((folder / f"{table}.json").read_text())
        ], table
    for figure in ("confusion_matrix", "roc", "class_maps", "map_scores", "faithfulness"):
        with Image.open(folder / f"{figure}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100
    whole = json.loads((folder / "evaluation.json").read_text())
    assert whole["table2"]["accuracy"] == evaluated.table2["accuracy"]
    assert len(whole["map_scores"]["rows"]) == len(evaluated.map_scores)
    table2 = json.loads((folder / "table2.json").read_text())
    assert table2 == [{"images": 56, **{k: evaluated.table2[k] for k in SUMMARY}}]


def test_the_section_is_self_contained(evaluated):
    html = render_truth_html(evaluated)
    assert 'id="evaluation"' in html
    for part in ("matching", "table2", "class-maps", "localization", "map-scores", "faithfulness"):
        assert f'id="evaluation-{part}"' in html
    assert html.count('src="data:image/png;base64,') == 5  # confusion, ROC, maps, Fig. 6, faith
    assert "http" not in html and "<link" not in html and "url(" not in html  # nothing fetched
    assert "energy-based pointing game" in html


def test_map_scores_summarize_normalized_maps(evaluated):
    correct = {c.class_name: c.correct for c in evaluated.localization.classes if c.correct}
    assert {(r.class_name, r.method) for r in evaluated.map_scores} == {
        (name, m) for name in correct for m in maps.default_methods()
    }
    for row in evaluated.map_scores:
        assert row.images == correct[row.class_name] and row.pixels == row.images * 300 * 300
        assert 0 < row.mean <= 1 and 0 <= row.std <= 0.5
        assert sum(row.histogram) / len(row.histogram) == pytest.approx(1.0)  # a density


def test_faithfulness_areas_lie_in_the_unit_interval(evaluated):
    faith = evaluated.faithfulness
    assert [r.method for r in faith.rows] == [*maps.default_methods(), RANDOM]
    assert len(faith.images) == min(4, evaluated.localization.correct)
    for row in faith.rows:
        assert row.images == len(faith.images)
        assert 0 <= row.deletion_auc <= 1 and 0 <= row.insertion_auc <= 1
        assert len(faith.curves[row.method]["deletion"]) == faith.steps + 1


def test_deletion_ends_on_the_mean_image_and_insertion_on_the_image(tiny_archive, tiny_onnx):
    model = OnnxModel(tiny_onnx)
    from modlabel.decode import load_pixels

    path = (
        tiny_archive / json.loads((tiny_archive / "ground_truth.jsonl").open().readline())["path"]
    )
    pixels, _ = load_pixels(path.read_bytes(), model.info.input_size)
    blurred = np.zeros_like(pixels, dtype=np.float32)
    order = pixel_order(np.ones((3, 3)), model.info.input_size, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(pixels.shape[0] * pixels.shape[1]))
    deletion, insertion = relevance_curves(model, pixels, order, 0, blurred=blurred, steps=4)
    whole, _ = model.run(model.preprocess(pixels[None]))
    mean_image = np.broadcast_to(np.float32(model.info.mean), pixels.shape)
    gone, _ = model.run(model.preprocess(mean_image[None]))
    black, _ = model.run(model.preprocess(blurred[None]))

    def p(logits):  # calibrated, as every command gives it: softmax(logits / T)
        z = logits[0].astype(np.float64) / model.info.temperature
        e = np.exp(z - z.max())
        return e[0] / e.sum()

    assert deletion[0] == pytest.approx(p(whole), abs=1e-5) == insertion[-1]
    assert deletion[-1] == pytest.approx(p(gone), abs=1e-5)
    assert insertion[0] == pytest.approx(p(black), abs=1e-5)
    assert curve_area(np.ones(5)) == 1.0 and curve_area(np.linspace(1, 0, 17)) == 0.5


# --------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.csv", "file,class\na.jpg,x\n", r"header row with the columns path,label"),
        ("t.csv", "path,label\na.jpg,\n", r"t.csv:2: empty path or label"),
        ("t.jsonl", '{"path": "a.jpg"}\n', r"t.jsonl:1: not a ground-truth record"),
        ("t.jsonl", "{not json\n", r"t.jsonl:1: invalid JSON"),
        ("t.csv", "path,label\na.jpg,x\na.jpg,y\n", r"given twice"),
        ("t.csv", "path,label\n", r"holds no truth records"),
    ],
)
def test_a_bad_truth_file_is_a_clear_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ModlabelError, match=message):
        load_truth(tmp_path / name)


def test_other_bad_inputs_are_clear_errors(scanned, tmp_path, monkeypatch):
    engine, model_row = scanned
    with pytest.raises(ModlabelError, match="no such truth file"):
        load_truth(tmp_path / "nothing.jsonl")
    (tmp_path / "b.csv").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ModlabelError, match="not a text file"):
        load_truth(tmp_path / "b.csv")
    with pytest.raises(ModlabelError, match="not both"):
        load_truth(tmp_path / "b.csv", from_folders=True)

    (tmp_path / "cat.csv").write_text("path,label\na.jpg,x_ray_of_a_cat\n")
    with pytest.raises(ModlabelError, match=r"\['x_ray_of_a_cat'\] are not the model's classes"):
        evaluate_truth(engine, model_row, load_truth(tmp_path / "cat.csv"), out_dir=tmp_path)
    (tmp_path / "far.csv").write_text("path,label\nelsewhere/a.jpg,brain_mri\n")
    with pytest.raises(ModlabelError, match="none of its 1 paths is a stored image"):
        evaluate_truth(engine, model_row, load_truth(tmp_path / "far.csv"), out_dir=tmp_path)

    truth = load_truth(None, from_folders=True)
    gone = dataclasses.replace(model_row, path=str(tmp_path / "moved.onnx"))
    with pytest.raises(ModelError, match=r"moved\.onnx, and cannot load it"):
        evaluate_truth(engine, gone, truth, out_dir=tmp_path)

    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    with pytest.raises(ModlabelError, match=r"pip install 'modlabel\[eval\]'"):
        evaluate_truth(engine, model_row, truth, out_dir=tmp_path)
