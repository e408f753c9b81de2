"""Query: the named retrieval queries of ``sql/``, run against the store.

Each ``sql/NAME.sql`` file is one statement with ``:name`` parameters; its
leading ``--`` comment lines are its description, whose first sentence is its
purpose, and a line ``Parameters:`` declares its parameters, each with what it
means and its default (``none.`` for a query without)::

    -- Parameters: label (a class name), min_confidence (0..1; default 0),
    --   model (identity or a prefix of one; default: the newest).

``modlabel query -h`` lists the queries from these headers alone, so the help
cannot drift from the files. ``modlabel query NAME`` runs one; the same files
can be pasted into psql or sqlite3 as they are.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .errors import ModlabelError, UsageError
from .timestamps import as_utc, sqlite_timestamp

_PARAM = re.compile(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)")
# One declared parameter: its name, then what it means in parentheses (optional).
_DECLARED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?", re.DOTALL)
_DEFAULT = re.compile(r"default\b:?\s*(.*)", re.DOTALL | re.IGNORECASE)
# A parameter the query reads as a number: CAST(:name AS REAL) (or INTEGER, ...).
_NUMERIC = re.compile(
    r"CAST\s*\(\s*:([A-Za-z_][A-Za-z0-9_]*)\s+AS\s+"
    r"(REAL|INTEGER|INT|BIGINT|FLOAT|DOUBLE PRECISION|NUMERIC)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Parameter:
    """A parameter of a query as its header declares it.

    ``default``: the value used when ``--param`` leaves it out, as the header gives it
    (``0``); None when it must be given. A model parameter's default is a phrase (``the
    newest``): ``open_query`` resolves it (``MODEL_PARAMETERS``)."""

    name: str
    meaning: str = ""
    default: str | None = None

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class NamedQuery:
    name: str
    sql: str
    description: str
    declared: tuple[Parameter, ...] = ()

    @cached_property
    def body(self) -> str:
        """The statement without its comment lines (which may mention :parameters)."""
        lines = [line for line in self.sql.splitlines() if not line.lstrip().startswith("--")]
        return "\n".join(lines).strip().rstrip(";")

    @cached_property
    def parameters(self) -> list[str]:
        """The names of the parameters the statement uses, sorted."""
        return sorted(set(_PARAM.findall(self.body)))

    @cached_property
    def parameter_specs(self) -> list[Parameter]:
        """The statement's parameters in the header's order, with their meaning and default;
        one the header does not declare (a file of the user's own) is required."""
        used = set(self.parameters)
        specs = [p for p in self.declared if p.name in used]
        named = {p.name for p in specs}
        return specs + [Parameter(n) for n in self.parameters if n not in named]

    @property
    def purpose(self) -> str:
        """The description's first sentence, without its parenthetical remarks: one line."""
        return first_sentence(self.description)


def first_sentence(text: str) -> str:
    plain = _without_parentheses(" ".join(text.split()))
    end = re.search(r"[.!?](?=\s|$)", plain)
    return plain[: end.end()] if end else plain


def _without_parentheses(text: str) -> str:
    out: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(char)
    return re.sub(r"\s+([,.;]|:(?=\s))", r"\1", re.sub(r"\s{2,}", " ", "".join(out))).strip()


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
    comments = []  # the header: the comment lines before the statement
    for line in sql.splitlines():
        if line.startswith("--"):
            comments.append(line.lstrip("- ").strip())
        elif line.strip():
            break
    starts = [i for i, c in enumerate(comments) if c.startswith("Parameters:")]
    if not starts:
        return NamedQuery(path.stem, sql, " ".join(comments))
    # The declaration runs from its line to the end of the header.
    at = starts[0]
    declaration = " ".join(comments[at:]).removeprefix("Parameters:")
    return NamedQuery(
        path.stem, sql, " ".join(comments[:at]), tuple(_parse_parameters(declaration))
    )


def _parse_parameters(text: str) -> list[Parameter]:
    """``label (a class name), min_confidence (0..1; default 0)`` as Parameters."""
    text = text.strip().rstrip(".").strip()
    if text.lower() in ("", "none"):
        return []
    declared = []
    for item in _split_outside_parentheses(text, ","):
        match = _DECLARED.fullmatch(item.strip())
        if match is None:
            continue
        meaning, default = [], None
        for part in _split_outside_parentheses(match.group(2) or "", ";"):
            found = _DEFAULT.fullmatch(part.strip())
            if found:
                default = found.group(1).strip()
            elif part.strip():
                meaning.append(part.strip())
        declared.append(Parameter(match.group(1), "; ".join(meaning), default))
    return declared


def _split_outside_parentheses(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


# Parameters that name a model take an identity or a prefix of one, and default to the newest.
MODEL_PARAMETERS = ("model", "model_a", "model_b")


@dataclass
class QueryResult:
    """An open query: its column names and its rows, streamed from the database."""

    columns: list[str]
    rows: Iterator[tuple]


def check_parameters(query: NamedQuery, params: dict[str, Any]) -> None:
    """Refuse, as a usage error, a parameter the query does not have (a typo would
    otherwise be ignored, and its default used) and a required one left out."""
    known = [p.name for p in query.parameter_specs]
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            maybe = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(
                f"--param {key}: unknown parameter of {query.name}{maybe}; known: "
                + (", ".join(known) or "none")
            )
    missing = [
        p.name
        for p in query.parameter_specs
        if p.required and p.name not in params and p.name != "model"  # model: the newest
    ]
    if missing:
        raise UsageError(
            f"query {query.name!r} needs parameters: "
            + ", ".join(f"--param {m}=..." for m in missing)
        )
    # A number the query casts: SQLite would read "abc" as 0 and "0.9x" as 0.9, silently.
    for name, kind in _NUMERIC.findall(query.body):
        value = params.get(name)
        if isinstance(value, str) and not _is_number(
            value, integer=kind.upper().startswith(("INT", "BIGINT"))
        ):
            raise UsageError(f"--param {name}={value!r}: {query.name} reads it as a number")


def _is_number(text: str, *, integer: bool) -> bool:
    try:
        number = float(text)
    except ValueError:
        return False
    return math.isfinite(number) and (not integer or number.is_integer())


def with_defaults(query: NamedQuery, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` and the declared defaults of the parameters they leave out (a model
    parameter's default is resolved by ``open_query``)."""
    defaults = {
        p.name: p.default
        for p in query.parameter_specs
        if p.default is not None and p.name not in MODEL_PARAMETERS
    }
    return {**defaults, **params}


@contextmanager
def open_query(
    engine: Engine, query: NamedQuery, params: dict[str, Any], *, chunk: int = 1000
) -> Iterator[QueryResult]:
    """Run ``query`` with ``params`` and stream its rows, ``chunk`` at a time.

    Memory stays flat whatever the number of rows: the rows come from a
    server-side cursor on PostgreSQL and are stepped through on SQLite. A
    parameter left out takes its declared default; a ``model`` parameter left
    out means the newest model, and a prefix of an identity is enough. An
    unknown parameter, or a required one left out, is a ``UsageError``.

    Timestamps come back as aware datetimes in UTC on both databases (SQLite
    gives them as text: ``timestamps.sqlite_timestamp``).
    """
    check_parameters(query, params)
    params = _with_models(engine, query, with_defaults(query, dict(params)))
    statement = sa.text(query.body)
    bound = {k: v for k, v in params.items() if k in query.parameters}
    try:
        with engine.connect() as conn, _read_only(conn):
            result = conn.execution_options(stream_results=True, yield_per=chunk).execute(
                statement, bound
            )
            rows = _rows(result, query.name, sqlite=conn.dialect.name == "sqlite")
            yield QueryResult(list(result.keys()), rows)
    except sa.exc.DBAPIError as exc:
        raise ModlabelError(f"query {query.name!r} failed: {_why(exc)}") from None


def label_hint(engine: Engine, query: NamedQuery, params: dict[str, Any]) -> str | None:
    """A hint when the ``label`` parameter is no class of the model (nor of any model,
    for a query without a ``model`` parameter): such a query runs, and finds nothing.
    None when the label is known or the query takes none."""
    from .store import list_models, pick_model

    label = params.get("label")
    if "label" not in query.parameters or label is None:
        return None
    if "model" in query.parameters:
        known = list(pick_model(engine, params.get("model")).class_names)
    else:
        known = sorted({c for m in list_models(engine) for c in m.class_names})
    if not known or str(label) in known:
        return None
    close = difflib.get_close_matches(str(label), known, n=1)
    maybe = f" (did you mean {close[0]!r}?)" if close else ""
    return f"no image has label {label!r}{maybe}; known labels: {', '.join(known)}"


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


def _rows(result: sa.CursorResult, name: str, *, sqlite: bool) -> Iterator[tuple]:
    try:
        for row in result:
            yield tuple(_value(v, sqlite) for v in row)
    except sa.exc.DBAPIError as exc:
        raise ModlabelError(f"query {name!r} failed: {_why(exc)}") from None


def _value(value: Any, sqlite: bool) -> Any:
    """A cell as the Python API gives it: a timestamp is an aware datetime in UTC."""
    if isinstance(value, datetime):
        return as_utc(value)
    if sqlite and isinstance(value, str):
        moment = sqlite_timestamp(value)
        if moment is not None:
            return moment
    return value


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
