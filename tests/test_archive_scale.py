"""The nightly scan at archive scale: vanished files, skipped files, running class sums,
tables of figures with ids and blobs, on SQLite and on PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from modlabel import store
from modlabel.cli import app
from modlabel.model import OnnxModel
from modlabel.scan import scan_archive
from modlabel.source import ImageFilter, table_files


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> str:
    """The SQLAlchemy URL of a new, empty database of either kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    return request.getfixturevalue("postgres_database")("scale")


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def copy_archive(tiny_archive: Path, dst: Path) -> Path:
    shutil.copytree(tiny_archive, dst, ignore=shutil.ignore_patterns("*.jsonl"))
    return dst


def stored_sums(engine, model_id: int) -> dict[str, tuple[int, np.ndarray]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                store.class_maps.c.class_name,
                store.class_maps.c.image_count,
                store.class_maps.c.map_sum,
            ).where(store.class_maps.c.model_id == model_id)
        ).all()
    return {name: (count, store.class_sums._load_sum(blob)) for name, count, blob in rows}


def assert_sums_equal_a_full_recompute(engine, model_id: int, threshold: float) -> None:
    counts, sums = store.sum_class_maps(engine, model_id, threshold)
    stored = stored_sums(engine, model_id)
    assert sorted(stored) == sorted(n for n, c in counts.items() if c > 0)
    for name, (count, total) in stored.items():
        assert count == counts[name]
        np.testing.assert_allclose(total, sums[name], rtol=1e-9, atol=1e-9)
    # The stored average map is the one a full recompute draws.
    for row in store.load_class_maps(engine, model_id):
        full = store.class_map_from_sum(row["class_name"], sums[row["class_name"]],
                                            counts[row["class_name"]])  # fmt: skip
        assert tuple(row["roi_box"]) == full.roi_box


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_running_class_sums_equal_a_full_recompute_after_adds_relabels_and_deletions(
    tiny_archive, tiny_onnx, tmp_path, db, threshold
):
    archive = copy_archive(tiny_archive, tmp_path / "archive")
    engine = store.open_db(db)
    model = OnnxModel(tiny_onnx)
    scan = lambda: scan_archive([archive], model, engine, class_min_confidence=threshold)  # noqa: E731
    scan()
    model_id = store.pick_model(engine).id
    assert_sums_equal_a_full_recompute(engine, model_id, threshold)

    files = sorted(archive.rglob("*.jpg"))
    for i, path in enumerate(files[:6]):  # adds: copies under new names
        shutil.copyfile(path, archive / f"added_{i}.jpg")
    for a, b in zip(files[6:12], files[-6:], strict=True):  # relabels: other content
        shutil.copyfile(b, a)
    for path in files[12:18]:  # deletions
        path.unlink()
    files[20].write_bytes(b"now broken")  # a label becomes an error
    stats = scan()
    assert stats.missing == 6 and stats.labeled + stats.errors == 6 + 6 + 1
    assert_sums_equal_a_full_recompute(engine, model_id, threshold)

    shutil.copyfile(files[0], files[12])  # one comes back, with new content
    assert invoke("prune", "--db", db).exit_code == 0
    scan()
    assert_sums_equal_a_full_recompute(engine, model_id, threshold)


def test_a_new_threshold_rebuilds_the_sums(tiny_archive, tiny_onnx, sqlite_url):
    engine = store.open_db(sqlite_url)
    model = OnnxModel(tiny_onnx)
    scan_archive([tiny_archive], model, engine, class_min_confidence=0.0)
    model_id = store.pick_model(engine).id
    everything = sum(c for c, _ in stored_sums(engine, model_id).values())
    assert everything == len(list(tiny_archive.rglob("*.jpg")))
    confidences = [r.confidence for r in _image_rows(engine)]
    threshold = float(np.median(confidences))
    scan_archive([tiny_archive], model, engine, class_min_confidence=threshold)
    counted = sum(c for c, _ in stored_sums(engine, model_id).values())
    assert counted == sum(1 for c in confidences if c >= threshold) < everything
    assert_sums_equal_a_full_recompute(engine, model_id, threshold)


def _image_rows(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(store.images)).all()


