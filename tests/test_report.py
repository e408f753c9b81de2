"""The report: its files (class ROIs, class maps, image rows) against an independent
computation on a database built by hand, the --format subsets, and the page itself
rendered in headless Chromium (console, sections, hostile file names)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
import sys
import types
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from typer.testing import CliRunner

from modlabel import codec, geometry, report, store
from modlabel.cli import app
from modlabel.report.files import IMAGE_CSV_COLUMNS
from modlabel.timestamps import iso_utc

INPUT_HW = (40, 60)  # not square: a swapped height and width shows
GRID_HW = (4, 6)
THRESHOLD = 0.9
# Class names come from model metadata: two of them sanitize to the same stem.
CLASSES = ["alpha", "beta/γ", "beta_γ", "..hidden"]
STEMS = {"alpha": "alpha", "beta/γ": "beta__", "beta_γ": "beta__-2", "..hidden": "_.hidden"}
NOW = datetime(2026, 11, 25, 2, 15, tzinfo=timezone.utc)


def _map(rng: np.random.Generator, *peaks: tuple[int, int]) -> np.ndarray:
    m = rng.uniform(0.0, 0.3, GRID_HW).astype(np.float32)
    for y, x in peaks:
        m[y, x] += rng.uniform(2.0, 3.0)
    return m * rng.uniform(0.5, 50.0)  # each image's own scale: normalized before averaging


def _image_rows(rng: np.random.Generator) -> list[dict]:
    """Per class: maps with a peak of its own, confidences above and below the threshold;
    plus failed files (two reasons) and missing files (which must count nowhere)."""
    rows = []
    peaks = {
        "alpha": [(1, 1)],
        "beta/γ": [(0, 0), (3, 5)],  # two regions apart: several boxes
        "beta_γ": [(2, 3)],
        "..hidden": [(1, 4)],
    }
    confidences = [0.99, 0.95, 0.93, 0.91, 0.6, 0.3]
    for c, name in enumerate(CLASSES):
        for i, confidence in enumerate(confidences[: 6 - c]):
            rows.append(
                _row(f"/archive/{c}/{i:03d}.jpg", name, confidence, _map(rng, *peaks[name]))
            )
    rows.append(_row("/archive/9/late.jpg", "alpha", 0.999, _map(rng, (3, 0)), missing=True))
    rows.append(_row("/archive/9/left.jpg", "beta_γ", 0.5, _map(rng, (0, 5)), missing=True))
    for i in range(5):
        reason = "not a recognized image format" if i < 3 else "file too large"
        rows.append(_row(f"/archive/8/bad{i}.jpg", None, None, None, error=reason))
    return rows


def _row(path, label, confidence, crm_map, *, error=None, missing=False) -> dict:
    return {
        "path": path,
        "size_bytes": 1000,
        "mtime": 1.7e9,
        "sha256": "0" * 64,
        "width": 120,
        "height": 80,
        "label": label,
        "confidence": confidence,
        "probabilities": None,
        "crm": codec.encode_map(crm_map) if crm_map is not None else None,
        "error": error,
        "labeled_at": NOW,
        "missing_since": NOW + timedelta(hours=1) if missing else None,
    }


@pytest.fixture
def hand_db(tmp_path):
    """A database built by hand: (engine, model row, the rows written)."""
    engine = store.open_db(f"sqlite:///{tmp_path / 'hand.db'}")
    model_id = store.ensure_model(
        engine,
        identity="tiny-0123456789ab",
        sha256="0" * 64,
        backbone="tiny",
        class_names=CLASSES,
        input_size=list(INPUT_HW),
        activation_shape=[*GRID_HW, 8],
        path="model.onnx",
    )
    rows = _image_rows(np.random.default_rng(3))
    store.write_image_rows(engine, model_id, rows)
    store.rebuild_class_maps(engine, model_id, CLASSES, THRESHOLD)
    scan_id = store.start_scan(engine, model_id, ["/archive"])
    store.finish_scan(engine, scan_id, seen=len(rows), unchanged=0, missing=2)
    yield engine, store.pick_model(engine), rows
    engine.dispose()


def _expected_average(rows: list[dict], name: str) -> np.ndarray:
    """Eq. 8 with every map divided by its own max, by hand."""
    units = [
        (m := np.maximum(codec.decode_map(r["crm"]), 0)) / m.max()
        for r in rows
        if r["label"] == name
        and r["error"] is None
        and r["missing_since"] is None
        and r["confidence"] >= THRESHOLD
    ]
    average = np.mean(units, axis=0)
    return average / average.max()


def _box_by_hand(average: np.ndarray, fraction: float) -> tuple[tuple[int, ...], float]:
    shown = geometry.upsample(average, INPUT_HW)
    mask = np.maximum(shown, 0) / shown.max() > fraction
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), float(mask.mean())


def test_roi_files_and_class_maps_match_a_computation_by_hand(hand_db, tmp_path):
    engine, model_row, rows = hand_db
    out = tmp_path / "out"
    result = report.build_report(engine, out, formats="rois,maps", examples_per_class=0)
    assert result.path is None and not (out / "report.html").exists()

    stored = {r["class_name"]: r for r in store.load_class_maps(engine, model_row.id)}
    records = json.loads((out / "class_rois.json").read_text())
    with (out / "class_rois.csv").open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["class"] for r in records] == [r["class"] for r in csv_rows] == CLASSES
    assert list(csv_rows[0]) == list(report.ROI_COLUMNS) == list(records[0])

    for record, row in zip(records, csv_rows, strict=True):
        name = record["class"]
        counted = [
            r
            for r in rows
            if r["label"] == name and r["missing_since"] is None and r["confidence"] >= THRESHOLD
        ]
        assert record["images"] == len(counted) == stored[name]["image_count"]
        assert record["model"] == "tiny-0123456789ab" and record["backbone"] == "tiny"
        assert record["min_confidence"] == THRESHOLD and record["averaged_over"] == "confidence"
        assert (record["input_height"], record["input_width"]) == INPUT_HW
        assert record["file_stem"] == STEMS[name]

        # The raw class-level average, at the feature-map grid: the stored one...
        npy = np.load(out / "class_maps" / f"{STEMS[name]}.npy")
        assert npy.dtype == np.float32 and npy.shape == GRID_HW
        np.testing.assert_array_equal(npy, codec.decode_map(stored[name]["crm"]))
        # ...which is Eq. 8 by hand, within the codec's 8 bits.
        np.testing.assert_allclose(npy, _expected_average(rows, name), atol=1 / 255)

        # The box: on the average upsampled to the input size, above 70% of its max.
        box, share = _box_by_hand(npy, 0.7)
        assert (record["x0"], record["y0"], record["x1"], record["y1"]) == box
        assert record["fx0"] == pytest.approx(box[0] / INPUT_HW[1])
        assert record["fy1"] == pytest.approx(box[3] / INPUT_HW[0])
        assert record["roi_share"] == pytest.approx(share) and record["roi_fraction"] == 0.7
        regions = record["regions"]
        assert json.loads(row["regions"]) == regions
        assert (int(row["x0"]), int(row["y1"])) == (box[0], box[3])
        assert float(row["roi_share"]) == pytest.approx(share)
        # The regions cover the box exactly; two apart for the class with two peaks.
        assert (
            min(r[0] for r in regions),
            min(r[1] for r in regions),
            max(r[2] for r in regions),
            max(r[3] for r in regions),
        ) == box
        assert len(regions) == (2 if name == "beta/γ" else 1)

        # The pictures: at the input size, the white box where the numbers say.
        boxed = np.asarray(Image.open(out / "class_maps" / f"{STEMS[name]}.png").convert("RGB"))
        plain = np.asarray(Image.open(out / "class_maps" / f"{STEMS[name]}.nobox.png"))
        assert boxed.shape == plain.shape == (*INPUT_HW, 3)
        ys, xs = np.nonzero(np.all(boxed == 255, axis=2))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == box
        assert not np.all(plain == 255, axis=2).any()  # jet has no white: no box drawn


def test_images_csv_has_every_row_with_its_roi_share(hand_db, tmp_path):
    engine, _, rows = hand_db
    out = tmp_path / "out"
    result = report.build_report(engine, out, formats=["images"])
    assert result.files == [out / "images.csv"] and result.images_written == len(rows)
    with (out / "images.csv").open(newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == list(IMAGE_CSV_COLUMNS)  # the row's fields, then its review
    assert [r["path"] for r in written] == sorted(r["path"] for r in rows)
    by_path = {r["path"]: r for r in rows}
    for line in written:
        row = by_path[line["path"]]
        assert line["label"] == (row["label"] or "")
        assert line["error"] == (row["error"] or "")
        if row["crm"] is None:
            assert line["confidence"] == line["roi_share"] == ""
            continue
        assert float(line["confidence"]) == row["confidence"]
        # The image's own CRM, upsampled to the input size, above 20% of its max.
        shown = geometry.upsample(codec.decode_map(row["crm"]), INPUT_HW)
        share = float((np.maximum(shown, 0) / shown.max() > 0.2).mean())
        assert float(line["roi_share"]) == pytest.approx(share, abs=1e-9)
        missing = row["missing_since"]
        assert line["missing_since"] == (iso_utc(missing) if missing else "")


def test_format_subsets_write_only_what_was_asked(hand_db, tmp_path):
    engine, _, _ = hand_db
    expected = {
        "html": {"report.html"},
        "rois": {"class_rois.csv", "class_rois.json"},
        "maps": {f"class_maps/{s}{ext}" for s in STEMS.values() for ext in report_map_exts()},
        "images": {"images.csv"},
    }
    for fmt, names in expected.items():
        out = tmp_path / fmt
        report.build_report(engine, out, formats=fmt, examples_per_class=1)
        written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        assert written == names, fmt
    out = tmp_path / "all"
    report.build_report(engine, out)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == set().union(*expected.values())

    url = str(engine.url)
    result = CliRunner().invoke(
        app, ["report", "--db", url, "--out", str(tmp_path / "cli"), "--format", "html,images"]
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "cli").iterdir()} == {"report.html", "images.csv"}
    result = CliRunner().invoke(
        app, ["report", "--db", url, "--out", str(tmp_path / "x"), "--format", "html,pdf"]
    )
    assert result.exit_code == 2 and "unknown report format pdf" in result.output
    assert not (tmp_path / "x").exists()
    result = CliRunner().invoke(
        app, ["report", "--db", url, "--out", str(tmp_path / "x"), "--faithfulness", "5"]
    )
    assert result.exit_code == 1 and "--faithfulness needs --truth" in result.output
    for option, value in (("--methods", "crm"), ("--rise-masks", "8")):  # truth's options too
        result = CliRunner().invoke(
            app, ["report", "--db", url, "--out", str(tmp_path / "x"), option, value]
        )
        assert result.exit_code == 1 and f"{option} needs --truth" in result.output
    assert not (tmp_path / "x").exists()


def report_map_exts() -> tuple[str, ...]:
    return (".png", ".nobox.png", ".npy")


def test_class_file_stems_are_safe_and_distinct():
    stems = report.class_file_stems(["a b", "a_b", "A_B", "", "../etc", ".", "ok-1.2"])
    assert stems == {
        "a b": "a_b",
        "a_b": "a_b-2",
        "A_B": "A_B-3",  # case-insensitive file systems
        "": "_",
        "../etc": "_._etc",
        ".": "_-2",
        "ok-1.2": "ok-1.2",
    }
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", s) for s in stems.values())


def test_store_queries_for_the_page(hand_db):
    engine, model_row, rows = hand_db
    least = store.example_rows(engine, model_row.id, "alpha", 2, least_confident=True)
    most = store.example_rows(engine, model_row.id, "alpha", 2)
    assert [r["confidence"] for r in least] == [0.3, 0.6]
    assert [r["confidence"] for r in most] == [0.99, 0.95]  # the missing 0.999 left out
    groups = store.error_groups(engine, model_row.id, examples=2)
    assert [(g.reason, g.count, g.examples) for g in groups] == [
        ("not a recognized image format", 3, ["/archive/8/bad0.jpg", "/archive/8/bad1.jpg"]),
        ("file too large", 2, ["/archive/8/bad3.jpg", "/archive/8/bad4.jpg"]),
    ]
    assert store.count_missing(engine, model_row.id) == 2
    histograms = store.confidence_histograms(engine, model_row.id, 20)
    assert sum(histograms["alpha"]) == 6 and histograms["alpha"][19] == 2  # 0.95, 0.99
    assert histograms["alpha"][6] == 1  # 0.3 in [0.30, 0.35)
    # The least confident are read in order on the (model_id, label, confidence) index.
    c = store.images.c
    query = (
        sa.select(c.path)
        .where(
            c.model_id == 1,
            c.missing_since.is_(None),
            c.label == "alpha",
            c.error.is_(None),
            c.confidence.is_not(None),
        )
        .order_by(c.confidence.asc(), c.path)
        .limit(4)
    )
    sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        plan = " ".join(str(r[-1]) for r in conn.execute(sa.text("EXPLAIN QUERY PLAN " + sql)))
    assert "ix_images_model_label_confidence" in plan, plan


def test_ground_truth_averages_replace_the_stored_ones(hand_db, tmp_path, monkeypatch):
    """The interface with modlabel.evaluation, with a stand-in for it: its averages (over
    the correctly classified images) go into the ROI and map files."""
    import modlabel

    engine, model_row, _ = hand_db
    average = np.zeros(GRID_HW, np.float32)
    average[0, 5] = 1.0
    calls = []

    def evaluate_truth(
        engine_, model_row_, truth, *, out_dir, faithfulness, formats, methods, perturbation
    ):
        calls.append((model_row_.identity, truth, out_dir, faithfulness, formats))
        maps_ = {"alpha": store.ClassMap("alpha", 2, average, None)}
        return types.SimpleNamespace(class_maps=maps_)

    fake = types.ModuleType("modlabel.evaluation")
    fake.evaluate_truth = evaluate_truth
    monkeypatch.setitem(sys.modules, "modlabel.evaluation", fake)
    monkeypatch.setattr(modlabel, "evaluation", fake, raising=False)
    out = tmp_path / "out"
    result = report.build_report(engine, out, formats="rois,maps", truth="T", faithfulness=3)
    assert calls == [("tiny-0123456789ab", "T", out, 3, frozenset({"rois", "maps"}))]
    assert result.averaged_over == "ground_truth"
    (record,) = json.loads((out / "class_rois.json").read_text())
    assert record["class"] == "alpha" and record["images"] == 2
    assert record["averaged_over"] == "ground_truth" and record["min_confidence"] is None
    assert (record["x0"], record["y0"], record["x1"], record["y1"]) == _box_by_hand(average, 0.7)[0]
    np.testing.assert_array_equal(np.load(out / "class_maps" / "alpha.npy"), average)


def test_report_without_truth_never_imports_the_evaluation(hand_db, tmp_path):
    engine, _, _ = hand_db
    sys.modules.pop("modlabel.evaluation", None)
    report.build_report(engine, tmp_path / "out", formats="rois")
    assert "modlabel.evaluation" not in sys.modules


# -- the page in a browser ---------------------------------------------------------------

XSS_IMAGE = "<img src=x onerror=alert(1)>.jpg"
XSS_BROKEN = "<b onmouseover=alert(2)>broken.jpg"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "chromium not found: the report's browser test needs Debian's chromium package "
            "(`make test` installs it: apt-get install -y chromium)"
        )
    return found


def _run_chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page; console messages are logged to stderr."""
    command = [
        _chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _console_messages(stderr: str) -> list[str]:
    # Chromium logs each console message (script errors, blocked loads, CSP violations)
    # as "[pid:tid:time:INFO:CONSOLE:line] "message", source: ...".
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(\]]", line)]


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.headings: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.handlers: list[tuple[str, str]] = []  # on* attributes: none may exist
        self.scripts = 0
        self.text: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "img":
            self.images.append(attributes)
        if tag == "script":
            self.scripts += 1
        self.handlers += [(tag, name) for name, _ in attrs if name.startswith("on")]
        if tag in ("h1", "h2", "h3"):
            self._in_heading = True
            self.headings.append("")

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3"):
            self._in_heading = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_heading:
            self.headings[-1] += data


