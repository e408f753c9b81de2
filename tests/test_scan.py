"""scan: labels, CRMs, rescans and broken files, against real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from modlabel import codec, store
from modlabel.decode import load_pixels
from modlabel.errors import InputError
from modlabel.model import OnnxModel
from modlabel.scan import scan_archive


class CountingModel(OnnxModel):
    """The real model, counting how many images it is asked to run."""

    images_run = 0

    def run(self, batch):
        self.images_run += len(batch)
        return super().run(batch)


def _rows(url: str, under: Path | None = None) -> dict[str, dict]:
    engine = store.open_db(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(store.images)).mappings().all()
    engine.dispose()
    return {
        r["path"]: dict(r)
        for r in rows
        if under is None or r["path"].startswith(str(under) + os.sep)
    }


def _archive_copy(tiny_archive: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "archive"
    shutil.copytree(tiny_archive, dst)
    return dst


def brute_force_crm(activations: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Eq. 6-7 by definition: zero each spatial element, re-run the model's own head
    (global average pooling, then the dense layer), sum the squared score changes."""
    h, w, _ = activations.shape
    scores = activations.mean(axis=(0, 1)) @ weights + bias
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            removed = activations.copy()
            removed[i, j, :] = 0.0
            out[i, j] = np.sum((scores - (removed.mean(axis=(0, 1)) @ weights + bias)) ** 2)
    return out


def test_scan_labels_every_image_and_stores_a_crm(tiny_archive, tiny_onnx, tmp_path, sqlite_url):
    archive = _archive_copy(tiny_archive, tmp_path)
    model = OnnxModel(tiny_onnx)
    stats = scan_archive([archive], model, store.open_db(sqlite_url), batch_size=5)
    files = sorted(p for p in archive.rglob("*.jpg"))
    assert stats.seen == len(files) and stats.labeled == len(files) and stats.errors == 0
    rows = _rows(sqlite_url)
    assert sorted(rows) == [str(p) for p in files]
    names = model.info.class_names
    for path, row in rows.items():
        assert row["label"] in names and row["error"] is None
        probs = row["probabilities"]
        assert sorted(probs) == sorted(names)
        assert abs(sum(probs.values()) - 1) < 1e-6
        assert row["confidence"] == pytest.approx(max(probs.values()))
        assert row["label"] == max(probs, key=probs.get)
        stat = os.stat(path)
        assert row["size_bytes"] == stat.st_size and row["mtime"] == stat.st_mtime
        assert len(row["sha256"]) == 64 and row["width"] > 0 and row["height"] > 0
        assert codec.decode_map(row["crm"]).shape == tuple(model.info.activation_shape[:2])


