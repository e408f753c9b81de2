"""store: the Alembic migrations build exactly the schema the code uses, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from modlabel import store
from modlabel.config import resolve_db_url, sqlite_url


def _schema_diff(url: str) -> list:
    engine = store.open_db(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), store.metadata)
    engine.dispose()
    return diff


def test_migrations_match_the_tables_on_sqlite(tmp_path):
    assert _schema_diff(sqlite_url(tmp_path / "a.db")) == []


def test_migrations_match_the_tables_on_postgresql(postgres_url):
    assert _schema_diff(postgres_url) == []


def test_opening_twice_keeps_data(tmp_path):
    url = sqlite_url(tmp_path / "b.db")
    engine = store.open_db(url)
    model_id = store.ensure_model(
        engine,
        identity="tiny-abc",
        sha256="0" * 64,
        backbone="tiny",
        class_names=["a", "b"],
        input_size=[8, 8],
        activation_shape=[2, 2, 4],
        path="m.onnx",
    )
    engine.dispose()
    again = store.open_db(url)
    assert (
        store.ensure_model(
            again,
            identity="tiny-abc",
            sha256="0" * 64,
            backbone="tiny",
            class_names=["a", "b"],
            input_size=[8, 8],
            activation_shape=[2, 2, 4],
            path="m.onnx",
        )
        == model_id
    )
    assert store.pick_model(again).identity == "tiny-abc"
    assert store.pick_model(again, "tiny").id == model_id


def test_a_whole_identity_picks_its_model_even_when_it_begins_another(tmp_path):
    """pick_model: a prefix must name one model, but a whole identity is its own model's
    even when another identity starts with it; model_row finds a model by its row."""
    import pytest

    from modlabel.errors import DatabaseError

    engine = store.open_db(sqlite_url(tmp_path / "c.db"))
    ids = {
        identity: store.ensure_model(
            engine,
            identity=identity,
            sha256=str(i) * 64,
            backbone="tiny",
            class_names=["a", "b"],
            input_size=[8, 8],
            activation_shape=[2, 2, 4],
            path="m.onnx",
        )  # fmt: skip
        for i, identity in enumerate(["tiny-abc", "tiny-abcd"])
    }
    assert store.pick_model(engine, "tiny-abc").id == ids["tiny-abc"]
    assert store.pick_model(engine, "tiny-abcd").id == ids["tiny-abcd"]
    with pytest.raises(DatabaseError, match="matches 2 models"):
        store.pick_model(engine, "tiny-a")
    assert store.model_row(engine, ids["tiny-abcd"]).identity == "tiny-abcd"
    with pytest.raises(DatabaseError, match="no model with id 999"):
        store.model_row(engine, 999)
    engine.dispose()


def test_db_url_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MODLABEL_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_db_url(None) == sqlite_url(tmp_path / "modlabel.db")
    monkeypatch.setenv("MODLABEL_DB", "postgresql://u@h/db")
    assert resolve_db_url(None) == "postgresql+psycopg://u@h/db"
    assert resolve_db_url("x.db") == sqlite_url(tmp_path / "x.db")


def test_unreachable_database_is_a_clear_error():
    import pytest

    from modlabel.errors import DatabaseError

    with pytest.raises(
        DatabaseError, match="nobody@127.0.0.1:1/none unavailable: connection failed"
    ):
        store.open_db("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(DatabaseError, match="not a database URL"):
        store.open_db("::::")


def _scans_row(engine, **values) -> int:
    model_id = store.ensure_model(
        engine,
        identity="tiny-abc",
        sha256="0" * 64,
        backbone="tiny",
        class_names=["a", "b"],
        input_size=[8, 8],
        activation_shape=[2, 2, 4],
        path="m.onnx",
    )
    scan_id = store.start_scan(engine, model_id, ["/archive"])
    with engine.begin() as conn:
        conn.execute(store.scans.update().where(store.scans.c.id == scan_id).values(**values))
    return scan_id


def _check_lapsed_heartbeat(url: str) -> None:
    from datetime import timedelta

    from modlabel.queries import load_query, run_query

    engine = store.open_db(url)
    lapsed = _scans_row(engine, alive_until=store.utcnow() - timedelta(seconds=5), host="far")
    alive = _scans_row(engine, alive_until=store.utcnow() + timedelta(seconds=60), host="far")
    columns, rows = run_query(engine, load_query("scans"), {})
    status = {r[columns.index("id")]: r[columns.index("status")] for r in rows}
    assert status[lapsed] == "interrupted" and status[alive] == "running"
    shown = {r.id: r.status for r in store.list_scans(engine)}
    assert shown[lapsed] == "interrupted" and shown[alive] == "running"
    engine.dispose()


def test_a_running_scan_whose_heartbeat_lapsed_shows_as_interrupted_on_sqlite(tmp_path):
    _check_lapsed_heartbeat(sqlite_url(tmp_path / "h.db"))


def test_a_running_scan_whose_heartbeat_lapsed_shows_as_interrupted_on_postgresql(postgres_url):
    _check_lapsed_heartbeat(postgres_url)


def test_a_running_scan_of_a_dead_process_on_this_host_shows_as_interrupted(tmp_path):
    import socket
    import subprocess
    import sys

    engine = store.open_db(sqlite_url(tmp_path / "p.db"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    scan_id = _scans_row(engine, host=socket.gethostname(), pid=int(gone.stdout))
    assert {r.id: r.status for r in store.list_scans(engine)}[scan_id] == "interrupted"


def test_version_1_databases_upgrade_with_honest_scan_statuses(tmp_path):
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    url = sqlite_url(tmp_path / "old.db")
    engine = sa.create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(store.MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(sa.text(
            "INSERT INTO models (id, identity, sha256, backbone, class_names, input_size, "
            "activation_shape, path, created_at) VALUES (1, 'm', 'x', 'tiny', '[]', '[]', '[]', "
            "'m.onnx', '2026-01-01')"
        ))  # fmt: skip
        for finished in ("'2026-01-02'", "NULL"):
            conn.execute(sa.text(
                "INSERT INTO scans (model_id, roots, started_at, finished_at, seen, labeled, "
                f"unchanged, errors) VALUES (1, '[]', '2026-01-01', {finished}, 0, 0, 0, 0)"
            ))  # fmt: skip
    engine.dispose()
    engine = store.open_db(url)
    with engine.connect() as conn:
        statuses = conn.execute(sa.select(store.scans.c.status).order_by(store.scans.c.id)).all()
    assert [s for (s,) in statuses] == ["finished", "interrupted"]


def test_a_locked_sqlite_database_is_retried_until_it_is_free(tmp_path):
    import sqlite3
    import threading

    import pytest
    import sqlalchemy as sa

    from modlabel.errors import DatabaseError

    path = tmp_path / "busy.db"
    engine = store.open_db(sqlite_url(path))
    # A writer that gives up at once instead of waiting 60 s, to see the retry at work.
    impatient = sa.create_engine(sqlite_url(path), connect_args={"timeout": 0})
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")

    def write() -> None:
        with impatient.begin() as conn:
            conn.execute(sa.text("UPDATE models SET path = 'x'"))

    with pytest.raises(DatabaseError, match="database unavailable: database is locked"):
        store.DbRetry(0.0, what="database")(write)
    threading.Timer(0.5, lambda: holder.execute("ROLLBACK")).start()
    retry = store.DbRetry(30.0, what="database")
    retry(write)
    assert retry.retries >= 1
    holder.close()
    engine.dispose()


def test_reading_commands_refuse_a_database_that_does_not_exist(tmp_path):
    import pytest

    from modlabel.errors import DatabaseError

    with pytest.raises(DatabaseError, match="no database at .*nope.db: run `modlabel scan` first"):
        store.open_db(sqlite_url(tmp_path / "nope.db"), create=False)
    assert not (tmp_path / "nope.db").exists()


def test_reading_commands_never_write_to_a_sqlite_file(tmp_path):
    """A reading command opens the file as it finds it: a database in DELETE journal mode
    keeps its bytes and its mode, and an empty file stays empty (only an engine that may
    migrate puts a file in WAL mode)."""
    import hashlib
    import sqlite3

    from typer.testing import CliRunner

    from modlabel.cli import app

    db = tmp_path / "delete-mode.db"
    engine = store.open_db(sqlite_url(db))
    store.ensure_model(
        engine, identity="tiny-abc", sha256="0" * 64, backbone="tiny", class_names=["a", "b"],
        input_size=[8, 8], activation_shape=[2, 2, 4], path="m.onnx",
    )  # fmt: skip
    engine.dispose()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    runner = CliRunner()
    for args in (
        ["query", "class-counts", "--db", str(db)],
        ["report", "--db", str(db), "--out", str(tmp_path / "report")],
        ["db", "status", "--db", str(db)],
        ["query", "class-counts", "--db", str(empty)],
    ):
        runner.invoke(app, args)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert empty.stat().st_size == 0
    assert not (tmp_path / "delete-mode.db-wal").exists()
