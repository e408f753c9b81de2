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

    with pytest.raises(DatabaseError, match="nobody@127.0.0.1:1/none unavailable: connection failed"):
        store.open_db("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(DatabaseError, match="not a database URL"):
        store.open_db("::::")
