"""Rows as the driver's cursor gives them, for the reads that stream many (images.csv,
the similar-image search's blocks): below every other room of the store but the schema."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import sqlalchemy as sa


def driver_chunks(conn: sa.Connection, query: sa.Select, size: int) -> Iterator[list[tuple]]:
    """The rows of ``query``, ``size`` at a time, as the driver's cursor gives them
    (tuples, no SQLAlchemy rows: a third of the cost a row), in ``conn``'s transaction
    (the caller's ``begin``: BEGIN on SQLite, one snapshot for every chunk).

    SQLAlchemy's rows and result processing cost seconds on a million rows of images.csv,
    a fifth of writing them out. On PostgreSQL a server-side cursor in the binary
    protocol: memory stays flat, and no number (nor bytea, 4x for the search's blocks) is
    formatted as text by the server and parsed back by the client. The driver's errors are
    raised as SQLAlchemy's (``DBAPIError``), as ``conn.execute`` raises them."""
    compiled = query.compile(dialect=conn.dialect)
    params = compiled.construct_params()
    args = tuple(params[name] for name in compiled.positiontup) if compiled.positional else params
    driver = conn.connection.driver_connection
    if conn.dialect.name == "postgresql":
        cursor = driver.cursor(name=f"modlabel_rows_{uuid.uuid4().hex}", binary=True)
    else:
        cursor = driver.cursor()
    errors = conn.dialect.loaded_dbapi.Error
    try:
        cursor.execute(compiled.string, args)
        while rows := cursor.fetchmany(size):
            yield rows
    except errors as exc:
        raise sa.exc.DBAPIError.instance(compiled.string, args, exc, errors) from None
    finally:
        cursor.close()
