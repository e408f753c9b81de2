"""Connecting to the store: engines for SQLite and PostgreSQL, retries of what a retry can
outlive, one-line descriptions of what it cannot, and stops that cancel what waits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import codec, redaction, stopping
from ..config import DEFAULT_DB_RETRY_SECONDS as DEFAULT_RETRY_SECONDS
from ..errors import DatabaseError, Interrupted, one_line
from .schema import check_schema, upgrade_schema

log = logging.getLogger("modlabel.store")


def open_db(
    url: str,
    *,
    migrate: bool = True,
    retry_seconds: float = 0.0,
    create: bool = True,
    check: bool = True,
    pool_size: int | None = None,
    statement_snapshots: bool = False,
) -> Engine:
    """An engine for ``url``: with ``migrate``, the schema upgraded to the newest version
    (the commands that write: scan, prune, ``db upgrade``); without it, a schema that is
    not this modlabel's is refused with one line (``check_schema``: the commands that only
    read never write the schema).

    PostgreSQL connections are pre-pinged, so a connection that died with a server
    restart is replaced instead of failing the next statement (a SQLite file's
    connection cannot die so: it is not pinged). ``retry_seconds``: how
    long a database that cannot be reached yet is waited for (0: fail at once);
    a database that does not exist, a failed password and a denied permission are
    not waited for. ``create=False`` (for commands that only read) refuses a SQLite
    file that does not exist instead of creating an empty one. ``check=False`` skips the
    schema's check (``modlabel db status``, which reports it). ``pool_size``: keep this
    many connections open (a server whose threads each hold one: a connection beyond the
    pool is opened and closed again for every request, with a cold page cache), and no
    more than POOL_OVERFLOW more for a while (none where the threads are as many as the
    connections); None: SQLAlchemy's default pool (5, and 10 more for a while).
    ``statement_snapshots`` (SQLite, an engine that only reads): no BEGIN is sent, so each
    statement reads a snapshot of its own; a server's page saves the BEGIN and the
    rollback of every connection it uses (a fifth of its CPU, measured).
    """
    if not create:
        _require_sqlite_file(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": not url.startswith("sqlite")}
    if pool_size is not None:
        kwargs.update(pool_size=pool_size, max_overflow=POOL_OVERFLOW)
    if url.startswith("sqlite"):
        # A short wait on a lock; longer waits are DbRetry's, which a stop ends.
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_SECONDS}
    elif url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_SECONDS}
    try:
        engine = sa.create_engine(url, **kwargs)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise DatabaseError(f"not a database URL: {safe_url(url)} ({one_line(exc)})") from None
    except ModuleNotFoundError as exc:
        raise DatabaseError(f"no driver for {safe_url(url)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        # Only an engine that may create or migrate the file puts it in WAL mode, which is
        # kept in the file: the others open it as they find it, and a reading command
        # never writes to it (an empty file stays empty; a DELETE-mode file stays so).
        sa.event.listen(engine, "connect", _sqlite_connect if migrate else _sqlite_connect_as_is)
        if not statement_snapshots:
            sa.event.listen(engine, "begin", _sqlite_begin)
    else:
        sa.event.listen(engine, "begin", _postgres_begin)
    _guard_statements(engine, whole_checkout=not migrate)
    retry = DbRetry(retry_seconds, what=f"database {safe_url(url)}")
    retry(_ping, engine)
    if migrate:
        retry(upgrade_schema, engine)
    elif check:
        retry(check_schema, engine)
    return engine


# A SQLite writer waits this long for another's lock before DbRetry takes over; a
# PostgreSQL connection attempt gives up after PG_CONNECT_SECONDS.
SQLITE_BUSY_SECONDS = 1.0
# Connections an engine with a pool_size may open beyond it, for a while.
POOL_OVERFLOW = 10
PG_CONNECT_SECONDS = 5
# After a stop was asked for, a statement may take this long (the scan records its end).
STOPPING_STATEMENT_MS = 1500


def sqlite_file(url: str | sa.engine.URL) -> Path | None:
    """The file of a SQLite URL (a plain path or a ``file:...?mode=ro`` URI filename);
    None for other databases, in-memory SQLite, or a URL that does not parse."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return None
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if database.startswith("file:"):
        database = database[len("file:") :].split("?", 1)[0]
    return Path(database)


