"""``--json`` and ``--quiet`` of ``scan``, ``prune`` and ``report``: one JSON object on
stdout whatever the outcome, valid against ``modlabel.outcome.SCHEMA``; silence but for
errors; the progress bar on a terminal. The real CLI in a subprocess, the toy ONNX
model, SQLite and PostgreSQL."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import struct
import subprocess
import termios
import threading
from pathlib import Path

import jsonschema
import sqlalchemy as sa
from nightly import modlabel_cmd, run_cli, sa_url, start_cli, text, wait_for
from PIL import Image
from toy_onnx import toy_model, write_pngs

from modlabel import store
from modlabel.errors import ExitCode
from modlabel.outcome import SCHEMA
from modlabel.scan.lock import acquire_scan_lock

VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
FAULT_ENV = "MODLABEL_TEST_DECODER_FAULT"


def run_json(*args: object, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``modlabel ARGS --json`` off a terminal; its one JSON object, checked against
    the schema, against the exit code and against the error line on stderr."""
    result = run_cli(*args, "--json", env=env)
    return result, outcome_of(result.stdout, result.stderr, result.returncode)


def outcome_of(stdout: bytes, stderr: bytes, returncode: int) -> dict:
    lines = text(stdout).splitlines()
    assert len(lines) == 1, (text(stdout), text(stderr))  # exactly one object, nothing else
    outcome = json.loads(lines[0])
    VALIDATOR.validate(outcome)
    assert outcome["exit_code"] == returncode, (outcome, text(stderr))
    assert "Traceback" not in text(stderr)
    if outcome["error"] is not None:  # the same line as on stderr
        assert text(stderr).strip().splitlines()[-1] == f"modlabel: error: {outcome['error']}"
    return outcome


def scan_ids(db: str) -> list[tuple[int, str, str | None]]:
    """(id, status, reason) of every ``scans`` row, oldest first."""
    engine = sa.create_engine(sa_url(db))
    try:
        with engine.connect() as conn:
            query = sa.select(store.scans.c.id, store.scans.c.status, store.scans.c.reason)
            return [tuple(r) for r in conn.execute(query.order_by(store.scans.c.id))]
    finally:
        engine.dispose()


def with_password(db: str) -> str:
    """``db`` with a password in it, for a PostgreSQL URL (trust auth ignores it)."""
    if "://" not in db:
        return db
    url = sa.engine.make_url(db).set(password="SECRET-pw")
    return url.render_as_string(hide_password=False)


# -- scan --------------------------------------------------------------------------


def test_scan_json_says_what_it_did_and_a_rescan_has_no_rate(toy_onnx, tmp_path, db_url):
    images = tmp_path / "images"
    write_pngs(images, 6)
    (images / "not_an_image.png").write_bytes(b"no PNG here")
    fault = {FAULT_ENV: "abort:noise_05"}  # its decode worker dies on it
    db = with_password(db_url)

    result, first = run_json("scan", images, "--model", toy_onnx, "--db", db, env=fault)
    assert result.returncode == 0, text(result.stderr)
    assert (first["command"], first["status"], first["error"]) == ("scan", "finished", None)
    counts = first["counts"]
    assert (counts["seen"], counts["labeled"], counts["errors"]) == (7, 5, 2)
    assert counts["errors_by_reason"] == {"not_an_image": 1, "decoder_crashed": 1}
    assert first["images_per_second"] > 0
    assert first["model"].startswith("toy-")
    assert first["started_at"] <= first["finished_at"] and first["seconds"] > 0
    assert "SECRET-pw" not in text(result.stdout)
    if "://" in db:
        assert ":***@" in first["db"]
    [(row_id, status, _)] = scan_ids(db_url)
    assert (first["scan_id"], status) == (row_id, "finished")

    result, again = run_json("scan", images, "--model", toy_onnx, "--db", db)
    counts = again["counts"]
    assert (counts["labeled"], counts["unchanged"], counts["errors"]) == (0, 7, 0)
    assert again["images_per_second"] is None  # nothing labeled: no "0.0 images/s"
    assert again["scan_id"] == first["scan_id"] + 1