def test_stored_crm_equals_brute_force(tiny_archive, tiny_onnx, tmp_path, sqlite_url):
    archive = _archive_copy(tiny_archive, tmp_path)
    model = OnnxModel(tiny_onnx)
    scan_archive([archive], model, store.open_db(sqlite_url))
    rows = _rows(sqlite_url)
    info = model.info
    for path in sorted(rows)[:: max(1, len(rows) // 6)]:
        pixels, _ = load_pixels(path, info.input_size)
        logits, activations = model.run(model.preprocess(pixels[None]))
        reference = brute_force_crm(
            activations[0].astype(np.float64),
            info.head_weights.astype(np.float64),
            info.head_bias.astype(np.float64),
        )
        from modlabel import maps

        closed = maps.crm(
            activations, info.head_weights, bias=info.head_bias, pooling=info.pooling
        )[0]
        assert np.allclose(closed, reference, rtol=1e-5, atol=1e-5 * reference.max())
        stored = codec.decode_map(rows[path]["crm"])
        tolerance = codec.MAX_RELATIVE_ERROR * reference.max() * (1 + 1e-4)
        assert np.abs(stored - reference).max() <= tolerance
        assert rows[path]["label"] == info.class_names[int(np.argmax(logits[0]))]


def test_rescan_of_an_unchanged_archive_runs_no_inference(
    tiny_archive, tiny_onnx, tmp_path, sqlite_url
):
    archive = _archive_copy(tiny_archive, tmp_path)
    engine = store.open_db(sqlite_url)
    first = CountingModel(tiny_onnx)
    scan_archive([archive], first, engine)
    assert first.images_run == first_count(archive)

    again = CountingModel(tiny_onnx)
    stats = scan_archive([archive], again, engine)
    assert again.images_run == 0 and stats.labeled == 0
    assert stats.unchanged == stats.seen == first_count(archive)

    # A touched file (new mtime, same bytes) is recognized by its hash: no inference.
    touched = sorted(archive.rglob("*.jpg"))[0]
    os.utime(touched, (1_000_000_000, 1_000_000_000))
    third = CountingModel(tiny_onnx)
    stats = scan_archive([archive], third, engine)
    assert third.images_run == 0 and stats.unchanged == stats.seen
    assert _rows(sqlite_url)[str(touched)]["mtime"] == 1_000_000_000

    # A changed file is labeled again, and only it.
    changed = sorted(archive.rglob("*.jpg"))[1]
    shutil.copyfile(sorted(archive.rglob("*.jpg"))[-1], changed)
    fourth = CountingModel(tiny_onnx)
    stats = scan_archive([archive], fourth, engine)
    assert fourth.images_run == 1 and stats.labeled == 1


def first_count(archive: Path) -> int:
    return len(list(archive.rglob("*.jpg")))


def test_broken_images_become_error_rows_and_the_scan_goes_on(
    tiny_archive, tiny_onnx, tmp_path, sqlite_url
):
    archive = _archive_copy(tiny_archive, tmp_path)
    good = first_count(archive)
    bad = archive / "broken"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("not an image at all")
    jpeg = sorted(archive.rglob("*.jpg"))[0].read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (bad / "dangling.jpg").symlink_to(bad / "missing-target.jpg")
    stats = scan_archive([archive], OnnxModel(tiny_onnx), store.open_db(sqlite_url), batch_size=4)
    assert stats.labeled == good and stats.errors == 4
    rows = _rows(sqlite_url)
    errors = {Path(p).name: r["error"] for p, r in rows.items() if r["error"]}
    assert set(errors) == {"empty.jpg", "text.png", "truncated.jpg", "dangling.jpg"}
    assert "not a recognized image format" in errors["text.png"]
    assert all(r["label"] is None and r["crm"] is None for r in rows.values() if r["error"])
    assert sum(1 for r in rows.values() if r["label"]) == good


def test_scan_writes_the_same_labels_to_postgresql_as_to_sqlite(
    tiny_archive, tiny_onnx, tmp_path, sqlite_url, postgres_url
):
    archive = _archive_copy(tiny_archive, tmp_path)
    model = OnnxModel(tiny_onnx)
    lite = scan_archive([archive], model, store.open_db(sqlite_url))
    pg_engine = store.open_db(postgres_url)
    assert pg_engine.dialect.name == "postgresql"
    pg = scan_archive([archive], model, pg_engine, class_min_confidence=0.0)
    assert (pg.labeled, pg.errors) == (lite.labeled, lite.errors)
    lite_rows, pg_rows = _rows(sqlite_url), _rows(postgres_url, under=archive)
    assert sorted(lite_rows) == sorted(pg_rows)
    for path, row in lite_rows.items():
        assert pg_rows[path]["label"] == row["label"]
        assert pg_rows[path]["crm"] == row["crm"]
        assert pg_rows[path]["probabilities"] == pytest.approx(row["probabilities"])
    again = scan_archive([archive], model, pg_engine, class_min_confidence=0.0)
    assert again.labeled == 0 and again.unchanged == again.seen
    with pg_engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.class_maps)).scalar() > 0


class InterruptedModel(OnnxModel):
    """The real model, interrupted (as by Ctrl-C or a killed cron job) on its second batch."""

    batches = 0

    def run(self, batch):
        self.batches += 1
        if self.batches == 2:
            raise KeyboardInterrupt
        return super().run(batch)


