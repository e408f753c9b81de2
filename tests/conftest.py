"""Shared fixtures: a tiny synthetic archive, a really trained and exported tiny
model, and a real PostgreSQL database.

PostgreSQL: the server named by $MODLABEL_TEST_POSTGRES_URL (default: the one on
127.0.0.1:5432, user postgres, database test). Where none answers, a throwaway
server is started from the ``pgserver`` wheel. Either way each test session
gets a database of its own, dropped at the end. PostgreSQL tests never skip: if
no server can be had, they fail.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from toy_onnx import toy_onnx  # noqa: F401

PG_ENV = "MODLABEL_TEST_POSTGRES_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

# Small enough to train and export in seconds on two cores, big enough to learn.
TINY_PER_CLASS = 8
TINY_SIZE = 64
TINY_INPUT = 48


def _reachable(url: str) -> bool:
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):
    """A URL of a fresh, empty PostgreSQL database for this test session."""
    base = os.environ.get(PG_ENV, DEFAULT_PG_URL)
    server = None
    if not _reachable(base):
        import pgserver  # a real PostgreSQL shipped in a wheel

        server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
        base = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    name = f"modlabel_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    if server is not None:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_database(postgres_url: str):
    """A factory of new, empty PostgreSQL databases on the test server: ``f(prefix) -> URL``.

    For tests that need a database of their own (the session's one is shared). They are
    dropped with the server's test databases at the end of the session.
    """
    created: list[str] = []
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")

    def create(prefix: str = "test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return (
            sa.engine.make_url(postgres_url)
            .set(database=name)
            .render_as_string(hide_password=False)
        )

    yield create
    with admin.connect() as conn:
        for name in created:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic archive: 7 classes x TINY_PER_CLASS JPEGs around TINY_SIZE px."""
    from modlabel.synth import render_archive

    out = tmp_path_factory.mktemp("archive")
    render_archive(out, per_class=TINY_PER_CLASS, size=TINY_SIZE, seed=7)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-backbone run really trained (briefly) on ``tiny_archive``."""
    from modlabel.train.fit import train_run

    out = tmp_path_factory.mktemp("run")
    return train_run(
        tiny_archive,
        out,
        backbone="tiny",
        input_size=(TINY_INPUT, TINY_INPUT),
        epochs=2,
        batch_size=8,
        seed=0,
        verbose=False,
    )


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_run`` exported with tf2onnx (parity-checked by the export itself)."""
    from modlabel.export.onnx_export import export_run

    out = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_run(tiny_run, out)
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:
    """A new, empty database of either kind, as ``--db`` takes it: a SQLite file's path, or
    a PostgreSQL URL of a database of its own."""
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    return request.getfixturevalue("postgres_database")("db")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from modlabel.config import sqlite_url

    return sqlite_url(tmp_path / "labels.db")