def test_scan_json_on_every_failure_names_its_row(toy_onnx, tmp_path, db_url):
    images = tmp_path / "images"
    write_pngs(images, 3)
    assert run_cli("scan", images, "--model", toy_onnx, "--db", db_url).returncode == 0
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x01 not a protobuf of a model")

    _, missing = run_json("scan", tmp_path / "unmounted", "--model", toy_onnx, "--db", db_url)
    _, bad_model = run_json("scan", images, "--model", broken, "--db", db_url)
    for path in images.iterdir():
        path.unlink()  # a share that did not mount: its mount point is empty
    _, vanished = run_json("scan", images, "--model", toy_onnx, "--db", db_url)

    rows = scan_ids(db_url)
    expected = [
        (missing, ExitCode.NO_INPUT, "no_input", "unmounted"),
        (bad_model, ExitCode.MODEL, "model", "broken.onnx"),
        (vanished, ExitCode.VANISHED, "vanished", "is empty"),
    ]
    for outcome, code, reason, needle in expected:
        assert (outcome["status"], outcome["exit_code"]) == ("failed", code)
        assert outcome["exit_reason"] == reason and needle in outcome["error"]
        (row,) = [r for r in rows if r[0] == outcome["scan_id"]]
        assert row[1] == "failed" and needle in row[2]
    assert vanished["model"].startswith("toy-") and bad_model["model"] is None

    engine = store.open_db(sa_url(db_url))
    lock = acquire_scan_lock(engine, store.pick_model(engine).id)
    try:
        _, locked = run_json("scan", images, "--model", toy_onnx, "--db", db_url)
    finally:
        lock.release()
        engine.dispose()
    assert (locked["status"], locked["exit_code"]) == ("failed", ExitCode.LOCKED)
    assert locked["scan_id"] is None  # the run that holds the lock is the one recorded
    assert len(scan_ids(db_url)) == len(rows)


def test_scan_json_on_a_database_error(toy_onnx, tmp_path):
    images = tmp_path / "images"
    write_pngs(images, 2)
    not_a_db = tmp_path / "photo.db"
    not_a_db.write_bytes(b"JFIF" * 1000)
    _, outcome = run_json("scan", images, "--model", toy_onnx, "--db", not_a_db)
    assert (outcome["status"], outcome["exit_code"]) == ("failed", ExitCode.DATABASE)
    assert outcome["scan_id"] is None and "not a SQLite database" in outcome["error"]


def test_scan_json_when_stopped_by_sigterm(toy_onnx, tmp_path):
    images = tmp_path / "images"
    write_pngs(images, 6)
    db = str(tmp_path / "labels.db")
    process = start_cli(
        "scan", images, "--model", toy_onnx, "--db", db, "--decode-timeout", "120", "--json",
        env={FAULT_ENV: "hang:noise_03"},
    )  # fmt: skip

    def running() -> bool:
        try:
            return any(status == "running" for _, status, _ in scan_ids(db))
        except sa.exc.OperationalError:  # the file is being created
            return False

    wait_for(running, timeout=120, what="the scan to begin")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    outcome = outcome_of(out, err, process.returncode)
    assert (outcome["status"], outcome["exit_code"]) == ("interrupted", ExitCode.INTERRUPTED)
    assert outcome["error"] == "interrupted by SIGTERM"
    [(row_id, status, _)] = scan_ids(db)
    assert (outcome["scan_id"], status) == (row_id, "interrupted")


def test_scan_json_counts_the_images_flagged_out_of_set(tmp_path):
    model = toy_model(tmp_path / "ood.onnx", out_of_set=True)
    images = tmp_path / "images"
    write_pngs(images, 4)
    Image.new("RGB", (40, 40), (0, 0, 0)).save(images / "blank.png")  # far out of set
    db = str(tmp_path / "labels.db")
    _, outcome = run_json("scan", images, "--model", model, "--db", db)
    with sqlite3.connect(db) as conn:
        (flagged,) = conn.execute("SELECT count(*) FROM images WHERE out_of_set").fetchone()
    assert outcome["counts"]["out_of_set"] == flagged >= 1
    assert outcome["counts"]["labeled"] == 5


def test_a_usage_error_prints_no_json(toy_onnx, tmp_path):
    result = run_cli("scan", "--model", toy_onnx, "--db", tmp_path / "x.db", "--json")
    assert result.returncode == ExitCode.USAGE and result.stdout == b""
    assert not (tmp_path / "x.db").exists()


# -- prune and report --------------------------------------------------------------


def test_prune_json_and_quiet(toy_onnx, tmp_path, db_url):
    images = tmp_path / "images"
    paths = write_pngs(images, 6)
    assert run_cli("scan", images, "--model", toy_onnx, "--db", db_url).returncode == 0
    for path in paths[:2]:
        path.unlink()
    gone = run_cli("scan", images, "--model", toy_onnx, "--db", db_url, "--allow-missing")
    assert gone.returncode == 0, text(gone.stderr)

    prune = ("prune", "--db", db_url, "--missing-for", "0")
    _, dry = run_json(*prune, "--dry-run")
    assert dry["dry_run"] is True and dry["status"] == "finished"
    assert dry["counts"] == {"prunable": 2, "pruned": 0, "rows": 6}

    _, refused = run_json(*prune, "--max-missing", "1")
    assert (refused["status"], refused["exit_code"]) == ("failed", ExitCode.ERROR)
    assert "nothing was deleted" in refused["error"]
    assert refused["counts"] == {"prunable": 2, "pruned": 0, "rows": 6}

    quiet = run_cli(*prune, "--dry-run", "--quiet")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, b"", b"")
    _, pruned = run_json(*prune, "--quiet")
    assert pruned["dry_run"] is False and pruned["counts"]["pruned"] == 2
    quiet = run_cli(*prune, "--quiet")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, b"", b"")