def _require_sqlite_file(url: str) -> None:
    database = sqlite_file(url)  # a URL that does not parse: open_db says what is wrong
    if database is not None and not database.exists():
        raise DatabaseError(f"no database at {database}: run `modlabel scan` first, or check --db")


def _ping(engine: Engine) -> None:
    with engine.connect():
        pass


def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.execute("PRAGMA journal_mode=WAL")
    _sqlite_connect_as_is(dbapi_connection, record)


def _sqlite_connect_as_is(dbapi_connection: Any, _record: Any) -> None:
    # modlabel emits BEGIN itself (see _sqlite_begin), as SQLAlchemy's pysqlite docs advise,
    # so that DDL is transactional and a writer can take the lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # In WAL mode NORMAL syncs at checkpoints, not at every commit (SQLite's advice for WAL):
    # the database stays consistent on a power cut, which may lose the last batches; a
    # scan's counts are committed with its rows, and the next scan labels those files again.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # For SQL users (sql/similar.sql): the migration defines the same on PostgreSQL.
    dbapi_connection.create_function(
        "modlabel_cosine_distance", 2, cosine_distance_of_blobs, deterministic=True
    )


def cosine_distance_of_blobs(a: bytes | None, b: bytes | None) -> float | None:
    """1 - cos of two stored embeddings (``images.embedding``); NULL for a NULL or
    embeddings of different lengths (of different models), as in SQL."""
    if a is None or b is None or len(a) != len(b):
        return None
    try:
        x, y = codec.embedding_codes([a, b]).astype(np.float64)
    except codec.MapCodecError:
        return None
    norms = float(np.linalg.norm(x) * np.linalg.norm(y))
    return None if norms == 0.0 else 1.0 - float(x @ y) / norms


def _sqlite_begin(conn: sa.Connection) -> None:
    if stopping.requested():  # on the way out: a lock is not waited for long
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {STOPPING_STATEMENT_MS}")
    immediate = conn.get_execution_options().get("sqlite_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _postgres_begin(conn: sa.Connection) -> None:
    if stopping.requested():  # on the way out: no statement waits long on a lock
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STOPPING_STATEMENT_MS}")


def _guard_statements(engine: Engine, *, whole_checkout: bool = False) -> None:
    """A stop cancels what the database is doing for this process: a statement that
    waits on another's lock ends at once (PostgreSQL's cancel request, SQLite's
    interrupt) instead of holding the scan past its stop.

    ``whole_checkout`` (the commands that only read): a connection is guarded for as
    long as it is checked out, not only while a statement executes, so that a query
    that streams its rows (fetch after fetch, outside any execute) ends on a stop too."""
    running: dict[int, Any] = {}  # id of the DBAPI connection -> the connection
    lock = threading.Lock()

    def cancel_all() -> None:
        with lock:
            connections = list(running.values())
        for dbapi in connections:
            with contextlib.suppress(Exception):
                if hasattr(dbapi, "cancel_safe"):
                    dbapi.cancel_safe(timeout=1.0)
                elif hasattr(dbapi, "cancel"):
                    dbapi.cancel()
                else:
                    dbapi.interrupt()  # sqlite3

    def add(dbapi: Any) -> None:
        dbapi = getattr(dbapi, "driver_connection", dbapi)
        with lock:
            running[id(dbapi)] = dbapi

    def remove(dbapi: Any) -> None:
        dbapi = getattr(dbapi, "driver_connection", dbapi)
        with lock:
            running.pop(id(dbapi), None)

    if whole_checkout:
        sa.event.listen(engine, "checkout", lambda dbapi, _record, _proxy: add(dbapi))
        sa.event.listen(engine, "checkin", lambda dbapi, _record: remove(dbapi))
    else:

        def before(conn, _cursor, _statement, _params, _context, _many) -> None:
            add(conn.connection.driver_connection)

        def after(conn, *_args) -> None:
            remove(conn.connection.driver_connection)

        def failed(context) -> None:
            if context.connection is not None:
                with contextlib.suppress(Exception):
                    after(context.connection)

        sa.event.listen(engine, "before_cursor_execute", before)
        sa.event.listen(engine, "after_cursor_execute", after)
        sa.event.listen(engine, "handle_error", failed)
    engine._modlabel_stop_hook = stopping.on_stop(cancel_all)  # noqa: SLF001
    engine._modlabel_stop_hook.__enter__()  # noqa: SLF001 - for the engine's life