def test_a_deleted_file_is_marked_missing_leaves_counts_and_can_be_pruned(
    tiny_archive, tiny_onnx, tmp_path, db
):
    archive = copy_archive(tiny_archive, tmp_path / "archive")
    files = sorted(archive.rglob("*.jpg"))
    args = ["--model", tiny_onnx, "--db", db, "--class-min-confidence", "0"]
    assert invoke("scan", archive, *args).exit_code == 0
    engine = store.open_db(db)
    model_id = store.pick_model(engine).id
    before = store.class_counts(engine, model_id)
    gone = files[3]
    label = next(r.label for r in _image_rows(engine) if r.path == str(gone))
    gone.unlink()

    assert invoke("scan", archive, *args).exit_code == 0
    (last,) = store.list_scans(engine, limit=1)
    assert last.missing == 1 and last.labeled == 0
    after = store.class_counts(engine, model_id)
    assert after[label] == before[label] - 1
    assert stored_sums(engine, model_id)[label][0] == before[label] - 1
    query = invoke("query", "by-label", "--db", db, "-p", f"label={label}",
                   "-p", "min_confidence=0", "--format", "csv")  # fmt: skip
    assert str(gone) not in query.output and query.exit_code == 0

    within_grace = invoke("prune", "--db", db)  # missing for less than 7 days: kept
    assert within_grace.exit_code == 0 and "pruned 0 rows" in within_grace.output
    dry = invoke("prune", "--db", db, "--dry-run", "--missing-for", "0")
    assert dry.exit_code == 0 and str(gone) in dry.output and "1 rows of files" in dry.output
    assert len(_image_rows(engine)) == len(files)  # nothing deleted by a dry run
    pruned = invoke("prune", "--db", db, "--missing-for", "0")
    assert pruned.exit_code == 0 and "pruned 1 rows" in pruned.output
    assert str(gone) not in {r.path for r in _image_rows(engine)}
    assert len(_image_rows(engine)) == len(files) - 1


def test_a_file_that_comes_back_unchanged_is_counted_again_without_inference(
    tiny_archive, tiny_onnx, tmp_path, sqlite_url
):
    archive = copy_archive(tiny_archive, tmp_path / "archive")
    engine = store.open_db(sqlite_url)
    model = OnnxModel(tiny_onnx)
    scan_archive([archive], model, engine, class_min_confidence=0.0)
    away = archive / "away"
    shutil.move(archive / "chest_xray", away)
    moved = scan_archive([archive], model, engine, class_min_confidence=0.0)
    assert moved.missing == moved.labeled  # a moved folder is not counted twice
    model_id = store.pick_model(engine).id
    assert sum(store.class_counts(engine, model_id).values()) == len(list(archive.rglob("*.jpg")))
    shutil.rmtree(archive / "away")
    shutil.copytree(tiny_archive / "chest_xray", archive / "chest_xray", copy_function=shutil.copy2)
    back = scan_archive([archive], model, engine, class_min_confidence=0.0)
    assert back.labeled == 0 and back.returned == len(list((archive / "chest_xray").glob("*.jpg")))
    assert_sums_equal_a_full_recompute(engine, model_id, 0.0)


def test_an_unreadable_folder_does_not_make_its_files_missing(
    tiny_archive, tiny_onnx, tmp_path, sqlite_url, monkeypatch
):
    import os

    archive = copy_archive(tiny_archive, tmp_path / "archive")
    engine = store.open_db(sqlite_url)
    model = OnnxModel(tiny_onnx)
    scan_archive([archive], model, engine)
    real_scandir = os.scandir
    locked = str(archive / "brain_mri")

    def scandir(path):  # root reads through permissions, so deny the listing here
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stats = scan_archive([archive], model, engine)
    assert stats.missing == 0 and stats.errors == 1
    assert stats.error_paths == [(locked, "cannot list directory: Permission denied")]


def test_files_that_are_not_images_are_counted_as_skipped(tiny_archive, tiny_onnx, tmp_path, db):
    archive = tmp_path / "archive"
    archive.mkdir()
    image = sorted(tiny_archive.rglob("*.jpg"))[0]
    shutil.copyfile(image, archive / "scan.jpg")
    (archive / "notes.txt").write_text("not an image")
    (archive / "ct.dcm").write_bytes(b"\0" * 128 + b"DICM")  # DICOM by name, but broken
    (archive / "NOEXT").write_bytes(b"\0" * 200)
    (archive / ".hidden.jpg").write_bytes(b"hidden: neither walked nor counted")
    result = invoke("scan", archive, "--model", tiny_onnx, "--db", db)
    assert result.exit_code == 0, result.output
    engine = store.open_db(db)
    (run,) = store.list_scans(engine)
    # notes.txt and NOEXT (no DICM marker) are skipped; the broken ct.dcm is an error row.
    assert (run.seen, run.labeled, run.errors, run.skipped) == (2, 1, 1, 2)
    assert "ct.dcm: not a valid DICOM file" in result.output

    included = invoke(
        "scan",
        archive,
        "--model",
        tiny_onnx,
        "--db",
        db,  # fmt: skip
        "--include",
        "*.dcm",
        "--include",
        "*.jpg",
        "--exclude",
        "scan.*",
        "--retry-errors",
    )
    assert included.exit_code == 0, included.output
    assert "ct.dcm: not a valid DICOM file" in included.output
    latest = store.list_scans(engine, limit=1)[0]
    assert (latest.seen, latest.errors, latest.skipped, latest.missing) == (1, 1, 3, 1)


