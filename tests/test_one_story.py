"""Every command tells the same story about an image: one inference path (modlabel.infer).

The same 20 images through ``scan``, ``explain --format json``, ``localize`` and
``report --truth`` give the same label, the same calibrated confidence and the same
out-of-set flag; and every output that lists images carries the same fields.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modlabel import store
from modlabel.cli import app
from modlabel.queries import load_query, open_query
from modlabel.report import IMAGE_CSV_COLUMNS

# What every output carries for a labeled image (modlabel.infer.describe's keys).
FIELDS = ("label", "confidence", "runner_up", "runner_up_probability", "out_of_set", "ood_score")
IMAGES = 20


def invoke(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def twenty(tiny_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 images of the tiny archive, with their own ground_truth.jsonl."""
    out = tmp_path_factory.mktemp("twenty")
    lines = (tiny_archive / "ground_truth.jsonl").read_text().splitlines()
    # Every class, in turn, until there are 20.
    by_class: dict[str, list[str]] = {}
    for line in lines:
        by_class.setdefault(json.loads(line)["class"], []).append(line)
    picked = []
    while len(picked) < IMAGES:
        for kept in by_class.values():
            if kept and len(picked) < IMAGES:
                picked.append(kept.pop(0))
    for line in picked:
        rel = json.loads(line)["path"]
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tiny_archive / rel, out / rel)
    (out / "ground_truth.jsonl").write_text("\n".join(picked) + "\n")
    return out


def test_scan_explain_localize_and_report_agree_on_every_image(twenty, tiny_onnx, tmp_path):
    db = tmp_path / "labels.db"
    invoke("scan", twenty, "--model", tiny_onnx, "--db", db)
    engine = store.open_db(f"sqlite:///{db}", migrate=False)
    scanned = {
        r["path"]: r for r in store.iter_image_rows(engine, store.pick_model(engine).id, FIELDS)
    }
    assert len(scanned) == IMAGES and all(r["label"] for r in scanned.values())

    files = sorted(scanned)
    explained = json.loads(
        invoke("explain", *files, "--model", tiny_onnx, "--out", tmp_path / "x", "--format",
               "json").stdout
    )  # fmt: skip
    localized_file = tmp_path / "localize.json"
    invoke("localize", twenty, "--model", tiny_onnx, "--out", localized_file)
    localized = json.loads(localized_file.read_text())["labeled"]
    invoke("report", "--db", db, "--out", tmp_path / "r", "--truth", twenty / "ground_truth.jsonl")
    evaluation = json.loads((tmp_path / "r" / "evaluation" / "evaluation.json").read_text())
    reported = evaluation["localization"]["labeled"]

    stories = {
        "explain": {r["path"]: r for r in explained},
        "localize": {str(Path(r["path"]).resolve()): r for r in localized},
        "report --truth": {str(Path(r["path"]).resolve()): r for r in reported},
    }
    for command, told in stories.items():
        assert set(told) == set(scanned), command
        for path, row in scanned.items():
            other = told[path]
            assert other["label"] == row["label"], (command, path)
            assert other["runner_up"] == row["runner_up"], (command, path)
            assert other["out_of_set"] == row["out_of_set"], (command, path)
            for key in ("confidence", "runner_up_probability", "ood_score"):
                assert other[key] == pytest.approx(row[key], abs=1e-6), (command, path, key)


def test_every_output_that_lists_images_carries_the_same_fields(twenty, tiny_onnx, tmp_path):
    db = tmp_path / "labels.db"
    invoke("scan", twenty, "--model", tiny_onnx, "--db", db, "--class-min-confidence", "0")
    invoke("report", "--db", db, "--out", tmp_path / "r", "--format", "images")
    with (tmp_path / "r" / "images.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert header == list(IMAGE_CSV_COLUMNS)  # the image's fields, then its review's
    assert {"label_reviewed", "label_final"} <= set(header)
    assert set(FIELDS) | {"dicom_modality", "dicom_body_part", "roi_share"} <= set(header)

    engine = store.open_db(f"sqlite:///{db}", migrate=False)
    params = {
        "by-label": {"label": "chest_xray", "min_confidence": "0"},
        "low-confidence": {"threshold": "1.01"},
        "out-of-set": {},
        "modality-agreement": {},
    }
    for name, extra in params.items():
        with open_query(engine, load_query(name), extra) as result:
            columns = set(result.columns)
            list(result.rows)
        wanted = {"path", "label", "confidence", "runner_up", "runner_up_probability",
                  "ood_score", "dicom_modality"}  # fmt: skip
        if name != "out-of-set":  # that query is the flagged images: all of them are
            wanted.add("out_of_set")
        assert wanted <= columns, (name, wanted - columns)
