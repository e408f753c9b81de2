"""The nightly scan against what a real archive and a real night throw at it.

Special files, hostile names, overlapping runs, kill -9, SIGTERM, a PostgreSQL
server stopped mid-scan, bad models and bad databases: each through the real
``modlabel`` command in a subprocess, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import onnx
import pytest
import sqlalchemy as sa
from nightly import (
    ThrowawayPostgres,
    assert_clean_failure,
    count_rows,
    image_rows,
    kill,
    large_archive,
    run_cli,
    sa_url,
    start_cli,
    text,
    wait_for,
)

from modlabel import store
from modlabel.errors import ExitCode
from modlabel.metadata import METADATA_KEY
from modlabel.model import OnnxModel
from modlabel.paths import display_path, from_db, to_db
from modlabel.scan import scan_archive
from modlabel.scan.lock import acquire_scan_lock


def scan_rows(db: str) -> list[store.ScanRow]:
    engine = store.open_db(sa_url(db))
    try:
        return sorted(store.list_scans(engine, limit=100), key=lambda r: r.id)
    finally:
        engine.dispose()


def one_image(tiny_archive: Path) -> bytes:
    return sorted(tiny_archive.rglob("*.jpg"))[0].read_bytes()


# -- the walk ------------------------------------------------------------------


def test_special_files_become_rows_with_a_clear_error_in_bounded_time(
    tiny_archive, tiny_onnx, tmp_path, db_url
):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "good.jpg").write_bytes(one_image(tiny_archive))
    os.mkfifo(archive / "fifo.jpg")  # opening it for reading would block forever
    (archive / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    (archive / "loop.jpg").symlink_to(archive / "loop.jpg")
    (archive / "dangling.png").symlink_to(archive / "gone.png")
    (archive / "huge.png").write_bytes(os.urandom(300_000))
    (archive / "sub").mkdir()
    (archive / "sub" / "again.jpg").write_bytes(one_image(tiny_archive))
    (archive / "sub" / "up").symlink_to(archive)  # a directory loop, walked once
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(archive / "sock.jpg"))
    try:
        result = run_cli(
            "scan", archive, "--model", tiny_onnx, "--db", db_url,
            "--max-file-size", "100K", "--follow-symlinks", timeout=120,
        )  # fmt: skip
    finally:
        sock.close()
    assert result.returncode == 0, text(result.stderr)
    rows = image_rows(db_url)
    errors = {Path(p).name: r["error"] for p, r in rows.items() if r["error"]}
    assert errors == {
        "fifo.jpg": "not a regular file (a FIFO)",
        "zero.jpg": "not a regular file (a character device)",
        "loop.jpg": "symbolic link loop",
        "dangling.png": "broken symbolic link",
        "huge.png": "file too large (300000 bytes; the limit is 102400, see --max-file-size)",
        "sock.jpg": "not a regular file (a socket)",
    }
    labeled = sorted(p for p, r in rows.items() if r["label"] is not None)
    assert labeled == [str(archive / "good.jpg"), str(archive / "sub" / "again.jpg")]
    for name, reason in errors.items():
        assert f"{name}: {reason}" in text(result.stderr)


# -- any file name ---------------------------------------------------------------

HOSTILE_NAMES = [
    b"latin1_\xe9.jpg",  # not UTF-8: a name copied from an older system
    b"new\nline.jpg",
    b"quote\"s 'and' <b>.jpg",
    b"back\\slash\\xe9.jpg",  # looks like an escape, but is not one
    "caf\u00e9 \u80f8\u7247.jpg".encode(),
]


def test_any_file_name_is_labeled_rescanned_unchanged_and_shown_escaped(
    tiny_archive, tiny_onnx, tmp_path, db_url
):
    archive = tmp_path / "archive"
    archive.mkdir()
    data = one_image(tiny_archive)
    for name in HOSTILE_NAMES:
        with open(os.path.join(os.fsencode(archive), name), "wb") as f:
            f.write(data)
    result = run_cli("scan", archive, "--model", tiny_onnx, "--db", db_url,
                     "--class-min-confidence", "0")  # fmt: skip
    assert result.returncode == 0, text(result.stderr)
    rows = image_rows(db_url)
    assert len(rows) == len(HOSTILE_NAMES)
    for name in HOSTILE_NAMES:
        stored = to_db(os.fsencode(archive) + b"/" + name)
        assert rows[stored]["label"] is not None and rows[stored]["error"] is None
        # The stored text leads back to exactly that file.
        assert Path(from_db(stored)).read_bytes() == data
    assert to_db(os.fsencode(archive) + b"/latin1_\xe9.jpg").endswith("latin1_\\xe9.jpg")
    assert to_db(os.fsencode(archive) + b"/back\\slash\\xe9.jpg").endswith(
        "back\\\\slash\\\\xe9.jpg"
    )

    again = run_cli("scan", archive, "--model", tiny_onnx, "--db", db_url,
                    "--class-min-confidence", "0")  # fmt: skip
    assert again.returncode == 0, text(again.stderr)
    last = scan_rows(db_url)[-1]
    assert (last.status, last.labeled, last.unchanged) == ("finished", 0, len(HOSTILE_NAMES))

    # Off a terminal and with no $COLUMNS (as cron runs it; the test runner may set one):
    # no width limit, every path whole.
    table = run_cli("query", "by-label", "--db", db_url, "-p", f"label={rows[stored]['label']}",
                    "-p", "min_confidence=0", env={"COLUMNS": ""})  # fmt: skip
    out = text(table.stdout)
    assert table.returncode == 0, text(table.stderr)
    assert "latin1_\\xe9.jpg" in out and "new\\nline.jpg" in out
    assert len(out.strip().splitlines()) == 2 + len(HOSTILE_NAMES) + 1  # header, rule, rows, count
    as_json = run_cli("query", "by-label", "--db", db_url, "--format", "json",
                      "-p", f"label={rows[stored]['label']}", "-p", "min_confidence=0")  # fmt: skip
    assert {r["path"] for r in json.loads(as_json.stdout)} == set(rows)

    report = run_cli("report", "--db", db_url, "--out", tmp_path / "report", "--examples", "10")
    assert report.returncode == 0, text(report.stderr)
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "latin1_\\xe9.jpg" in html and "new\\nline.jpg" in html
    assert "&lt;b&gt;" in html and "<b>.jpg" not in html


def test_stored_paths_are_exact_for_any_bytes():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        raw = b"/" + bytes(rng.choice(b"ab\\x/\n\"'\xe9\xc3\xa9\xff\x80") for _ in range(12))
        path = os.fsdecode(raw)
        stored = to_db(path)
        stored.encode("utf-8")  # storable on any database
        assert from_db(stored) == path
        assert "\n" not in display_path(stored)


# -- overlapping runs ------------------------------------------------------------


def test_a_second_scan_exits_with_the_lock_code_naming_the_first(tiny_archive, tiny_onnx, db_url):
    assert run_cli("scan", tiny_archive, "--model", tiny_onnx, "--db", db_url).returncode == 0
    engine = store.open_db(sa_url(db_url))
    model_id = store.pick_model(engine).id
    lock = acquire_scan_lock(engine, model_id)
    scan_id = store.start_scan(engine, model_id, ["/elsewhere"])
    try:
        result = run_cli("scan", tiny_archive, "--model", tiny_onnx, "--db", db_url)
        assert_clean_failure(
            result,
            ExitCode.LOCKED,
            f"scan #{scan_id} on host {socket.gethostname()}, pid {os.getpid()}",
            "--wait",
        )
        waiting = start_cli("scan", tiny_archive, "--model", tiny_onnx, "--db", db_url, "--wait")
        os.set_blocking(waiting.stderr.fileno(), False)
        said = b""

        def announced() -> bool:
            nonlocal said
            said += waiting.stderr.read() or b""
            return b"waiting for" in said or waiting.poll() is not None

        wait_for(announced, timeout=120, what="the second scan to wait for the lock")
        assert waiting.poll() is None  # still waiting for the lock
    finally:
        store.finish_scan(engine, scan_id, seen=0, unchanged=0)
        lock.release()
    os.set_blocking(waiting.stderr.fileno(), True)
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, text(said + err)
    assert f"waiting for scan #{scan_id}" in text(said + err)
    engine.dispose()


@pytest.mark.parametrize("existing", [False, True], ids=["new-db", "existing-db"])
@pytest.mark.parametrize("wait", [False, True], ids=["no-wait", "wait"])
def test_two_scans_started_at_once(tiny_archive, tiny_onnx, tmp_path, db_url, existing, wait):
    archive = large_archive(tiny_archive, tmp_path / "archive", 3)
    files = len(list(archive.rglob("*.jpg")))
    if existing:
        store.open_db(sa_url(db_url)).dispose()
    args = ["scan", archive, "--model", tiny_onnx, "--db", db_url, "--batch-size", "4"]
    args += ["--wait"] if wait else []
    scans = [start_cli(*args) for _ in range(2)]
    outcomes = [(p.wait(timeout=300), text(p.communicate()[1])) for p in scans]
    for code, err in outcomes:
        assert "Traceback" not in err, err
        assert code in ((ExitCode.OK,) if wait else (ExitCode.OK, ExitCode.LOCKED)), err
    assert ExitCode.OK in [code for code, _ in outcomes]
    rows = image_rows(db_url)
    assert len(rows) == files and all(r["label"] for r in rows.values())
    runs = scan_rows(db_url)
    assert all(r.status == "finished" for r in runs)
    assert sum(r.labeled for r in runs) == files  # the inference ran once, not twice


def test_four_processes_creating_one_new_database_at_once_all_succeed(db_url):
    import sys

    code = "import sys; from modlabel.store import open_db; open_db(sys.argv[1]).dispose()"
    opening = [
        subprocess.Popen([sys.executable, "-c", code, sa_url(db_url)], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for process in opening:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, text(err)
    engine = store.open_db(sa_url(db_url))
    with engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    engine.dispose()
    newest = sorted(p.name for p in (store.MIGRATIONS / "versions").glob("0*.py"))[-1]
    assert versions == [(newest[:4],)]


# -- killed, stopped, interrupted -----------------------------------------------


def test_kill_9_then_resume_gives_the_rows_of_an_uninterrupted_scan(
    tiny_archive, tiny_onnx, tmp_path, db_url
):
    archive = large_archive(tiny_archive, tmp_path / "archive", 5)
    reference, killed = str(tmp_path / "reference.db"), db_url
    assert run_cli("scan", archive, "--model", tiny_onnx, "--db", reference).returncode == 0

    process = start_cli(
        "scan",
        archive,
        "--model",
        tiny_onnx,
        "--db",
        killed,
        "--batch-size",
        "2",
        "--commit-every",
        "2",
    )
    wait_for(lambda: count_rows(sa_url(killed)) >= 20, what="the first batches")
    kill(process, signal.SIGKILL)
    committed = count_rows(sa_url(killed))
    (dead,) = scan_rows(killed)
    # Shown as interrupted at once (its pid is gone), its counts are what it committed.
    assert dead.status == "interrupted" and dead.labeled + dead.errors == committed
    assert 0 < committed < len(image_rows(reference))

    # The lock died with the process: the next run does not wait.
    result = run_cli("scan", archive, "--model", tiny_onnx, "--db", killed)
    assert result.returncode == 0, text(result.stderr)
    want, got = image_rows(reference), image_rows(killed)
    assert sorted(want) == sorted(got)
    for path, row in want.items():
        assert got[path]["label"] == row["label"]
        assert got[path]["confidence"] == pytest.approx(row["confidence"], abs=1e-5)
    first, second = scan_rows(killed)
    engine = sa.create_engine(sa_url(killed))
    with engine.connect() as conn:
        stored = conn.execute(sa.select(store.scans.c.status).order_by(store.scans.c.id)).all()
    engine.dispose()
    assert [s for (s,) in stored] == ["interrupted", "finished"]
    assert second.labeled == len(want) - committed and second.unchanged == committed


def test_sigterm_stops_the_scan_as_interrupted(tiny_archive, tiny_onnx, tmp_path):
    archive = large_archive(tiny_archive, tmp_path / "archive", 5)
    db = tmp_path / "labels.db"
    process = start_cli(
        "scan",
        archive,
        "--model",
        tiny_onnx,
        "--db",
        db,
        "--batch-size",
        "2",
        "--commit-every",
        "2",
    )
    wait_for(lambda: count_rows(sa_url(str(db))) >= 10, what="the first batches")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == ExitCode.INTERRUPTED, text(err)
    assert text(err).strip() == "modlabel: error: interrupted by SIGTERM"
    (run,) = scan_rows(str(db))
    assert (run.status, run.reason) == ("interrupted", "interrupted by SIGTERM")
    assert run.labeled + run.errors == count_rows(sa_url(str(db)))


def test_an_unexpected_failure_is_recorded_as_failed(tiny_archive, tiny_onnx, sqlite_url):
    def entries():
        from modlabel.source import walk_files

        for i, entry in enumerate(walk_files([tiny_archive])):
            if i == 20:
                raise RuntimeError("the source went away")
            yield entry

    engine = store.open_db(sqlite_url)
    with pytest.raises(RuntimeError):
        scan_archive(["source"], OnnxModel(tiny_onnx), engine, entries=entries(), batch_size=4)
    (run,) = store.list_scans(engine)
    assert run.status == "failed" and run.reason == "RuntimeError: the source went away"
    assert run.labeled == count_rows(sqlite_url)


@pytest.fixture
def own_postgres(tmp_path_factory):
    server = ThrowawayPostgres(tmp_path_factory.mktemp("own-pg"))
    yield server
    server.cleanup()


def test_a_postgresql_restart_within_the_retry_window_is_outlived(
    tiny_archive, tiny_onnx, tmp_path, own_postgres
):
    archive = large_archive(tiny_archive, tmp_path / "archive", 5)
    files = len(list(archive.rglob("*.jpg")))
    url = own_postgres.database("restart")
    process = start_cli("scan", archive, "--model", tiny_onnx, "--db", url, "--batch-size", "2",
                        "--commit-every", "2", "--db-retry", "120")  # fmt: skip
    wait_for(lambda: count_rows(url) >= 20, what="the first batches")
    own_postgres.stop()
    time.sleep(2)
    own_postgres.start()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, text(err)
    assert "retrying for up to 120 s" in text(err) and "Traceback" not in text(err)
    rows = image_rows(url)
    assert len(rows) == files and all(r["label"] for r in rows.values())
    (run,) = scan_rows(url)
    assert run.status == "finished" and run.labeled == files


def test_a_postgresql_gone_for_longer_ends_in_one_line_and_the_next_run_resumes(
    tiny_archive, tiny_onnx, tmp_path, own_postgres
):
    archive = large_archive(tiny_archive, tmp_path / "archive", 5)
    files = len(list(archive.rglob("*.jpg")))
    url = own_postgres.database("gone")
    process = start_cli("scan", archive, "--model", tiny_onnx, "--db", url, "--batch-size", "2",
                        "--commit-every", "2", "--db-retry", "2")  # fmt: skip
    wait_for(lambda: count_rows(url) >= 20, what="the first batches")
    own_postgres.stop()
    _, err = process.communicate(timeout=120)
    own_postgres.start()
    result = subprocess.CompletedProcess([], process.returncode, b"", err)
    assert_clean_failure(result, ExitCode.DATABASE, "unavailable for 2 s")
    assert len(text(err).strip().splitlines()) == 2  # "retrying for up to 2 s", then the error
    committed = count_rows(url)
    (dead,) = scan_rows(url)
    # The database was gone when the scan ended, so the row could not say "failed";
    # its process is gone, so it shows as interrupted.
    assert dead.status == "interrupted" and dead.labeled == committed

    resumed = run_cli("scan", archive, "--model", tiny_onnx, "--db", url)
    assert resumed.returncode == 0, text(resumed.stderr)
    assert len(image_rows(url)) == files
    assert [r.status for r in scan_rows(url)] == ["interrupted", "finished"]
    assert scan_rows(url)[-1].labeled == files - committed


def test_a_database_down_at_the_start_is_waited_for_then_a_clean_error(tiny_archive, tiny_onnx):
    result = run_cli("scan", tiny_archive, "--model", tiny_onnx, "--db-retry", "1",
                     "--db", "postgresql://nobody:SECRET@127.0.0.1:1/none")  # fmt: skip
    last = assert_clean_failure(result, ExitCode.DATABASE, "unavailable for 1 s", "nobody:***@")
    assert "SECRET" not in text(result.stderr)
    assert last


# -- bad models, bad databases, missing roots ----------------------------------


def _with_metadata(tiny_onnx: Path, out: Path, edit) -> Path:
    model = onnx.load(str(tiny_onnx))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = edit(prop.value)
    onnx.save(model, str(out))
    return out


def _drop_key(key: str):
    def edit(value: str) -> str:
        doc = json.loads(value)
        del doc[key]
        return json.dumps(doc)

    return edit


def _three_classes(value: str) -> str:
    doc = json.loads(value)
    doc["class_names"] = doc["class_names"][:3]
    return json.dumps(doc)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda v: "{not json", "modlabel metadata is not JSON"),
        (_drop_key("class_names"), "modlabel metadata lacks 'class_names'"),
        (_three_classes, "metadata names 3 classes but the head's weights have shape"),
    ],
    ids=["not-json", "missing-key", "3-names-for-7-outputs"],
)
def test_bad_model_metadata_exits_with_the_model_code(
    tiny_archive, tiny_onnx, tmp_path, edit, message
):
    bad = _with_metadata(tiny_onnx, tmp_path / "bad.onnx", edit)
    result = run_cli("scan", tiny_archive, "--model", bad, "--db", tmp_path / "x.db")
    assert_clean_failure(result, ExitCode.MODEL, "bad.onnx", message)
    assert not (tmp_path / "x.db").exists()  # nothing was started


def test_a_file_that_is_no_database_exits_with_the_database_code(tiny_archive, tiny_onnx, tmp_path):
    not_db = tmp_path / "photo.jpg"
    not_db.write_bytes(one_image(tiny_archive))
    result = run_cli("scan", tiny_archive, "--model", tiny_onnx, "--db", not_db)
    assert_clean_failure(result, ExitCode.DATABASE, "not a SQLite database file")
    assert not_db.read_bytes() == one_image(tiny_archive)


def test_a_read_only_sqlite_database_exits_with_the_database_code(
    tiny_archive, tiny_onnx, tmp_path
):
    db = tmp_path / "labels.db"
    assert run_cli("scan", tiny_archive, "--model", tiny_onnx, "--db", db).returncode == 0
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    more = tmp_path / "more"
    more.mkdir()
    (more / "new.jpg").write_bytes(one_image(tiny_archive))
    result = run_cli("scan", more, "--model", tiny_onnx, "--db", read_only)
    assert_clean_failure(result, ExitCode.DATABASE, "read-only")
    # Reading a read-only database still works.
    counts = run_cli("query", "class-counts", "--db", read_only)
    assert counts.returncode == 0, text(counts.stderr)


def test_a_read_only_postgresql_database_exits_with_the_database_code(
    tiny_archive, tiny_onnx, postgres_url, postgres_database
):
    url = postgres_database("readonly")
    store.open_db(url).dispose()  # the schema, then no more writes
    name = sa.engine.make_url(url).database
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    admin.dispose()
    result = run_cli("scan", tiny_archive, "--model", tiny_onnx, "--db", url)
    assert_clean_failure(result, ExitCode.DATABASE, "read-only")


def test_a_missing_root_exits_with_the_input_code(tiny_onnx, tmp_path):
    result = run_cli("scan", tmp_path / "no" / "such" / "dir", "--model", tiny_onnx,
                     "--db", tmp_path / "x.db")  # fmt: skip
    assert_clean_failure(result, ExitCode.NO_INPUT, "no/such/dir", "no such file or directory")


# -- secrets ---------------------------------------------------------------------


def test_no_password_in_the_report_the_logs_or_the_scans_table(
    tiny_archive, tiny_onnx, tmp_path, postgres_database
):
    db_url = postgres_database("secret")
    url = sa.engine.make_url(db_url).set(password="SECRET-pw")  # trust auth ignores it
    secret_url = url.render_as_string(hide_password=False)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    scan = run_cli("scan", tiny_archive, broken, "--model", tiny_onnx, "--db", secret_url)
    assert scan.returncode == 0, text(scan.stderr)
    report = run_cli("report", "--db", secret_url, "--out", tmp_path / "report")
    query = run_cli("query", "scans", "--db", secret_url, "--format", "json")
    outputs = [scan.stdout, scan.stderr, report.stdout, report.stderr, query.stdout, query.stderr]
    assert all(b"SECRET" not in out for out in outputs)
    assert "SECRET" not in (tmp_path / "report" / "report.html").read_text()
    assert "***" in (tmp_path / "report" / "report.html").read_text()
    engine = sa.create_engine(secret_url)
    with engine.connect() as conn:
        for table in ("scans", "models", "images"):
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                assert "SECRET" not in repr(row)
    engine.dispose()
