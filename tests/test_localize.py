"""localize: the metrics on hand-built maps and boxes, then the command end to end
on a synthetic archive with a really trained model."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from modlabel import geometry, maps
from modlabel.cli import app
from modlabel.errors import ModlabelError
from modlabel.evaluation import (
    box_mask,
    evaluate_localization,
    localization_scores,
    read_records,
    scale_gt_box,
)
from modlabel.model import OnnxModel

# --------------------------------------------------------------- box scaling


def test_boxes_stretch_with_a_non_square_image():
    # A 200x100 original stretched to 300x300: x by 1.5, y by 3.
    assert scale_gt_box([50, 25, 150, 75], (200, 100), (300, 300)) == (75, 75, 225, 225)
    # Rounded outward: x 1.5 -> 1, 4.5 -> 5; y 3 -> 3, 9 -> 9.
    assert scale_gt_box([1, 1, 3, 3], (200, 100), (300, 300)) == (1, 3, 5, 9)
    # A non-square target (height 150, width 400): x by 2, y by 1.5.
    assert scale_gt_box([50, 25, 150, 75], (200, 100), (150, 400)) == (100, 37, 300, 113)


def test_a_box_to_the_edge_stays_on_the_grid():
    # 237 * (300 / 237) is not exactly 300 in floating point.
    assert scale_gt_box([0, 0, 237, 131], (237, 131), (300, 300)) == (0, 0, 300, 300)


def test_box_mask_is_the_union_of_the_scaled_boxes():
    mask = box_mask([[0, 0, 2, 2], [1, 1, 3, 3]], (4, 4), (8, 8))
    assert mask.shape == (8, 8)
    assert mask.sum() == 16 + 16 - 4  # two 4x4 squares overlapping on 2x2
    assert mask[0, 0] and mask[5, 5] and not mask[0, 5]
    assert not box_mask([], (4, 4), (8, 8)).any()


# --------------------------------------------------------------- the metrics


def _masks(n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    structures = np.zeros((n, 10, 10), bool)
    structures[:, :, 0:3] = True  # columns 0-2: 30 pixels
    distractors = np.zeros((n, 10, 10), bool)
    distractors[0, 3, 3:5] = True  # only image 0 has a distractor
    return structures, distractors


def test_scores_on_hand_built_maps():
    m = np.full((3, 10, 10), 0.1, np.float32)  # 0.1 of the max: below the 20% threshold
    m[0, 2:4, 2:4] = 1.0  # ROI: 4 pixels, 2 of them (column 2) on the structures
    m[1] = 0.0
    m[1, 8, 8] = 1.0  # the max, outside the structures
    m[1, 0, 0] = 0.5  # in the ROI and on the structures
    m[2] = -1.0  # no positive value: an empty ROI
    structures, distractors = _masks()

    s = localization_scores(m, structures, distractors, fraction=0.2)

    assert s.roi_pixels.tolist() == [4, 2, 0]
    assert s.roi_ratio.tolist() == pytest.approx([4.0, 2.0, 0.0])
    # Image 0's max: the first of the tied 1.0s in row-major order, (row 2, column 2).
    assert s.pointing.tolist() == [1.0, 0.0, 0.0]
    assert s.roi_precision[:2].tolist() == pytest.approx([2 / 4, 1 / 2])
    assert math.isnan(s.roi_precision[2])
    assert s.roi_recall.tolist() == pytest.approx([2 / 30, 1 / 30, 0.0])
    # Image 0: (row 3, column 3) is in both the ROI and the distractor box.
    assert s.distractor_share[0] == pytest.approx(1 / 4)
    assert np.isnan(s.distractor_share[1:]).all()  # no distractor; an empty ROI


def test_pointing_and_recall_are_undefined_without_structure_boxes():
    m = np.ones((1, 4, 4), np.float32)
    nothing = np.zeros((1, 4, 4), bool)
    s = localization_scores(m, nothing, nothing)
    assert np.isnan(s.pointing[0]) and np.isnan(s.roi_recall[0])
    assert s.roi_precision[0] == 0.0 and s.roi_pixels[0] == 16


def test_roi_pixels_are_table_3s_measure():
    rng = np.random.default_rng(0)
    small = rng.normal(size=(2, 6, 6)).astype(np.float32)
    big = geometry.upsample(small, (300, 300))
    nothing = np.zeros(big.shape, bool)
    s = localization_scores(big, nothing, nothing)
    expected = [geometry.roi_stats(m, (300, 300)) for m in small]
    assert s.roi_pixels.tolist() == [e.pixels for e in expected]
    assert s.roi_ratio.tolist() == pytest.approx([100 * e.ratio for e in expected])


def test_mismatched_masks_are_refused():
    with pytest.raises(ValueError, match="differ"):
        localization_scores(
            np.ones((1, 4, 4)), np.zeros((1, 4, 5), bool), np.zeros((1, 4, 4), bool)
        )


# --------------------------------------------------------------- ground truth


def _record(path: str, cls: str = "brain_mri", **extra) -> str:
    doc = {"path": path, "class": cls, "width": 20, "height": 10, "boxes": [], **extra}
    return json.dumps(doc) + "\n"


def test_records_stream_without_borders(tmp_path):
    gt = tmp_path / "ground_truth.jsonl"
    distractors = [
        {"label": "border", "box": [0, 0, 20, 10]},
        {"label": "text", "box": [1, 1, 4, 3]},
    ]
    gt.write_text(_record("a.jpg", distractors=distractors) + "\n" + _record("b.jpg"))
    records = list(read_records(gt))
    assert [r.path for r in records] == ["a.jpg", "b.jpg"]
    assert records[0].distractors == ((1, 1, 4, 3),)
    assert [r.path for r in read_records(gt, limit=1)] == ["a.jpg"]


def test_a_broken_record_names_its_line(tmp_path):
    gt = tmp_path / "ground_truth.jsonl"
    gt.write_text(_record("a.jpg") + '{"path": "b.jpg"}\n')
    with pytest.raises(ModlabelError, match=r"ground_truth.jsonl:2: not a ground-truth record"):
        list(read_records(gt))


# --------------------------------------------------------------- end to end

runner = CliRunner()


def test_localize_command_writes_a_report(tiny_archive, tiny_onnx, tmp_path):
    out = tmp_path / "localize.json"
    result = runner.invoke(
        app, ["localize", str(tiny_archive), "--model", str(tiny_onnx), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Table 3" in result.output and "pointing game" in result.output
    report = json.loads(out.read_text())

    truth = read_records(tiny_archive / "ground_truth.jsonl")
    per_class = Counter(r.class_name for r in truth)
    n_images = sum(per_class.values())
    # By default every closed-form method; Score-CAM and RISE only when asked for.
    methods = list(maps.closed_form_methods())
    assert "scorecam" not in methods and "rise" not in methods
    assert report["methods"] == methods and report["size"] == [300, 300]
    assert report["images"] == n_images and report["unreadable"] == []
    assert {c["class_name"]: c["images"] for c in report["classes"]} == per_class
    assert report["correct"] == sum(c["correct"] for c in report["classes"]) <= n_images
    assert len(report["rows"]) == len(report["classes"]) * len(methods)
    assert [r["method"] for r in report["overall"]] == methods

    correct = {c["class_name"]: c["correct"] for c in report["classes"]}
    for row in report["rows"] + report["overall"]:
        expected = report["correct"] if row["class_name"] == "all" else correct[row["class_name"]]
        assert row["images"] == expected
        assert 0 <= row["distractor_images"] <= row["images"]
        if row["images"] == 0:
            assert row["roi_ratio"] is None and row["pointing"] is None
            continue
        assert 0 <= row["roi_ratio"] <= 100
        assert row["roi_pixels"] == pytest.approx(row["roi_ratio"] / 100 * 300 * 300)
        for key in ("pointing", "roi_precision", "roi_recall", "distractor_share"):
            assert row[key] is None or 0 <= row[key] <= 1, (key, row)
    for c in report["classes"]:
        for key in ("accuracy", "structure_area", "distractor_area"):
            assert c[key] is None or 0 <= c[key] <= 1


def test_localize_limit_and_missing_ground_truth(tiny_archive, tiny_onnx, tmp_path):
    out = tmp_path / "first.json"
    args = ["localize", str(tiny_archive), "--model", str(tiny_onnx), "--limit", "3"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["images"] == 3

    result = runner.invoke(app, ["localize", str(tmp_path), "--model", str(tiny_onnx)])
    assert result.exit_code == 1
    assert "ground_truth.jsonl: no ground truth" in result.output
    assert "Traceback" not in result.output


def test_unreadable_files_are_listed_and_unknown_classes_refused(tiny_archive, tiny_onnx, tmp_path):
    archive = tmp_path / "archive"
    records = (tiny_archive / "ground_truth.jsonl").read_text().splitlines()[:2]
    for line in records:
        path = Path(json.loads(line)["path"])
        (archive / path.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_archive / path, archive / path)
    (archive / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    gt = archive / "ground_truth.jsonl"
    gt.write_text("\n".join(records) + "\n" + _record("broken.jpg"))
    model = OnnxModel(tiny_onnx)

    report = evaluate_localization(archive, model, size=(64, 64))
    assert report.images == 2 and report.size == (64, 64)
    assert report.unreadable == [{"path": "broken.jpg", "reason": "not a recognized image format"}]
    # The command names each one on stderr, as explain does, and measures the others.
    said = runner.invoke(app, ["localize", str(archive), "--model", str(tiny_onnx)])
    assert said.exit_code == 0, said.output
    assert "modlabel: broken.jpg: not a recognized image format" in said.stderr

    gt.write_text(_record("broken.jpg", cls="x_ray_of_a_cat"))
    with pytest.raises(ModlabelError, match="'x_ray_of_a_cat'.*not one of the model's classes"):
        evaluate_localization(archive, model)


def test_localize_leaves_tensorflow_unimported(tiny_archive, tiny_onnx):
    script = (
        "import sys\n"
        "from modlabel.evaluation import evaluate_localization\n"
        "from modlabel.model import OnnxModel\n"
        f"evaluate_localization({str(tiny_archive)!r}, OnnxModel({str(tiny_onnx)!r}), limit=2)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_figure_has_its_interval_and_every_two_methods_a_test(tiny_archive, tiny_onnx):
    from modlabel.evaluation import StatisticsSettings, format_report

    report = evaluate_localization(
        tiny_archive, OnnxModel(tiny_onnx), limit=28, settings=StatisticsSettings(resamples=200)
    )
    for row in report.rows + report.overall:
        for metric in ("pointing", "energy", "roi_ratio"):
            interval = report.interval(row.class_name, row.method, metric)
            mean = getattr(row, metric)
            if mean is None:
                assert interval.estimate is None
                continue
            assert interval.estimate == pytest.approx(mean)  # the row's own mean
            assert interval.low - 1e-9 <= mean <= interval.high + 1e-9
    pairs = len(report.methods) * (len(report.methods) - 1) // 2
    assert len(report.comparisons) == 7 * pairs
    assert {c.test for c in report.comparisons if c.metric == "pointing"} == {"McNemar exact"}
    text = format_report(report)
    assert "All classes, with intervals over the" in text and "Holm-adjusted" in text
    crm = report.interval("all", "crm", "pointing")
    assert f"{crm.estimate:.2f} [{crm.low:.2f}, {crm.high:.2f}]" in text
    assert "CRM vs CAM: pointing game" in text