def test_report_json_lists_its_files_and_quiet_prints_nothing(toy_onnx, tmp_path, db_url):
    images = tmp_path / "images"
    write_pngs(images, 5)
    assert run_cli("scan", images, "--model", toy_onnx, "--db", db_url).returncode == 0
    out = tmp_path / "report"
    _, outcome = run_json("report", "--db", db_url, "--out", out, "--format", "html,rois")
    assert outcome["status"] == "finished"
    assert outcome["counts"]["images"] + outcome["counts"]["out_of_set"] == 5  # every image
    assert outcome["outputs"] and all(Path(p).is_file() for p in outcome["outputs"])
    assert str(out / "report.html") in outcome["outputs"]

    quiet = run_cli("report", "--db", db_url, "--out", tmp_path / "again", "--quiet")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, b"", b"")
    assert (tmp_path / "again" / "report.html").is_file()


def test_report_json_on_a_database_that_does_not_exist(tmp_path):
    db = tmp_path / "none.db"
    _, outcome = run_json("report", "--db", db, "--out", tmp_path / "report")
    assert (outcome["status"], outcome["exit_code"]) == ("failed", ExitCode.DATABASE)
    assert outcome["counts"] == {"images": 0, "classes": 0, "errors": 0, "out_of_set": 0}
    assert not db.exists()


def test_the_schema_is_draft_2020_12_and_refuses_a_contradiction():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    finished_with_an_error = {
        "schema_version": 1, "command": "scan", "status": "finished", "exit_code": 3,
        "exit_reason": "no_input", "error": "cannot scan", "scan_id": None, "db": None,
        "model": None, "seconds": 0.1, "images_per_second": None,
        "counts": {"seen": 0, "labeled": 0, "unchanged": 0, "errors": 0, "errors_by_reason": {},
                   "skipped": 0, "missing": 0, "returned": 0, "kept": 0, "out_of_set": 0},
        "started_at": "2026-12-01T02:15:00.000Z", "finished_at": "2026-12-01T02:15:00.100Z",
        "dry_run": None, "outputs": None,
    }  # fmt: skip
    assert not VALIDATOR.is_valid(finished_with_an_error)
    failed = {**finished_with_an_error, "status": "failed"}
    assert VALIDATOR.is_valid(failed)
    unknown_reason = {**failed, "counts": {**failed["counts"], "errors_by_reason": {"oops": 1}}}
    assert not VALIDATOR.is_valid(unknown_reason)


# -- the progress bar ----------------------------------------------------------------


def run_on_terminal(*args: object) -> tuple[int, str, str]:
    """Run ``modlabel ARGS`` with stderr on a pseudo-terminal (where the bar is drawn);
    returns the exit code, stdout and what the terminal showed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, cols
    process = subprocess.Popen(
        modlabel_cmd(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side closed
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = process.communicate(timeout=180)
    reader.join(timeout=30)
    os.close(master)
    return process.returncode, text(out), text(bytes(shown))


def test_the_bar_shows_a_table_total_and_a_rescan_says_no_rate(toy_onnx, tmp_path):
    images = tmp_path / "images"
    paths = write_pngs(images, 6)
    source = tmp_path / "figures.db"
    with sqlite3.connect(source) as conn:
        conn.execute("CREATE TABLE figures (path TEXT)")
        conn.executemany("INSERT INTO figures VALUES (?)", [(str(p),) for p in paths])
    db = tmp_path / "labels.db"
    scan = ("scan", "--table", "figures", "--table-db", source, "--model", toy_onnx, "--db", db)

    code, out, shown = run_on_terminal(*scan)
    assert code == 0, shown
    assert "6/6" in shown and "labeled 6" in shown  # the total, with the labeled count
    assert "images/s)" in out
    code, out, shown = run_on_terminal(*scan)
    assert code == 0, shown
    assert "0 labeled" in out and "images/s" not in out  # nothing labeled: no rate
    quiet = run_on_terminal(*scan, "--quiet")
    assert quiet == (0, "", "")


def test_off_a_terminal_there_is_no_bar(toy_onnx, tmp_path):
    images = tmp_path / "images"
    write_pngs(images, 3)
    result = run_cli("scan", images, "--model", toy_onnx, "--db", tmp_path / "labels.db")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
