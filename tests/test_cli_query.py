"""query: named queries and files of the user's own run read-only, on SQLite and PostgreSQL;
rows stream out."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from modlabel import store
from modlabel.cli import _format_rows, app


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(params=["sqlite", "postgresql"])
def scanned(request, tiny_archive, tiny_onnx, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'labels.db'}"
    else:
        url = request.getfixturevalue("postgres_database")("query")
    assert invoke("scan", tiny_archive, "--model", tiny_onnx, "--db", url).exit_code == 0
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