def test_image_filter_globs():
    only_dicom = ImageFilter(include=("*.dcm",))
    assert only_dicom.is_image("/a/x.dcm") and not only_dicom.is_image("/a/x.jpg")
    default = ImageFilter(exclude=("*/thumbs/*", "*_small.png"))
    assert default.is_image("/a/x.JPG") and not default.is_image("/a/x.txt")
    assert not default.is_image("/a/thumbs/x.jpg") and not default.is_image("/a/x_small.png")


def test_a_table_of_figures_with_blobs_and_ids_labels_every_row(tiny_archive, tiny_onnx, db):
    figures = sorted(tiny_archive.rglob("*.jpg"))[:5]
    engine = store.open_db(db)
    catalogue = sa.Table(
        "figures",
        sa.MetaData(),
        sa.Column("figure_id", sa.Integer, primary_key=True),
        sa.Column("image", sa.LargeBinary),
    )
    catalogue.create(engine)
    with engine.begin() as conn:
        rows = [{"figure_id": 100 + i, "image": p.read_bytes()} for i, p in enumerate(figures)]
        conn.execute(catalogue.insert(), [*rows, {"figure_id": 200, "image": None}])
    result = invoke("scan", "--table", "figures", "--blob-column", "image", "--id-column",
                    "figure_id", "--model", tiny_onnx, "--db", db)  # fmt: skip
    assert result.exit_code == 0, result.output
    labeled = {r.source_id: r for r in _image_rows(engine)}
    assert sorted(labeled) == ["100", "101", "102", "103", "104", "200"]
    assert all(labeled[str(100 + i)].label for i in range(5))
    assert labeled["200"].error == "no image bytes (NULL) in the table"
    assert labeled["101"].path == "table:figures/101"
    # The labels join back to the user's own table.
    with engine.connect() as conn:
        joined = conn.execute(sa.text(
            "SELECT f.figure_id, i.label FROM figures f JOIN images i "
            "ON i.source_id = CAST(f.figure_id AS TEXT) WHERE i.label IS NOT NULL"
        )).all()  # fmt: skip
    assert len(joined) == 5
    again = invoke("scan", "--table", "figures", "--blob-column", "image", "--id-column",
                   "figure_id", "--model", tiny_onnx, "--db", db)  # fmt: skip
    assert again.exit_code == 0
    assert store.list_scans(engine, limit=1)[0].labeled == 0


