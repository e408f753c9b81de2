"""Every scan that reaches a database leaves a ``scans`` row, a failed one included: a
root that is not there (exit 3), a model that cannot be loaded (exit 4), a root that
looks vanished (exit 8), each with its reason; and none creates a database to say so.
The real CLI in a subprocess (as cron runs it), the toy ONNX model, SQLite and
PostgreSQL."""

from __future__ import annotations

import json

from nightly import assert_clean_failure, run_cli, sa_url, text
from toy_onnx import write_pngs

from modlabel import store
from modlabel.errors import ExitCode


def scans(db: str) -> list[store.ScanRow]:
    """Every ``scans`` row, oldest first."""
    engine = store.open_db(sa_url(db), migrate=False, create=False)
    try:
        return sorted(store.list_scans(engine, limit=100), key=lambda r: r.id)
    finally:
        engine.dispose()


def test_a_missing_root_leaves_a_failed_row_that_query_scans_shows(toy_onnx, tmp_path, db_url):
    images = tmp_path / "images"
    write_pngs(images, 3)
    assert run_cli("scan", images, "--model", toy_onnx, "--db", db_url).returncode == 0
    unmounted = tmp_path / "mnt" / "unmounted_share"

    result = run_cli("scan", unmounted, "--model", toy_onnx, "--db", db_url)
    assert_clean_failure(result, ExitCode.NO_INPUT, "unmounted_share", "no such file")
    finished, failed = scans(db_url)
    assert finished.status == "finished"
    assert failed.status == "failed" and "unmounted_share" in failed.reason
    assert failed.model_id == finished.model_id  # the model's file is the one scanned before
    assert failed.roots == [str(unmounted)] and failed.finished_at >= failed.started_at

    shown = run_cli("query", "scans", "--db", db_url, "--format", "json")
    assert shown.returncode == 0, text(shown.stderr)
    latest = json.loads(shown.stdout)[0]
    assert (latest["id"], latest["status"]) == (failed.id, "failed")
    assert "unmounted_share" in latest["reason"]


def test_a_model_that_cannot_be_loaded_leaves_a_failed_row(toy_onnx, tmp_path, db_url):
    images = tmp_path / "images"
    write_pngs(images, 3)
    assert run_cli("scan", images, "--model", toy_onnx, "--db", db_url).returncode == 0
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(toy_onnx.read_bytes()[:200])  # a copy cut short

    result = run_cli("scan", images, "--model", broken, "--db", db_url)
    assert_clean_failure(result, ExitCode.MODEL, "broken.onnx")
    _, failed = scans(db_url)
    assert failed.status == "failed" and "broken.onnx" in failed.reason
    assert failed.model_id is None  # no model row for a file that never loaded
    assert failed.roots == [str(images)]


def test_a_vanished_root_leaves_a_failed_row_with_the_reason(toy_onnx, tmp_path, db_url):
    images = tmp_path / "images"
    write_pngs(images, 4)
    assert run_cli("scan", images, "--model", toy_onnx, "--db", db_url).returncode == 0
    for path in images.iterdir():
        path.unlink()

    result = run_cli("scan", images, "--model", toy_onnx, "--db", db_url)
    assert_clean_failure(result, ExitCode.VANISHED, "is empty", "nothing was marked missing")
    _, failed = scans(db_url)
    assert failed.status == "failed" and "is empty" in failed.reason
    assert (failed.seen, failed.missing) == (0, 0)


def test_a_failed_start_creates_no_database(toy_onnx, tmp_path):
    images = tmp_path / "images"
    write_pngs(images, 2)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    db = tmp_path / "labels.db"

    missing = run_cli("scan", tmp_path / "nowhere", "--model", toy_onnx, "--db", db)
    assert_clean_failure(missing, ExitCode.NO_INPUT, "nowhere")
    bad_model = run_cli("scan", images, "--model", broken, "--db", db)
    assert_clean_failure(bad_model, ExitCode.MODEL, "broken.onnx")
    assert not db.exists() and not list(tmp_path.glob("labels.db*"))