def test_the_console_check_sees_errors(tmp_path):
    """The check below must not pass vacuously: a script error and a blocked network load
    on a page of the report's policy both show."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\"><title>t</title></head><body>"
        "<img src='https://example.invalid/x.png'></body></html>"
    )
    done = _run_chromium(page, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    messages = _console_messages(done.stderr)
    assert any("example.invalid" in m for m in messages), done.stderr[-3000:]
    scripted = tmp_path / "script.html"
    scripted.write_text("<!doctype html><script>console.error('boom-7')</script>")
    done = _run_chromium(scripted, tmp_path / "profile2", "--dump-dom")
    assert any("boom-7" in m for m in _console_messages(done.stderr)), done.stderr[-3000:]


def test_the_page_renders_in_chromium_with_every_section(tiny_archive, tiny_onnx, tmp_path):
    from modlabel.model import OnnxModel
    from modlabel.scan import scan_archive

    archive = tmp_path / "archive"
    shutil.copytree(tiny_archive, archive)
    first = sorted((archive / "chest_xray").glob("*.jpg"))[0]
    shutil.copy(first, first.parent / XSS_IMAGE)
    shutil.copy(first, first.parent / "gone soon.jpg")
    shutil.copy(first, archive / XSS_IMAGE)  # found gone: listed among the missing files
    (archive / XSS_BROKEN).write_bytes(b"\xff\xd8 not really a jpeg")
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    engine = store.open_db(db)
    model = OnnxModel(tiny_onnx)
    scan_archive([archive], model, engine, class_min_confidence=0.0)
    (first.parent / "gone soon.jpg").unlink()
    (archive / XSS_IMAGE).unlink()
    scan_archive([archive], model, engine, class_min_confidence=0.0)  # marks it missing
    engine.dispose()

    out = tmp_path / "report"
    # Enough examples that every image of a class shows, the hostile one included.
    result = CliRunner().invoke(app, ["report", "--db", db, "--out", str(out), "--examples", "6"])
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert "onerror=alert(1)&gt;.jpg" in html  # escaped by Jinja2's autoescape

    done = _run_chromium(out / "report.html", tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _console_messages(done.stderr) == [], _console_messages(done.stderr)
    dom = _Dom()
    dom.feed(done.stdout)
    classes = json.loads((out / "class_rois.json").read_text())
    anchors = {f"class-{r['file_stem']}" for r in classes}
    assert {"summary", "scans", "errors", "missing", "files"} | anchors <= dom.ids, dom.ids
    for heading in ("Classes", "Scans", "Files that could not be labeled (1)", "Missing files (2)"):
        assert any(h.strip().startswith(heading) for h in dom.headings), (heading, dom.headings)
    assert any(h.strip() == "Least confident" for h in dom.headings)
    text = " ".join(" ".join(dom.text).split())
    # Hostile names are text, in the examples and among the failed files, never markup.
    assert XSS_IMAGE in text and XSS_BROKEN in text and "gone soon.jpg" in text
    engine = store.open_db(db)
    model_id = store.pick_model(engine).id
    hostile = str(first.parent / XSS_IMAGE)
    rows = store.iter_image_rows(engine, model_id, ["label"])
    label = next(r["label"] for r in rows if r["path"] == hostile)
    shown = [
        r
        for least in (False, True)
        for r in store.example_rows(engine, model_id, label, 6, least_confident=least)
    ]
    engine.dispose()
    for r in shown:  # the example captions: confidence, then the path as text
        assert f"{r['confidence']:.3f} · {r['path']}" in text
    assert hostile in {r["path"] for r in shown} or len(shown) == 12
    assert dom.handlers == [] and dom.scripts == 0
    assert not [i for i in dom.images if i.get("src") == "x"]
    # Every picture is inline, and decodes.
    assert dom.images and all(i["src"].startswith("data:image/png;base64,") for i in dom.images)
    for image in dom.images:
        Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))).verify()

    shot = tmp_path / "shot.png"
    done = _run_chromium(
        out / "report.html",
        tmp_path / "profile-shot",
        f"--screenshot={shot}",
        "--window-size=1280,4000",
        "--hide-scrollbars",
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (4000, 1280) and pixels.std() > 10  # not a blank page


# -- colour bars and wrapping ---------------------------------------------------------------


def _runs_through_jet(row: np.ndarray) -> bool:
    """A row of pixels that shows the colormap (jet) in order over a long stretch."""
    from modlabel import overlay

    jet = overlay._lookup_table(overlay.DEFAULT_CMAP).astype(int)
    distance = np.abs(row.astype(int)[:, None, :] - jet[None, :, :]).sum(axis=2)
    shown = distance.argmin(axis=1)[distance.min(axis=1) < 25]
    return (
        shown.size > 80
        and shown.min() < 70
        and shown.max() > 245
        and bool(np.all(np.diff(shown) >= -3))
    )


def test_class_heatmaps_and_example_overlays_carry_a_colour_bar():
    """Every heatmap on the page has its colour bar below it (0 to 1 of the map's max,
    "relevance"), and the page's size for a class heatmap is the picture's, bar included."""
    from modlabel import overlay, rois
    from modlabel.report import html

    rng = np.random.default_rng(5)
    average = _map(rng, (1, 2), (3, 5))
    roi = rois.class_roi("alpha", average, INPUT_HW, image_count=1, min_confidence=0.0)
    png = base64.b64decode(html.class_heatmap_png(average, roi))
    picture = np.asarray(Image.open(io.BytesIO(png)))
    height = html.map_size(INPUT_HW)[0]
    assert picture.shape[:2] == html.heatmap_size(INPUT_HW)
    assert picture.shape[0] == height + overlay.colorbar_height()
    bar = picture[height:]
    assert any(_runs_through_jet(row) for row in bar)

    display = rng.integers(0, 255, (90, 150, 3), dtype=np.uint8)
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(html.example_png(display, average)))))
    assert thumb.shape[1] == html.EXAMPLE_PX and thumb.shape[0] > 108  # 108: the image alone
    assert any(_runs_through_jet(row) for row in thumb[108:])


def test_the_scans_table_wraps_within_the_page_at_1280_px(hand_db, tmp_path):
    """A long scan reason wraps inside its cell: nothing of the page lies beyond a 1280 px
    window (it widened the table past the page, cutting the reason column off)."""
    playwright = pytest.importorskip("playwright.sync_api")
    engine, model, _rows = hand_db
    reason = (
        "/archive/shares/radiology-2026 is empty, but 48213 files are stored under it (a "
        "share that did not mount?): nothing was marked missing; --allow-missing marks them"
    )
    scan_id = store.start_scan(engine, model.id, ["/archive/shares/radiology-2026/incoming"])
    store.finish_scan(engine, scan_id, status="failed", reason=reason, seen=0, unchanged=0)
    out = tmp_path / "report"
    db = f"sqlite:///{tmp_path / 'hand.db'}"
    result = CliRunner().invoke(app, ["report", "--db", db, "--out", str(out)])
    assert result.exit_code == 0, result.output
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto((out / "report.html").resolve().as_uri())
            widths = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            cells = page.evaluate(
                "Array.from(document.querySelectorAll('#scans td')).map(td => "
                "[td.textContent, td.getBoundingClientRect().right])"
            )
        finally:
            browser.close()
    assert widths[0] <= widths[1], widths
    assert reason in [text for text, _right in cells]
    assert all(right <= widths[1] for _text, right in cells), cells