def test_a_table_of_paths_with_ids_stores_the_ids(tiny_archive, tiny_onnx, sqlite_url):
    figures = sorted(tiny_archive.rglob("*.jpg"))[:3]
    engine = store.open_db(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE figs (doi TEXT PRIMARY KEY, file TEXT)"))
        conn.execute(
            sa.text("INSERT INTO figs VALUES (:d, :f)"),
            [{"d": f"10.1/fig{i}", "f": str(p)} for i, p in enumerate(figures)],
        )
    entries = table_files(sqlite_url, "figs", "file", id_column="doi")
    scan_archive(["table:figs.file"], OnnxModel(tiny_onnx), engine, entries=entries)
    stored = {r.path: r.source_id for r in _image_rows(engine)}
    assert stored == {str(p): f"10.1/fig{i}" for i, p in enumerate(figures)}


def test_a_turned_photo_is_labeled_upright(tiny_archive, tiny_onnx, tmp_path, sqlite_url):
    from PIL import Image

    archive = tmp_path / "archive"
    archive.mkdir()
    source = Image.open(sorted(tiny_archive.rglob("*.jpg"))[0]).convert("RGB")
    source.save(archive / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # "turn 90 degrees counter-clockwise to show"
    source.transpose(Image.Transpose.ROTATE_270).save(archive / "turned.png", exif=exif.tobytes())
    scan_archive([archive], OnnxModel(tiny_onnx), store.open_db(sqlite_url))
    rows = {Path(r.path).name: r for r in _image_rows(store.open_db(sqlite_url))}
    upright, turned = rows["upright.png"], rows["turned.png"]
    assert (turned.width, turned.height) == (upright.width, upright.height) == source.size
    assert turned.label == upright.label
    for name, p in upright.probabilities.items():
        assert turned.probabilities[name] == pytest.approx(p, abs=1e-6)


# -- the report's reads at archive scale: the same answers, from indexes --------------

HAND_LABELS = ["alpha", "beta"]


def hand_rows(engine, rows: list[dict]) -> int:
    """A model with ``rows`` (dicts of some ``images`` columns) inserted as they are."""
    from datetime import datetime, timezone

    model_id = store.ensure_model(
        engine, identity="hand-000000000000", sha256="0" * 64, backbone="tiny",
        class_names=HAND_LABELS, input_size=[24, 24], activation_shape=[6, 6, 4], path="m.onnx",
    )  # fmt: skip
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    full = [
        {"model_id": model_id, "path": f"/archive/{i:04d}.jpg", "size_bytes": 1, "mtime": 1.0,
         "labeled_at": now, "label": None, "confidence": None, "error": None, "crm": None,
         "missing_since": None, "out_of_set": None, "roi_share": None, "runner_up": None,
         "runner_up_probability": None, "ood_score": None, "dicom_modality": None,
         "dicom_body_part": None, "error_kind": None, **row}
        for i, row in enumerate(rows)
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(store.images.insert(), full)
    return model_id


def edge_confidences(bins: int = 20) -> list[float | None]:
    """Every bin edge k/bins, and the floats next to it on either side; outside [0, 1]; none."""
    values: list[float | None] = []
    for k in range(bins + 1):
        edge = k / bins
        values += [edge, float(np.nextafter(edge, -1.0)), float(np.nextafter(edge, 2.0))]
    return [*values, 1.5, -0.25, None]


def test_histograms_and_class_counts_are_the_comparisons_with_the_bin_edges(db):
    """The report's histograms bin each confidence by a number per row now, and its class
    counts subtract the failed files from an index's counts: the answers are those of the
    definition, at every bin edge and the floats beside it, with failed files that have a
    label, missing files and out-of-set ones among them."""
    from datetime import datetime, timezone

    gone = datetime(2026, 12, 1, tzinfo=timezone.utc)
    rows = []
    for i, confidence in enumerate(edge_confidences()):
        label = HAND_LABELS[i % 2]
        rows.append({"label": label, "confidence": confidence})
        rows.append({"label": label, "confidence": confidence, "error": "half read"})
        rows.append({"label": label, "confidence": confidence, "missing_since": gone})
        rows.append({"label": label, "confidence": confidence, "out_of_set": i % 3 == 0})
    rows.append({"label": None, "confidence": None, "error": "cannot decode image"})
    rows.append({"label": "gamma", "confidence": None})  # a label in no bin
    engine = store.open_db(db)
    model_id = hand_rows(engine, rows)

    counted = [
        r for r in rows
        if r.get("error") is None and r.get("missing_since") is None and not r.get("out_of_set")
    ]  # fmt: skip
    expected_counts: dict = {}
    expected_histograms: dict = {}
    for r in counted:
        expected_counts[r["label"]] = expected_counts.get(r["label"], 0) + 1
        if r["label"] is None:
            continue
        counts = expected_histograms.setdefault(r["label"], [0] * 20)
        c = r["confidence"]
        for i in range(20):  # the definition: i/20 <= c < (i+1)/20, the last bin holds 1.0
            upper = c is not None and (c <= 1.0 if i == 19 else c < (i + 1) / 20)
            if c is not None and c >= i / 20 and upper:
                counts[i] += 1
    assert store.class_counts(engine, model_id) == expected_counts
    assert store.confidence_histograms(engine, model_id, 20) == expected_histograms
    engine.dispose()


def test_images_csv_is_every_row_as_spreadsheet_writer_writes_it(db, tmp_path):
    """images.csv, written from rows streamed in chunks with only the text cells that may
    need it defused, is the file spreadsheet.writer makes of every stored row; a row
    without a stored ROI share has it computed from its map, and no other map is read."""
    import io
    from datetime import datetime, timezone

    from modlabel import codec, spreadsheet
    from modlabel.paths import display_path
    from modlabel.report.files import (
        IMAGE_COLUMNS,
        IMAGE_CSV_COLUMNS,
        image_roi_shares,
        write_images_csv,
    )
    from modlabel.timestamps import iso_utc

    gone = datetime(2026, 12, 1, 3, 4, 5, tzinfo=timezone.utc)
    maps = codec.encode_maps(np.random.default_rng(0).gamma(2.0, 1.0, (3, 6, 6)).astype("f4"))
    hostile = ['=HYPERLINK("http://x",A1)', "+1", "-1", "@SUM(A1)", "\tx", "'=x", "''@y", "ok"]
    rows = []
    for i, text in enumerate(hostile):
        rows.append({
            "path": f"/archive/{text}\n{i}.jpg", "label": text, "confidence": 0.1 * i,
            "runner_up": text, "runner_up_probability": 0.01 * i, "out_of_set": i % 3 == 1,
            "ood_score": float(i), "roi_share": None if i % 2 else 0.25 + i / 100,
            "crm": maps[i % 3], "dicom_modality": text[:16], "dicom_body_part": text,
            "error_kind": None, "missing_since": gone if i == 4 else None,
        })  # fmt: skip
    rows.append({"error": "=cmd|' /C calc'!A0", "error_kind": "corrupt", "crm": None})
    rows.append({"label": "alpha", "confidence": 0.9, "crm": b"not a map", "roi_share": None})
    engine = store.open_db(db)
    model_id = hand_rows(engine, rows)
    model_row = store.pick_model(engine, "hand-000000000000")

    chunks = list(store.iter_image_columns(engine, model_id, IMAGE_COLUMNS, chunk=3))
    assert [len(c) for c in chunks] == [len(IMAGE_COLUMNS) + 1] * 4  # the columns, the maps
    assert [len(column) for c in chunks for column in c] == [3] * 42 + [1] * 14
    legacy_maps = [m for c in chunks for m in c[-1] if m is not None]
    assert len(legacy_maps) == 5  # the rows without a share; the others' maps are not read
    by_column = [[v for c in chunks for v in c[i]] for i in range(len(IMAGE_COLUMNS))]
    as_rows = list(store.iter_image_rows(engine, model_id, IMAGE_COLUMNS))
    for name, values in zip(IMAGE_COLUMNS, by_column, strict=True):
        assert values == [r[name] for r in as_rows], name  # the Python API's values
    assert {type(v) for v in by_column[IMAGE_COLUMNS.index("out_of_set")]} == {bool, type(None)}
    assert by_column[IMAGE_COLUMNS.index("missing_since")].count(gone) == 1

    expected = io.StringIO(newline="")
    writer = spreadsheet.writer(expected)
    writer.writerow(IMAGE_CSV_COLUMNS)
    for r in store.iter_image_rows(engine, model_id, IMAGE_COLUMNS):
        if r["roi_share"] is None and r["crm"] is not None:
            (r["roi_share"],) = image_roi_shares([r["crm"]], model_row.input_size)
        r["path"] = display_path(r["path"])
        r["missing_since"] = iso_utc(r["missing_since"]) if r["missing_since"] else None
        no_review = [None, r["label"], None, None]  # label_reviewed, label_final, by, at
        writer.writerow([r[k] for k in IMAGE_COLUMNS] + no_review)
    out = tmp_path / "images.csv"
    assert write_images_csv(engine, model_row, out, chunk=3) == len(rows)
    assert out.read_bytes().decode("utf-8") == expected.getvalue()
    assert "'=HYPERLINK" in expected.getvalue() and "'''@y" in expected.getvalue()
    engine.dispose()


def test_a_column_is_defused_as_each_of_its_cells():
    """spreadsheet.defuse_column, the fast path of images.csv, gives what defuse gives each
    cell: the column itself where no text can start a formula, else the cells defused."""
    from modlabel import spreadsheet

    columns = [
        ["/archive/a.jpg", None, "", "chest_xray"],  # nothing to defuse: the column as is
        ["ok", "=1+1", None, "'@x", "a\x00=b", "-", "\tx", "x"],
        ["\x00=not a formula", "plain"],  # a NUL before a formula start: checked in vain
        ["text", 0.5, -1.0, None, "+1"],  # not only text: each cell looked at
    ]
    for column in columns:
        assert list(spreadsheet.defuse_column(column)) == [spreadsheet.defuse(v) for v in column]
    assert spreadsheet.defuse_column(columns[0]) is columns[0]
    assert spreadsheet.defuse_column(columns[2]) == columns[2]


def test_a_database_error_while_streaming_images_csv_is_sqlalchemys(tmp_path):
    """The rows of images.csv come from the driver's own cursor; its errors still come as
    SQLAlchemy's DBAPIError, which the CLI turns into one line (a column gone here)."""
    from modlabel.report.files import IMAGE_COLUMNS

    engine = store.open_db(f"sqlite:///{tmp_path / 'gone.db'}")
    model_id = hand_rows(engine, [{"label": "alpha", "confidence": 0.9}])
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE images RENAME COLUMN error_kind TO kind_of_error")
    with pytest.raises(sa.exc.DBAPIError, match="error_kind"):
        list(store.iter_image_columns(engine, model_id, IMAGE_COLUMNS))
    engine.dispose()