def test_an_interrupted_scan_keeps_what_it_finished(tiny_archive, tiny_onnx, tmp_path, sqlite_url):
    archive = _archive_copy(tiny_archive, tmp_path)
    engine = store.open_db(sqlite_url)
    with pytest.raises(KeyboardInterrupt):
        scan_archive([archive], InterruptedModel(tiny_onnx), engine, batch_size=5)
    kept = _rows(sqlite_url)
    assert len(kept) == 5 and all(r["label"] for r in kept.values())
    with engine.connect() as conn:
        finished = conn.execute(sa.select(store.scans.c.finished_at)).scalar()
    assert finished is not None  # the scan row is closed even when interrupted

    rest = CountingModel(tiny_onnx)
    stats = scan_archive([archive], rest, engine, batch_size=5)
    assert rest.images_run == first_count(archive) - 5
    assert stats.unchanged == 5 and len(_rows(sqlite_url)) == first_count(archive)


def test_errors_are_skipped_while_unchanged_and_retried_on_request(
    tiny_archive, tiny_onnx, tmp_path, sqlite_url
):
    archive = _archive_copy(tiny_archive, tmp_path)
    locked = sorted(archive.rglob("*.jpg"))[0]
    good_bytes = locked.read_bytes()
    # A file still being copied when the scan ran: its final size, but only a header yet.
    locked.write_bytes(good_bytes[:100] + bytes(len(good_bytes) - 100))
    stat = os.stat(locked)
    engine = store.open_db(sqlite_url)
    assert scan_archive([archive], CountingModel(tiny_onnx), engine).errors == 1

    # The copy finishes within the file system's mtime resolution: same size, same mtime.
    # Without retry_errors it stays an error; with it, it is labeled.
    locked.write_bytes(good_bytes)
    os.utime(locked, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    rows = _rows(sqlite_url)
    assert rows[str(locked)]["error"]
    again = scan_archive([archive], CountingModel(tiny_onnx), engine)
    assert again.labeled == 0 and again.errors == 0
    retried = CountingModel(tiny_onnx)
    stats = scan_archive([archive], retried, engine, retry_errors=True)
    assert retried.images_run == 1 and stats.labeled == 1 and stats.errors == 0
    assert _rows(sqlite_url)[str(locked)]["label"] is not None


def test_a_path_listed_twice_is_labeled_once(tiny_archive, tiny_onnx, tmp_path, sqlite_url):
    from modlabel.source import FileEntry

    archive = _archive_copy(tiny_archive, tmp_path)
    first = sorted(archive.rglob("*.jpg"))[0]
    stat = os.stat(first)
    entry = FileEntry(str(first), stat.st_size, stat.st_mtime)
    model = CountingModel(tiny_onnx)
    # As a table that lists a figure twice delivers it: adjacent, in one batch.
    stats = scan_archive(["table"], model, store.open_db(sqlite_url), entries=[entry, entry])
    assert model.images_run == 1 and stats.labeled == 1 and len(_rows(sqlite_url)) == 1
    # Overlapping roots are walked once.
    stats = scan_archive(
        [archive, archive / "chest_xray", archive],
        CountingModel(tiny_onnx),
        store.open_db(sqlite_url),
    )
    assert stats.seen == first_count(archive) and stats.errors == 0


def test_a_missing_root_stops_the_scan_before_anything_is_written(
    tiny_archive, tiny_onnx, tmp_path, sqlite_url
):
    # An unmounted archive must not look like an empty one to a nightly job.
    engine = store.open_db(sqlite_url)
    missing = tmp_path / "unmounted"
    with pytest.raises(InputError, match="unmounted.*no such file or directory"):
        scan_archive([tiny_archive, missing], CountingModel(tiny_onnx), engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.images)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(store.scans)).scalar() == 0


def test_a_class_left_without_images_loses_its_average_map(
    tiny_archive, tiny_onnx, tmp_path, sqlite_url
):
    archive = _archive_copy(tiny_archive, tmp_path)
    engine = store.open_db(sqlite_url)
    scan_archive([archive], OnnxModel(tiny_onnx), engine, class_min_confidence=0.0)
    model_id = store.pick_model(engine).id
    before = {r["class_name"] for r in store.load_class_maps(engine, model_id)}
    for path in archive.rglob("*.jpg"):
        path.write_bytes(b"no longer an image")
    scan_archive([archive], OnnxModel(tiny_onnx), engine, class_min_confidence=0.0)
    assert before and store.load_class_maps(engine, model_id) == []
