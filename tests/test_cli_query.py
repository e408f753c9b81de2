"""query: named queries and files of the user's own run read-only, on SQLite and PostgreSQL;
rows stream out."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess

import pytest
import sqlalchemy as sa
from nightly import assert_clean_failure, image_rows, modlabel_cmd, start_cli, text
from toy_onnx import write_pngs
from typer.testing import CliRunner

from modlabel import store
from modlabel.cli import _format_rows, app
from modlabel.cli.query import _text_width
from modlabel.errors import ExitCode
from modlabel.queries import list_queries


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(params=["sqlite", "postgresql"])
def scanned(request, tiny_archive, toy_onnx, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'labels.db'}"
    else:
        url = request.getfixturevalue("postgres_database")("query")
    assert invoke("scan", tiny_archive, "--model", toy_onnx, "--db", url).exit_code == 0
    return url


def count_images(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT COUNT(*) FROM images")).scalar()
    engine.dispose()
    return int(n)


def test_a_query_that_writes_is_refused_and_changes_nothing(scanned, tmp_path):
    before = count_images(scanned)
    wipe = tmp_path / "wipe.sql"
    wipe.write_text("-- Not a retrieval query.\nDELETE FROM images")
    result = invoke("query", "--sql-file", wipe, "--db", scanned)
    # SQLite refuses the write (query_only); PostgreSQL already refuses a DELETE in the
    # server-side cursor the rows stream from, inside a read-only transaction.
    assert result.exit_code == 1 and "query 'wipe' failed" in result.output
    assert count_images(scanned) == before
    probe = tmp_path / "probe.sql"
    probe.write_text(
        "SELECT query_only AS read_only FROM pragma_query_only()"
        if scanned.startswith("sqlite")
        else "SELECT current_setting('transaction_read_only') AS read_only"
    )
    result = invoke("query", "--sql-file", probe, "--db", scanned, "--format", "csv")
    assert result.output.splitlines() == [
        "read_only",
        "1" if scanned.startswith("sqlite") else "on",
    ]
    # The connection goes back to the pool writable: a scan after a query still writes.
    engine = store.open_db(scanned)
    assert store.list_scans(engine)[0].status == "finished"
    store.start_scan(engine, store.pick_model(engine).id, ["/x"])


def test_a_users_select_file_runs_with_sql_file(scanned, tmp_path):
    mine = tmp_path / "mine.sql"
    mine.write_text("SELECT COUNT(*) AS n FROM images WHERE label IS NOT NULL")
    result = invoke("query", "--sql-file", mine, "--db", scanned, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["n", str(count_images(scanned))]


def test_a_path_is_not_taken_as_a_query_name(scanned, tmp_path):
    mine = tmp_path / "mine.sql"
    mine.write_text("SELECT 1")
    result = invoke("query", str(mine), "--db", scanned)
    assert result.exit_code == 1 and "no query named" in result.output
    assert "--sql-file" in result.output


def test_rows_stream_out_before_the_query_ends():
    pulled = 0

    def rows():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield (i, f"/a/{i}.jpg")

    for fmt, lines_before in (("csv", 3), ("json", 3), ("table", 3)):
        pulled = 0
        out = _format_rows(["n", "path"], rows(), fmt)
        for _ in range(lines_before):
            next(out)
        assert pulled <= 200 + 2, (fmt, pulled)  # the table sizes itself on 200 rows


# -- the help, parameters and labels (issue 18) ------------------------------------------------

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def toy_scanned(db_url, toy_onnx, tmp_path) -> str:
    """``db_url`` (SQLite or PostgreSQL) after a scan of six noise PNGs with the toy model,
    no TensorFlow needed; the archive is ``tmp_path / "archive"``."""
    write_pngs(tmp_path / "archive", 6)
    result = invoke("scan", tmp_path / "archive", "--model", toy_onnx, "--db", db_url)
    assert result.exit_code == 0, result.output
    return db_url


def cli(*args: object, env: dict | None = None, columns: int | None = None):
    """The real command in a subprocess, off a terminal; $COLUMNS only when given."""
    base = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        base["COLUMNS"] = str(columns)
    return subprocess.run(
        modlabel_cmd(*args), capture_output=True, env={**base, **(env or {})}, timeout=120
    )


def as_json(result) -> list[dict]:
    assert result.returncode == 0, text(result.stderr)
    return json.loads(text(result.stdout))


def test_each_named_query_declares_exactly_the_parameters_it_uses():
    # The help is made from these declarations: a parameter the statement uses but the
    # header does not declare (or the reverse) would make it lie.
    for q in list_queries():
        assert sorted(p.name for p in q.declared) == q.parameters, q.name
        assert q.purpose.endswith(".") and "\n" not in q.purpose, q.name


def test_help_lists_every_query_with_its_purpose_and_parameters():
    result = CliRunner().invoke(app, ["query", "-h"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for q in list_queries():
        (at,) = [i for i, line in enumerate(lines) if line.split()[:1] == [q.name]]
        assert q.purpose in lines[at], (q.name, lines[at])
        for p in q.parameter_specs:
            shown = f"{p.name} (required)" if p.required else f"{p.name}={p.default}"
            assert shown in lines[at + 1], (q.name, shown, lines[at + 1])
    assert "label (required), min_confidence=0, model=the newest" in result.output
    assert "threshold=0.5" in result.output
    listed = CliRunner().invoke(app, ["query"], env={"COLUMNS": "400"})
    assert all(q.purpose in listed.output for q in list_queries())


def test_a_parameter_left_out_takes_its_declared_default(toy_scanned):
    low = as_json(cli("query", "low-confidence", "--db", toy_scanned, "--format", "json"))
    assert low and all(r["confidence"] < 0.5 for r in low)  # the toy is never sure
    every = as_json(cli("query", "by-label", "-p", "label=a", "--db", toy_scanned,
                        "--format", "json"))  # fmt: skip
    stored = [r for r in image_rows(toy_scanned).values() if r["label"] == "a"]
    assert len(every) == len(stored) > 0  # min_confidence=0: all of them


def test_an_unknown_parameter_is_a_usage_error_naming_the_known_ones(toy_scanned, tmp_path):
    result = cli("query", "by-label", "-p", "lable=a", "--db", toy_scanned)
    last = assert_clean_failure(result, ExitCode.USAGE, "--param lable: unknown parameter of "
                                "by-label", "known: label, min_confidence, model",
                                "query -h)")  # fmt: skip
    assert "did you mean label?" in last
    mine = tmp_path / "mine.sql"
    mine.write_text("SELECT COUNT(*) AS n FROM images WHERE width > :min_width")
    result = cli("query", "--sql-file", mine, "-p", "width=3", "--db", toy_scanned)
    assert_clean_failure(result, ExitCode.USAGE, "--param width: unknown parameter of mine",
                         "known: min_width")  # fmt: skip
    result = cli("query", "by-label", "--db", toy_scanned)
    assert_clean_failure(result, ExitCode.USAGE, "--param label=...")


def test_a_number_the_query_casts_must_be_one(toy_scanned, tmp_path):
    """A parameter read through CAST(:p AS REAL/INTEGER) that is no number is a usage
    error (SQLite would read 'abc' as 0 and '0.9x' as 0.9, and answer silently)."""
    for value in ("abc", "0.9x", "", "nan"):
        result = cli("query", "by-label", "-p", "label=a", "-p", f"min_confidence={value}",
                     "--db", toy_scanned)  # fmt: skip
        assert_clean_failure(result, ExitCode.USAGE, f"--param min_confidence={value!r}: "
                             "by-label reads it as a number")  # fmt: skip
    result = cli("query", "similar", "-p", "path=/x.png", "-p", "limit=2.5", "--db", toy_scanned)
    assert_clean_failure(result, ExitCode.USAGE, "--param limit='2.5'")
    ok = cli("query", "by-label", "-p", "label=a", "-p", "min_confidence=1e-3", "--db",
             toy_scanned, "--format", "json")  # fmt: skip
    assert ok.returncode == 0, text(ok.stderr)


def test_an_unknown_label_runs_and_names_the_known_labels(toy_scanned):
    result = cli("query", "by-label", "-p", "label=bb", "--db", toy_scanned)
    assert result.returncode == 0, text(result.stderr)
    assert text(result.stdout).rstrip().endswith("(0 rows)")
    assert text(result.stderr).strip() == (
        "modlabel: no image has label 'bb' (did you mean 'b'?); known labels: a, b, c"
    )
    known = cli("query", "by-label", "-p", "label=c", "--db", toy_scanned)
    assert known.returncode == 0 and text(known.stderr) == ""


def test_the_table_rounds_floats_and_fits_the_terminal_csv_and_json_keep_them(toy_scanned):
    args = ("query", "by-label", "-p", "label=a", "--db", toy_scanned)
    rows = as_json(cli(*args, "--format", "json"))
    csv_out = text(cli(*args, "--format", "csv").stdout)
    wide = text(cli(*args, columns=400).stdout)
    for row in rows:
        assert repr(row["confidence"]) in csv_out  # every digit
        assert f"{row['confidence']:#.4g}" in wide and repr(row["confidence"]) not in wide
        assert row["path"] in wide
    for columns in (60, 100):
        narrow = text(cli(*args, columns=columns).stdout).splitlines()
        assert max(len(line) for line in narrow) <= columns, narrow
        assert "\u2026" in narrow[0]  # the headers, shortened
        assert all(line.split()[0].endswith(".png") for line in narrow[2:-1])  # the file name
    piped = text(cli(*args).stdout)  # no terminal, no $COLUMNS: nothing is cut
    assert piped == wide


def test_a_wide_table_is_cut_to_the_width_whatever_its_cells_hold():
    rows = [("/archive/" + "\u6f22\u5b57" * 30 + ".jpg", 0.123456789, "x" * 300)] * 3
    for width in (20, 45, 80):
        lines = "".join(_format_rows(["path", "score", "note"], iter(rows), "table",
                                     width=width)).splitlines()  # fmt: skip
        assert all(_text_width(line) <= width for line in lines), (width, lines)
        assert lines[-1] == "(3 rows)"
    (line,) = [x for x in "".join(_format_rows(["score"], iter([(1234567.8,)]), "table"))
               .splitlines() if x.strip().isdigit()]  # fmt: skip
    assert line.strip() == "1234568"


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_a_reader_that_closes_the_pipe_early_ends_the_query_quietly(toy_scanned, tmp_path, fmt):
    many = tmp_path / "many.sql"  # far more rows than a pipe holds
    many.write_text("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                    "WHERE i < 200000) SELECT i, 'row ' || i AS label FROM n")  # fmt: skip
    for _ in range(4):  # it was 1 run in 3, then every run: exit 1
        proc = start_cli("query", "--sql-file", many, "--db", toy_scanned, "--format", fmt)
        assert proc.stdout.readline()
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
        assert (proc.returncode, text(err)) == (0, "")
    # The very pipeline a user types, with a named query.
    shell = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$@" | head -1', "sh",
         *modlabel_cmd("query", "scans", "--db", toy_scanned)],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert (shell.returncode, text(shell.stderr)) == (0, "")


def test_timestamps_are_iso_8601_utc_with_z_on_both_databases(toy_scanned, tmp_path):
    from modlabel.timestamps import iso_utc

    engine = store.open_db(toy_scanned if "://" in toy_scanned else f"sqlite:///{toy_scanned}")
    started = iso_utc(store.list_scans(engine)[0].started_at)
    labeled = {p: iso_utc(r["labeled_at"]) for p, r in image_rows(toy_scanned).items()}
    engine.dispose()
    away = {"PGTZ": "America/New_York"}  # a PostgreSQL session in another zone: still UTC
    scans = as_json(cli("query", "scans", "--db", toy_scanned, "--format", "json", env=away))
    assert scans[0]["started_at"] == started and ISO_UTC.fullmatch(scans[0]["finished_at"])
    for fmt in ("csv", "table"):
        out = text(cli("query", "scans", "--db", toy_scanned, "--format", fmt, env=away).stdout)
        assert started in out and "+00:00" not in out
    by_label = cli("query", "by-label", "-p", "label=a", "--db", toy_scanned,
                   "--format", "json", env=away)  # fmt: skip
    for row in as_json(by_label):
        assert row["labeled_at"] == labeled[row["path"]]

    gone = sorted((tmp_path / "archive").iterdir())[0]
    gone.unlink()
    assert invoke("scan", tmp_path / "archive", "--model", toy_scanned_model(toy_scanned),
                  "--db", toy_scanned).exit_code == 0  # fmt: skip
    (missing,) = as_json(cli("query", "missing", "--db", toy_scanned, "--format", "json"))
    assert missing["path"] == str(gone) and ISO_UTC.fullmatch(missing["missing_since"])


def toy_scanned_model(db: str) -> str:
    from modlabel.store import list_models

    engine = store.open_db(db if "://" in db else f"sqlite:///{db}")
    try:
        return list_models(engine)[-1].path
    finally:
        engine.dispose()


def test_query_scans_shows_the_roots_and_what_was_skipped_and_missing(toy_scanned, tmp_path):
    archive = tmp_path / "archive"
    (archive / "notes.txt").write_text("not an image")
    sorted(archive.glob("*.png"))[0].unlink()
    model = toy_scanned_model(toy_scanned)
    assert invoke("scan", archive, "--model", model, "--db", toy_scanned).exit_code == 0
    last, first = as_json(cli("query", "scans", "--db", toy_scanned, "--format", "json"))[:2]
    assert json.loads(last["roots"]) == json.loads(first["roots"]) == [str(archive)]
    assert (first["seen"], first["skipped"], first["missing"]) == (6, 0, 0)
    assert (last["skipped"], last["missing"], last["unchanged"]) == (1, 1, 5)
    table = text(cli("query", "scans", "--db", toy_scanned).stdout).splitlines()
    assert table[0].split()[7:14] == ["roots", "seen", "labeled", "unchanged", "errors",
                                      "skipped", "missing"]  # fmt: skip
    assert f'["{archive}"]' in table[2]


def test_iso_utc_and_the_sqlite_form():
    from datetime import datetime, timedelta, timezone

    from modlabel.timestamps import iso_utc, sqlite_timestamp

    naive = datetime(2026, 12, 1, 8, 5, 37, 980448)
    assert iso_utc(naive) == "2026-12-01T08:05:37.980Z"  # cut, not rounded
    eastern = timezone(timedelta(hours=-5))
    assert iso_utc(datetime(2026, 12, 1, 3, 5, 37, tzinfo=eastern)) == "2026-12-01T08:05:37.000Z"
    assert sqlite_timestamp("2026-12-01 08:05:37.980448") == naive.replace(tzinfo=timezone.utc)
    assert sqlite_timestamp("2026-12-01 08:05:37") == datetime(2026, 12, 1, 8, 5, 37,
                                                               tzinfo=timezone.utc)  # fmt: skip
    for other in ("2026-12-01", "/archive/2026-12-01 08:05:37.jpg", "2026-13-01 08:05:37"):
        assert sqlite_timestamp(other) is None