def safe_url(url: str | sa.engine.URL) -> str:
    """The URL without its password or secret parameters, for every message, log line and
    record (``redaction.safe_url``)."""
    return redaction.safe_url(url)


# -- transient errors --------------------------------------------------------

_T = TypeVar("_T")

# PostgreSQL error classes worth waiting out: connection exceptions (08), the server
# shutting down or starting (57P01-57P03), too many connections, serialization and
# deadlock failures.
_TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", "40001", "40P01")


def is_transient(exc: BaseException) -> bool:
    """True for database errors that a retry can outlive (a restart, a lock, a failover)."""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig
    state = getattr(exc, "sqlstate", None)
    module = type(exc).__module__
    if module.startswith("psycopg"):
        import psycopg

        if isinstance(exc, psycopg.OperationalError) and state is None:
            # No answer at all (refused, reset, closed) is waited out; a server that
            # answered "no" (no such database, a wrong password) is not.
            return not _refused(str(exc))
        return state is not None and state.startswith(_TRANSIENT_SQLSTATES)
    if module == "sqlite3":
        message = str(exc).lower()
        return "database is locked" in message or "database table is locked" in message
    return False


# What a PostgreSQL server says when it answered but refused: no retry can mend these.
_REFUSALS = (
    "does not exist",
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "permission denied",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "too many connections for role",
    "database is not accepting connections",
)


def _refused(message: str) -> bool:
    return any(part in message for part in _REFUSALS)


def describe_db_error(exc: BaseException) -> str:
    """One line on what went wrong, without the SQL or a password."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    text = redaction.redact(one_line(str(orig))) or type(orig).__name__
    if "readonly database" in text or "read-only transaction" in text:
        return f"it is read-only ({text})"
    if "file is not a database" in text:
        return "not a SQLite database file (file is not a database)"
    if "malformed" in text or "disk image" in text:
        return f"the database file is damaged ({text}): restore it from a backup"
    return text


class DbRetry:
    """Call a database function, retrying transient errors with backoff for ``seconds``.

    The budget starts at the first failure and is renewed by every success.
    Past it, or on an error that no retry can mend, ``DatabaseError`` is
    raised with one line saying what failed. ``on_recovered`` runs after a
    call succeeds that needed retries (to take a lost lock back, say).
    """

    def __init__(
        self,
        seconds: float = DEFAULT_RETRY_SECONDS,
        *,
        what: str = "database",
        on_recovered: Callable[[], None] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.seconds = max(0.0, seconds)
        self.what = what
        self.on_recovered = on_recovered
        self.sleep = sleep or stopping.sleep  # a signal ends the wait
        self.retries = 0

    def __call__(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        deadline: float | None = None
        delay = 0.25
        while True:
            try:
                result = fn(*args, **kwargs)
            except sa.exc.DBAPIError as exc:
                reason = describe_db_error(exc)
                if stopping.requested():  # a statement cut short by the stop, or failing
                    raise Interrupted(stopping.reason()) from None
                if not is_transient(exc):
                    raise DatabaseError(f"{self.what}: {reason}") from None
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.seconds
                    if self.seconds > 0:
                        log.warning(
                            "%s unavailable (%s); retrying for up to %.0f s",
                            self.what,
                            reason,
                            self.seconds,
                        )
                if now >= deadline:
                    waited = f" for {self.seconds:.0f} s" if self.seconds > 0 else ""
                    raise DatabaseError(f"{self.what} unavailable{waited}: {reason}") from None
                self.retries += 1
                self.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 5.0)
                continue
            if deadline is not None:
                log.warning("%s is back", self.what)
                if self.on_recovered is not None:
                    self.on_recovered()
            return result
