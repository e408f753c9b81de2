"""Query: the named retrieval queries of ``sql/``, run against the store.

Each ``sql/NAME.sql`` file is one statement with ``:name`` parameters; its
leading ``--`` comment lines are its description. ``modlabel query NAME`` runs
it; the same files can be pasted into psql or sqlite3 as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .errors import ModlabelError

_PARAM = re.compile(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class NamedQuery:
    name: str
    sql: str
    description: str

    @property
    def body(self) -> str:
        """The statement without its comment lines (which may mention :parameters)."""
        lines = [line for line in self.sql.splitlines() if not line.lstrip().startswith("--")]
        return "\n".join(lines).strip().rstrip(";")

    @property
    def parameters(self) -> list[str]:
        return sorted(set(_PARAM.findall(self.body)))


def query_dir() -> Path:
    """Where the named queries live: ``sql/`` of a checkout, or ``modlabel/sql`` of a wheel."""
    checkout = Path(__file__).resolve().parent.parent / "sql"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("modlabel") / "sql"))


def list_queries() -> list[NamedQuery]:
    return [load_query(p.stem) for p in sorted(query_dir().glob("*.sql"))]


def load_query(name: str) -> NamedQuery:
    """The named query ``name`` of ``sql/`` (a name, never a path: see ``load_sql_file``)."""
    path = query_dir() / f"{name}.sql"
    if "/" in name or "\\" in name or not path.is_file():
        known = ", ".join(p.stem for p in sorted(query_dir().glob("*.sql")))
        raise ModlabelError(
            f"no query named {name!r}; known: {known} (a file of your own: --sql-file PATH)"
        )
    return _parse(path)


def load_sql_file(path: str | Path) -> NamedQuery:
    """A query of the user's own, from a .sql file; it runs read-only like the named ones."""
    path = Path(path)
    try:
        return _parse(path)
    except OSError as exc:
        raise ModlabelError(f"{path}: cannot read the query: {exc.strerror or exc}") from None


def _parse(path: Path) -> NamedQuery:
    sql = path.read_text(encoding="utf-8")
    comments = [line.lstrip("- ").strip() for line in sql.splitlines() if line.startswith("--")]
    description = " ".join(c for c in comments if not c.startswith("Parameters:"))
    return NamedQuery(path.stem, sql, description)


# Parameters that name a model take an identity or a prefix of one, and default to the newest.
MODEL_PARAMETERS = ("model", "model_a", "model_b")


@dataclass
class QueryResult:
    """An open query: its column names and its rows, streamed from the database."""

    columns: list[str]
    rows: Iterator[tuple]


@contextmanager
def open_query(
    engine: Engine, query: NamedQuery, params: dict[str, Any], *, chunk: int = 1000
) -> Iterator[QueryResult]:
    """Run ``query`` with ``params`` and stream its rows, ``chunk`` at a time.

    Memory stays flat whatever the number of rows: the rows come from a
    server-side cursor on PostgreSQL and are stepped through on SQLite. A
    ``model`` parameter left out means the newest model; a prefix of an
    identity is enough.
    """
    params = _with_models(engine, query, dict(params))
    missing = [p for p in query.parameters if p not in params]
    if missing:
        raise ModlabelError(
            f"query {query.name!r} needs parameters: "
            + ", ".join(f"--param {m}=..." for m in missing)
        )
    statement = sa.text(query.body)
    bound = {k: v for k, v in params.items() if k in query.parameters}
    try:
        with engine.connect() as conn, _read_only(conn):
            result = conn.execution_options(stream_results=True, yield_per=chunk).execute(
                statement, bound
            )
            yield QueryResult(list(result.keys()), _rows(result, query.name))
    except sa.exc.DBAPIError as exc:
        raise ModlabelError(f"query {query.name!r} failed: {_why(exc)}") from None


def _why(exc: sa.exc.DBAPIError) -> str:
    from .store import describe_db_error

    text = describe_db_error(exc)
    if "not authorized" in text:
        return f"{text} (queries only read: ATTACH and PRAGMAs that write are refused)"
    return text


@contextmanager
def _read_only(conn: sa.Connection) -> Iterator[None]:
    """Queries read, never write: a read-only transaction on PostgreSQL; on SQLite
    ``query_only`` and an authorizer that refuses everything but reading (ATTACH, which
    would create a file, and PRAGMAs that write, ``query_only = OFF`` among them)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")
        driver = conn.connection.driver_connection
        driver.set_authorizer(_sqlite_reads_only)
        try:
            yield
        finally:
            driver.set_authorizer(None)
            conn.rollback()
            conn.exec_driver_sql("PRAGMA query_only = OFF")
            conn.commit()
        return
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    try:
        yield
    finally:
        conn.rollback()


# PRAGMAs that only read, whatever their argument (a table's name). Any other PRAGMA
# with an argument sets something (``query_only = OFF``, ``writable_schema = ON``).
_READING_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
     "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check",
     "compile_options", "function_list", "pragma_list", "collation_list", "module_list",
     "database_list", "page_count", "freelist_count", "data_version"}
)  # fmt: skip
# PRAGMAs that act even without an argument; every other one only reads its value then.
_ACTING_PRAGMAS = frozenset(
    {"optimize", "shrink_memory", "wal_checkpoint", "incremental_vacuum", "wal_autocheckpoint"}
)


def _sqlite_reads_only(action: int, arg1: str | None, arg2: str | None, *_rest: object) -> int:
    """SQLite's authorizer callback for user queries: reading is allowed, nothing else."""
    import sqlite3

    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                  sqlite3.SQLITE_RECURSIVE, sqlite3.SQLITE_TRANSACTION):  # fmt: skip
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and arg1 in ("sqlite_master", "sqlite_temp_master"):
        return sqlite3.SQLITE_OK  # SQLite asks this while it reads the schema for a query
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if name in _READING_PRAGMAS or (arg2 is None and name not in _ACTING_PRAGMAS):
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _rows(result: sa.CursorResult, name: str) -> Iterator[tuple]:
    try:
        for row in result:
            yield tuple(row)
    except sa.exc.DBAPIError as exc:
        raise ModlabelError(f"query {name!r} failed: {_why(exc)}") from None


def _with_models(engine: Engine, query: NamedQuery, params: dict[str, Any]) -> dict[str, Any]:
    from .store import pick_model

    for name in MODEL_PARAMETERS:
        if name not in query.parameters:
            continue
        if name in params:
            params[name] = pick_model(engine, str(params[name])).identity
        elif name == "model":
            params[name] = pick_model(engine).identity
    return params


def run_query(
    engine: Engine, query: NamedQuery, params: dict[str, Any]
) -> tuple[list[str], list[tuple]]:
    """Run ``query`` with ``params``; returns (column names, all rows) for small results."""
    with open_query(engine, query, params) as result:
        return result.columns, list(result.rows)
