"""Store: labels, probabilities and compressed CRMs in SQLite or PostgreSQL.

The tables are SQLAlchemy Core tables; the schema is created and upgraded by
Alembic migrations (``modlabel/migrations``), so an archive's database can be
carried across modlabel versions. Any SQLAlchemy URL works; the default is a
SQLite file.

Tables:

* ``models``: one row per ONNX file (by content hash) that labeled anything.
* ``images``: one row per (model, path): stat and content hash, label,
  confidence, every class probability, the compressed CRM, or the error that
  kept the file from being labeled.
* ``class_maps``: the class-level average CRM (paper Eq. 8) per (model, class).
* ``scans``: one row per scan run, for auditing nightly jobs: its status
  (running, finished, failed, interrupted), host and pid, and the counts of
  what it committed.

Paths are stored as text through ``modlabel.paths`` (any byte string a file
system allows). Every write is an upsert (``INSERT ... ON CONFLICT``), so
scans that overlap never fail on each other's rows, and a batch lands whole
or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import redaction
from .config import DEFAULT_DB_RETRY_SECONDS as DEFAULT_RETRY_SECONDS
from .errors import DatabaseError, Interrupted, one_line

log = logging.getLogger(__name__)

metadata = sa.MetaData()

models = sa.Table(
    "models",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("identity", sa.String(80), nullable=False, unique=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("backbone", sa.String(40), nullable=False),
    sa.Column("class_names", sa.JSON, nullable=False),
    sa.Column("input_size", sa.JSON, nullable=False),
    sa.Column("activation_shape", sa.JSON, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # The confidence an image needs to count in its class's average (Eq. 8); NULL until
    # the running class sums are built (modlabel.aggregate).
    sa.Column("class_min_confidence", sa.Float),
    # The temperature the scan divides the logits by before the softmax (1: uncalibrated).
    sa.Column("temperature", sa.Float),
)

# Paths compare byte-wise on both databases (SQLite's default; collation "C" on
# PostgreSQL), the order in which ``source.walk_files`` yields them.
PATH_TYPE = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")

images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
    sa.Column("path", PATH_TYPE, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("mtime", sa.Float, nullable=False),
    sa.Column("sha256", sa.String(64)),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("label", sa.String(80)),
    sa.Column("confidence", sa.Float),
    sa.Column("probabilities", sa.JSON),
    sa.Column("crm", sa.LargeBinary),
    sa.Column("error", sa.Text),
    sa.Column("labeled_at", sa.DateTime(timezone=True), nullable=False),
    # When the file was found gone; the row leaves counts, averages and queries.
    sa.Column("missing_since", sa.DateTime(timezone=True)),
    # The figure's id in the user's table (scan --table --id-column), to join back.
    sa.Column("source_id", sa.Text),
    # A DICOM file's header: Modality, BodyPartExamined, SOPInstanceUID (NULL otherwise).
    sa.Column("dicom_modality", sa.String(16)),
    sa.Column("dicom_body_part", sa.String(64)),
    sa.Column("dicom_sop_uid", sa.String(64)),
    # The out-of-set score and whether it passed the model's threshold (an image of none
    # of the classes): flagged images keep their label but leave queries and averages.
    sa.Column("ood_score", sa.Float),
    sa.Column("out_of_set", sa.Boolean),
    sa.UniqueConstraint("model_id", "path", name="uq_images_model_path"),
)
sa.Index("ix_images_model_label_confidence", images.c.model_id, images.c.label, images.c.confidence)
sa.Index("ix_images_model_labeled_at", images.c.model_id, images.c.labeled_at)
sa.Index("ix_images_sha256", images.c.sha256)
sa.Index(
    "ix_images_errors",
    images.c.model_id,
    images.c.path,
    postgresql_where=images.c.error.is_not(None),
    sqlite_where=images.c.error.is_not(None),
)
sa.Index(
    "ix_images_missing",
    images.c.model_id,
    images.c.missing_since,
    postgresql_where=images.c.missing_since.is_not(None),
    sqlite_where=images.c.missing_since.is_not(None),
)
sa.Index("ix_images_model_source_id", images.c.model_id, images.c.source_id)
sa.Index(
    "ix_images_out_of_set",
    images.c.model_id,
    images.c.path,
    postgresql_where=images.c.out_of_set,
    sqlite_where=images.c.out_of_set,
)

class_maps = sa.Table(
    "class_maps",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), primary_key=True),
    sa.Column("class_name", sa.String(80), primary_key=True),
    sa.Column("image_count", sa.Integer, nullable=False),
    sa.Column("crm", sa.LargeBinary, nullable=False),
    sa.Column("roi_box", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # The running sum of the counted images' normalized maps, float64 (modlabel.aggregate).
    sa.Column("map_sum", sa.LargeBinary),
)

scans = sa.Table(
    "scans",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # NULL for a run that ended before it knew its model (stopped, or refused at the start).
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=True),
    sa.Column("roots", sa.JSON, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("seen", sa.Integer, nullable=False, default=0),
    sa.Column("labeled", sa.Integer, nullable=False, default=0),
    sa.Column("unchanged", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Integer, nullable=False, default=0),
    sa.Column("skipped", sa.Integer, nullable=False, default=0),
    sa.Column("missing", sa.Integer, nullable=False, default=0),
    sa.Column("status", sa.String(16), nullable=False, default="running"),
    sa.Column("reason", sa.Text),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("alive_until", sa.DateTime(timezone=True)),
)
sa.Index("ix_scans_model_status", scans.c.model_id, scans.c.status)

# Scan statuses. A "running" row whose heartbeat (``alive_until``) has lapsed, or whose
# process is gone, is shown as interrupted.
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
# A running scan renews ``alive_until`` every HEARTBEAT_SECONDS, to now + ALIVE_SECONDS.
HEARTBEAT_SECONDS = 30.0
ALIVE_SECONDS = 120.0

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def open_db(
    url: str,
    *,
    migrate: bool = True,
    retry_seconds: float = 0.0,
    create: bool = True,
    check: bool = True,
) -> Engine:
    """An engine for ``url``: with ``migrate``, the schema upgraded to the newest version
    (the commands that write: scan, prune, ``db upgrade``); without it, a schema that is
    not this modlabel's is refused with one line (``check_schema``: the commands that only
    read never write the schema).

    Connections are pre-pinged, so a connection that died with a server restart
    is replaced instead of failing the next statement. ``retry_seconds``: how
    long a database that cannot be reached yet is waited for (0: fail at once);
    a database that does not exist, a failed password and a denied permission are
    not waited for. ``create=False`` (for commands that only read) refuses a SQLite
    file that does not exist instead of creating an empty one. ``check=False`` skips the
    schema's check (``modlabel db status``, which reports it).
    """
    if not create:
        _require_sqlite_file(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
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
        sa.event.listen(engine, "connect", _sqlite_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
    else:
        sa.event.listen(engine, "begin", _postgres_begin)
    _guard_statements(engine)
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


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # modlabel emits BEGIN itself (see _sqlite_begin), as SQLAlchemy's pysqlite docs advise,
    # so that DDL is transactional and a writer can take the lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL syncs at checkpoints, not at every commit (SQLite's advice for WAL):
    # the database stays consistent on a power cut, which may lose the last batches; a
    # scan's counts are committed with its rows, and the next scan labels those files again.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    from . import stopping

    if stopping.requested():  # on the way out: a lock is not waited for long
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {STOPPING_STATEMENT_MS}")
    immediate = conn.get_execution_options().get("sqlite_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _postgres_begin(conn: sa.Connection) -> None:
    from . import stopping

    if stopping.requested():  # on the way out: no statement waits long on a lock
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STOPPING_STATEMENT_MS}")


def _guard_statements(engine: Engine) -> None:
    """A stop cancels what the database is doing for this process: a statement that
    waits on another's lock ends at once (PostgreSQL's cancel request, SQLite's
    interrupt) instead of holding the scan past its stop."""
    from . import stopping

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

    def before(conn, _cursor, _statement, _params, _context, _many) -> None:
        dbapi = conn.connection.driver_connection
        with lock:
            running[id(dbapi)] = dbapi

    def after(conn, *_args) -> None:
        with lock:
            running.pop(id(conn.connection.driver_connection), None)

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


def _alembic_config():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def schema_revisions(engine: Engine) -> tuple[str | None, str, bool]:
    """(the database's schema revision or None, this modlabel's newest, whether this
    modlabel knows the database's revision)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    known = {rev.revision for rev in script.walk_revisions()}
    return current, head, current is None or current in known


def _newer(current: str) -> DatabaseError:
    return DatabaseError(
        f"the database was written by a newer modlabel (its schema revision {current!r} "
        "is unknown to this one): upgrade modlabel"
    )


def check_schema(engine: Engine) -> None:
    """Refuse, with one line, a schema that is not this modlabel's: none yet, one behind
    (says which command upgrades it) or one ahead (written by a newer modlabel)."""
    current, head, known = schema_revisions(engine)
    if current == head:
        return
    if current is None:
        raise DatabaseError("the database holds no labels yet: run `modlabel scan` first")
    if not known:
        raise _newer(current)
    raise DatabaseError(
        f"the database's schema is at revision {current}, and this modlabel reads {head}: "
        "run `modlabel db upgrade` (or the next `modlabel scan` upgrades it)"
    )


def upgrade_schema(engine: Engine) -> None:
    """Run Alembic's migrations up to head on ``engine``.

    Safe when several processes open a new database at once: the upgrade runs
    under a lock (an advisory lock on PostgreSQL, a write transaction taken
    up front on SQLite), and the second process finds the schema at head.
    A database already at head is only read (a read-only database opens).
    A revision this modlabel does not know (a newer modlabel's) is refused.
    """
    from alembic import command

    current, head, known = schema_revisions(engine)
    if current == head:
        return
    if not known:
        raise _newer(current)
    cfg = _alembic_config()
    with engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


# Advisory lock keys of modlabel on PostgreSQL ('mlab' as an int4 namespace).
LOCK_NAMESPACE = 0x6D6C6162
MIGRATION_LOCK_KEY = LOCK_NAMESPACE << 16


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
        from . import stopping

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
                from . import stopping

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


# -- models ----------------------------------------------------------------


def ensure_model(
    engine: Engine,
    *,
    identity: str,
    sha256: str,
    backbone: str,
    class_names: Sequence[str],
    input_size: Sequence[int],
    activation_shape: Sequence[int],
    path: str,
    temperature: float | None = None,
) -> int:
    """The id of the model row for ``identity``, inserted on first use (race-free).

    temperature: what the scan divides the logits by (the model's metadata; 1.0 for
    an uncalibrated model); None leaves a stored one as it is.
    """
    update: dict[str, Any] = {"path": path}
    if temperature is not None:
        update["temperature"] = temperature
    with engine.begin() as conn:
        conn.execute(
            _insert(conn)(models)
            .values(
                identity=identity,
                sha256=sha256,
                backbone=backbone,
                class_names=list(class_names),
                input_size=list(input_size),
                activation_shape=list(activation_shape),
                path=path,
                created_at=utcnow(),
                temperature=temperature,
            )
            .on_conflict_do_update(index_elements=[models.c.identity], set_=update)
        )
        return int(
            conn.execute(sa.select(models.c.id).where(models.c.identity == identity)).scalar_one()
        )


def _insert(conn: sa.Connection) -> Callable[[sa.Table], Any]:
    """The dialect's INSERT with ``on_conflict_do_*`` (PostgreSQL and SQLite have both)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - modlabel supports SQLite and PostgreSQL
        raise DatabaseError(f"unsupported database dialect {conn.dialect.name!r}")
    return insert


@dataclass(frozen=True)
class ModelRow:
    id: int
    identity: str
    backbone: str
    class_names: list[str]
    input_size: list[int]
    path: str


def list_models(engine: Engine) -> list[ModelRow]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(models).order_by(models.c.id)).mappings().all()
    return [
        ModelRow(
            r["id"],
            r["identity"],
            r["backbone"],
            list(r["class_names"]),
            list(r["input_size"]),
            r["path"],
        )
        for r in rows
    ]


def pick_model(engine: Engine, identity: str | None = None) -> ModelRow:
    """The model named by ``identity`` (or a prefix of it), else the newest one."""
    rows = list_models(engine)
    if not rows:
        raise DatabaseError("the database holds no labels yet: run `modlabel scan` first")
    if identity is None:
        return rows[-1]
    matches = [r for r in rows if r.identity == identity or r.identity.startswith(identity)]
    if len(matches) != 1:
        known = ", ".join(r.identity for r in rows)
        raise DatabaseError(f"model {identity!r} matches {len(matches)} models; known: {known}")
    return matches[0]


# -- images ----------------------------------------------------------------


@dataclass(frozen=True)
class KnownFile:
    size_bytes: int
    mtime: float
    sha256: str | None
    failed: bool = False  # the stored row is an error, not a label
    missing: bool = False  # the file was found gone by an earlier scan


def _known_columns() -> list:
    return [
        images.c.path,
        images.c.size_bytes,
        images.c.mtime,
        images.c.sha256,
        images.c.error.is_not(None),
        images.c.missing_since.is_not(None),
    ]


def _known(row: Sequence[Any]) -> KnownFile:
    _path, size, mtime, digest, failed, missing = row
    return KnownFile(int(size), float(mtime), digest, bool(failed), bool(missing))


def known_files(engine: Engine, model_id: int, paths: Sequence[str]) -> dict[str, KnownFile]:
    """What the database already holds for these stored paths under this model."""
    found: dict[str, KnownFile] = {}
    # Chunked so that the IN list stays within every backend's parameter limit.
    for start in range(0, len(paths), 500):
        chunk = list(paths[start : start + 500])
        query = sa.select(*_known_columns()).where(
            images.c.model_id == model_id, images.c.path.in_(chunk)
        )
        with engine.connect() as conn:
            for row in conn.execute(query):
                found[row[0]] = _known(row)
    return found


def known_under(
    engine: Engine, model_id: int, folder: str, *, after: str | None = None, page: int = 1000
) -> list[tuple[str, KnownFile]]:
    """One page of the stored paths under the stored folder ``folder``, in byte order.

    The page after ``after`` (a stored path; from the folder's start when None),
    at most ``page`` rows, read in a short transaction of its own: a scan walks
    the folder and these pages side by side (keyset paging on the path index).
    """
    with engine.connect() as conn:
        query = known_under_query(model_id, folder, after=after, page=page)
        return [(row[0], _known(row)) for row in conn.execute(query)]


def known_under_query(model_id: int, folder: str, *, after: str | None, page: int) -> sa.Select:
    prefix = folder if folder.endswith("/") else folder + "/"
    upper = prefix[:-1] + "0"  # '0' follows '/': every path that starts with the prefix
    lower = images.c.path > after if after is not None else images.c.path >= prefix
    return (
        sa.select(*_known_columns())
        .where(images.c.model_id == model_id, lower, images.c.path < upper)
        .order_by(images.c.path)
        .limit(page)
    )


@dataclass
class ScanProgress:
    """What a scan has done so far; written to its ``scans`` row with every batch."""

    scan_id: int
    seen: int = 0
    unchanged: int = 0
    skipped: int = 0
    missing: int = 0


def touch_files(
    engine: Engine,
    model_id: int,
    stats: Iterable[tuple[str, int, float]],
    progress: ScanProgress | None = None,
) -> None:
    """Record a new stat for files whose content hash did not change (and that are there).

    stats: (stored path, size, mtime) per file.
    """
    from . import aggregate

    stats = list(stats)
    if not stats:
        return
    with engine.begin() as conn:
        with aggregate.track(conn, model_id, [p for p, _, _ in stats]):
            conn.execute(
                images.update()
                .where(images.c.model_id == model_id, images.c.path == sa.bindparam("p"))
                .values(size_bytes=sa.bindparam("s"), mtime=sa.bindparam("m"), missing_since=None),
                [{"p": p, "s": s, "m": m} for p, s, m in stats],
            )
        if progress is not None:
            _record_progress(conn, progress, labeled=0, errors=0)


def set_missing(
    engine: Engine,
    model_id: int,
    paths: Sequence[str],
    missing: bool,
    progress: ScanProgress | None = None,
) -> int:
    """Mark stored paths as found gone (``missing``) or back; returns how many rows changed.

    A missing row leaves class counts, class averages, the report and the default
    queries, and stays until ``prune_missing``; a file that comes back with the
    same stat is simply marked back.
    """
    from . import aggregate

    if not paths:
        return 0
    changed = 0
    with engine.begin() as conn:
        for start in range(0, len(paths), 500):
            chunk = list(paths[start : start + 500])
            state = (
                images.c.missing_since.is_(None) if missing else images.c.missing_since.is_not(None)
            )
            with aggregate.track(conn, model_id, chunk):
                result = conn.execute(
                    images.update()
                    .where(images.c.model_id == model_id, images.c.path.in_(chunk), state)
                    .values(missing_since=utcnow() if missing else None)
                )
            changed += int(result.rowcount or 0)
        if progress is not None:
            _record_progress(conn, progress, labeled=0, errors=0)
    return changed


def _missing_since(model_id: int, older_than: datetime | None) -> list:
    c = images.c
    conditions = [c.model_id == model_id, c.missing_since.is_not(None)]
    if older_than is not None:
        conditions.append(c.missing_since <= older_than)
    return conditions


def iter_missing(
    engine: Engine, model_id: int, *, older_than: datetime | None = None, chunk: int = 1000
) -> Iterator[tuple[str, datetime]]:
    """(stored path, missing since) of the model's missing files (missing since
    ``older_than`` or before, when given), in path order, streamed."""
    query = (
        sa.select(images.c.path, images.c.missing_since)
        .where(*_missing_since(model_id, older_than))
        .order_by(images.c.path)
        .execution_options(yield_per=chunk)
    )
    with engine.connect() as conn:
        yield from ((p, _aware(t)) for p, t in conn.execute(query))


def count_prunable(engine: Engine, model_id: int, *, older_than: datetime | None = None) -> int:
    """How many rows ``prune_missing`` would delete."""
    query = (
        sa.select(sa.func.count()).select_from(images).where(*_missing_since(model_id, older_than))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def count_rows(engine: Engine, model_id: int) -> int:
    """Every row of the model: labels, errors and missing files."""
    query = sa.select(sa.func.count()).select_from(images).where(images.c.model_id == model_id)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def prune_missing(
    engine: Engine, model_id: int, *, older_than: datetime | None = None, chunk: int = 1000
) -> int:
    """Delete the model's rows of missing files (missing since ``older_than`` or before,
    when given), ``chunk`` per transaction; returns how many."""
    from . import aggregate

    deleted = 0
    while True:
        with engine.begin() as conn:
            paths = (
                conn.execute(
                    sa.select(images.c.path)
                    .where(*_missing_since(model_id, older_than))
                    .limit(chunk)
                )
                .scalars()
                .all()
            )
            if not paths:
                return deleted
            with aggregate.track(conn, model_id, paths):
                conn.execute(
                    images.delete().where(
                        images.c.path.in_(paths), *_missing_since(model_id, older_than)
                    )
                )
            deleted += len(paths)


_IMAGE_COLUMNS = tuple(c.name for c in images.columns if c.name not in ("id", "model_id", "path"))
# The DICOM header columns of a row that has none (not DICOM, or written by other code).
_NO_DICOM = {"dicom_modality": None, "dicom_body_part": None, "dicom_sop_uid": None}
# The out-of-set columns of a row without a score (an error, a model without a threshold).
_NO_OUT_OF_SET = {"ood_score": None, "out_of_set": None}


def write_image_rows(
    engine: Engine,
    model_id: int,
    rows: Sequence[dict[str, Any]],
    progress: ScanProgress | None = None,
) -> None:
    """Insert or update image rows, keyed by (model, stored path), in one transaction.

    A batch lands whole or not at all, and with it the scan's counts and the
    class sums, so the ``scans`` row never counts more than was committed. An
    upsert: a second scan writing the same paths at the same moment updates,
    never fails.
    """
    from . import aggregate

    if not rows:
        return
    defaults = {"missing_since": None, "source_id": None, **_NO_DICOM, **_NO_OUT_OF_SET}
    rows = list({r["path"]: {**defaults, **r} for r in rows}.values())
    with engine.begin() as conn:
        stmt = _insert(conn)(images)
        stmt = stmt.on_conflict_do_update(
            index_elements=[images.c.model_id, images.c.path],
            set_={name: stmt.excluded[name] for name in _IMAGE_COLUMNS},
        )
        with aggregate.track(conn, model_id, [r["path"] for r in rows], written=rows):
            conn.execute(stmt, [{**r, "model_id": model_id} for r in rows])
        if progress is not None:
            errors = sum(1 for r in rows if r["error"] is not None)
            _record_progress(conn, progress, labeled=len(rows) - errors, errors=errors)


def _record_progress(
    conn: sa.Connection, progress: ScanProgress, *, labeled: int, errors: int
) -> None:
    conn.execute(
        scans.update()
        .where(scans.c.id == progress.scan_id)
        .values(
            seen=progress.seen,
            unchanged=progress.unchanged,
            skipped=progress.skipped,
            missing=progress.missing,
            labeled=scans.c.labeled + labeled,
            errors=scans.c.errors + errors,
            alive_until=_alive_until(),
        )
    )


def _present(model_id: int) -> list:
    return [images.c.model_id == model_id, images.c.missing_since.is_(None)]


def class_counts(engine: Engine, model_id: int) -> dict[str, int]:
    """Images per label of the files that are there (missing and out-of-set ones left out)."""
    query = (
        sa.select(images.c.label, sa.func.count())
        .where(*_present(model_id), images.c.error.is_(None), images.c.out_of_set.is_not(True))
        .group_by(images.c.label)
    )
    with engine.connect() as conn:
        return {label: int(n) for label, n in conn.execute(query)}


def error_rows(engine: Engine, model_id: int, limit: int = 100) -> list[tuple[str, str]]:
    query = (
        sa.select(images.c.path, images.c.error)
        .where(*_present(model_id), images.c.error.is_not(None))
        .order_by(images.c.path)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [(p, e) for p, e in conn.execute(query)]


def count_errors(engine: Engine, model_id: int) -> int:
    query = (
        sa.select(sa.func.count())
        .select_from(images)
        .where(*_present(model_id), images.c.error.is_not(None))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def example_rows(
    engine: Engine, model_id: int, class_name: str, limit: int, *, least_confident: bool = False
) -> list[dict[str, Any]]:
    """The most (or, ``least_confident``, the least) confident images of a class, for the
    report; read in order on the (model_id, label, confidence) index."""
    order = images.c.confidence.asc() if least_confident else images.c.confidence.desc()
    query = (
        sa.select(images.c.path, images.c.confidence, images.c.crm, images.c.width, images.c.height)
        .where(
            *_present(model_id),
            images.c.label == class_name,
            images.c.error.is_(None),
            images.c.confidence.is_not(None),
            images.c.out_of_set.is_not(True),
        )
        .order_by(order, images.c.path)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def confidence_histograms(engine: Engine, model_id: int, bins: int = 20) -> dict[str, list[int]]:
    """Per label, the count of labeled images (present, no error) in each of ``bins`` equal
    bins of confidence over [0, 1] (the last bin holds 1.0): one pass, one GROUP BY."""
    c = images.c
    counts = []
    for i in range(bins):
        upper = c.confidence <= 1.0 if i == bins - 1 else c.confidence < (i + 1) / bins
        inside = sa.and_(c.confidence >= i / bins, upper)
        counts.append(sa.func.sum(sa.case((inside, 1), else_=0)))
    query = (
        sa.select(c.label, *counts)
        .where(*_present(model_id), c.error.is_(None), c.label.is_not(None))
        .where(c.out_of_set.is_not(True))
        .group_by(c.label)
    )
    with engine.connect() as conn:
        return {row[0]: [int(n or 0) for n in row[1:]] for row in conn.execute(query)}


@dataclass(frozen=True)
class ErrorGroup:
    """The files that failed for one reason: how many, and the first few paths (stored text)."""

    reason: str
    count: int
    examples: list[str]


def error_groups(
    engine: Engine, model_id: int, *, reasons: int = 20, examples: int = 3
) -> list[ErrorGroup]:
    """The present files that could not be labeled, grouped by reason, most frequent first:
    the ``reasons`` most frequent, each with the first ``examples`` paths in path order.

    Two aggregate queries over the error rows (the partial index of errors); no row list
    is held in memory.
    """
    c = images.c
    failed = [*_present(model_id), c.error.is_not(None)]
    counted = (
        sa.select(c.error, sa.func.count().label("n"))
        .where(*failed)
        .group_by(c.error)
        .order_by(sa.desc("n"), c.error)
        .limit(reasons)
    )
    with engine.connect() as conn:
        top = [(reason, int(n)) for reason, n in conn.execute(counted)]
        if not top:
            return []
        rank = sa.func.row_number().over(partition_by=c.error, order_by=c.path).label("rank")
        ranked = (
            sa.select(c.error, c.path, rank)
            .where(*failed, c.error.in_([reason for reason, _ in top]))
            .subquery()
        )
        firsts = (
            sa.select(ranked.c.error, ranked.c.path)
            .where(ranked.c.rank <= examples)
            .order_by(ranked.c.error, ranked.c.path)
        )
        paths: dict[str, list[str]] = {}
        for reason, path in conn.execute(firsts):
            paths.setdefault(reason, []).append(path)
    return [ErrorGroup(reason, n, paths.get(reason, [])) for reason, n in top]


def count_missing(engine: Engine, model_id: int) -> int:
    """How many of the model's files scans found gone (the partial index of missing files)."""
    query = (
        sa.select(sa.func.count())
        .select_from(images)
        .where(images.c.model_id == model_id, images.c.missing_since.is_not(None))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def count_out_of_set(engine: Engine, model_id: int) -> int:
    """How many of the model's present files it flagged out of set (a partial index)."""
    query = (
        sa.select(sa.func.count())
        .select_from(images)
        .where(*_present(model_id), images.c.out_of_set.is_(True))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def out_of_set_rows(
    engine: Engine, model_id: int, limit: int = 20
) -> list[tuple[str, str | None, float | None, float | None]]:
    """(stored path, label, confidence, ood_score) of the first ``limit`` flagged files,
    in path order."""
    c = images.c
    query = (
        sa.select(c.path, c.label, c.confidence, c.ood_score)
        .where(*_present(model_id), c.out_of_set.is_(True))
        .order_by(c.path)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]


def iter_image_rows(
    engine: Engine, model_id: int, *, chunk: int = 1000
) -> Iterator[tuple[str, str | None, float | None, bytes | None, str | None, datetime | None]]:
    """(stored path, label, confidence, crm, error, missing_since) of every row of the model,
    missing and failed ones included, in path order; streamed ``chunk`` rows at a time
    (a server-side cursor on PostgreSQL), so that memory stays flat at any size."""
    c = images.c
    query = (
        sa.select(c.path, c.label, c.confidence, c.crm, c.error, c.missing_since)
        .where(c.model_id == model_id)
        .order_by(c.path)
        .execution_options(yield_per=chunk)
    )
    with engine.connect() as conn:
        for path, label, confidence, crm, error, missing in conn.execute(query):
            yield path, label, confidence, crm, error, _aware(missing) if missing else None


def upsert_class_map(
    conn: sa.Connection,
    model_id: int,
    class_name: str,
    *,
    image_count: int,
    crm_blob: bytes,
    roi_box: Sequence[int] | None,
    map_sum: bytes | None,
) -> None:
    """Write one class's average map, ROI box and running sum (modlabel.aggregate)."""
    values = {
        "image_count": image_count,
        "crm": crm_blob,
        "roi_box": list(roi_box) if roi_box is not None else [],
        "map_sum": map_sum,
        "updated_at": utcnow(),
    }
    conn.execute(
        _insert(conn)(class_maps)
        .values(model_id=model_id, class_name=class_name, **values)
        .on_conflict_do_update(
            index_elements=[class_maps.c.model_id, class_maps.c.class_name], set_=values
        )
    )


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; modlabel writes UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def model_class_min_confidence(engine: Engine, model_id: int) -> float | None:
    """The confidence an image needs to count in the model's class averages (None: not built)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(models.c.class_min_confidence).where(models.c.id == model_id)
        ).scalar()


def load_class_maps(engine: Engine, model_id: int) -> list[dict[str, Any]]:
    query = (
        sa.select(class_maps)
        .where(class_maps.c.model_id == model_id)
        .order_by(class_maps.c.class_name)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


# -- scans -----------------------------------------------------------------


def _alive_until() -> datetime:
    return utcnow() + timedelta(seconds=ALIVE_SECONDS)


def start_scan(engine: Engine, model_id: int, roots: Sequence[str]) -> int:
    """Insert the ``scans`` row of a starting scan (status running) and return its id."""
    with engine.begin() as conn:
        return int(
            conn.execute(
                scans.insert().values(
                    model_id=model_id,
                    roots=list(roots),
                    started_at=utcnow(),
                    seen=0,
                    labeled=0,
                    unchanged=0,
                    errors=0,
                    skipped=0,
                    missing=0,
                    status=RUNNING,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    alive_until=_alive_until(),
                )
            ).inserted_primary_key[0]
        )


def record_run(
    engine: Engine, model_id: int | None, roots: Sequence[str], *, status: str, reason: str
) -> int:
    """The ``scans`` row of a run that ended before its scan began (a stop during start-up,
    a refusal at the start): finished at once, with its status and reason."""
    now = utcnow()
    with engine.begin() as conn:
        return int(
            conn.execute(
                scans.insert().values(
                    model_id=model_id,
                    roots=list(roots),
                    started_at=now,
                    finished_at=now,
                    seen=0,
                    labeled=0,
                    unchanged=0,
                    errors=0,
                    skipped=0,
                    missing=0,
                    status=status,
                    reason=redaction.redact(one_line(reason, 2000)),
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    alive_until=None,
                )
            ).inserted_primary_key[0]
        )


def model_id_of(engine: Engine, sha256: str) -> int | None:
    """The id of the model row of the ONNX file with this content hash, if it has one."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(models.c.id).where(models.c.sha256 == sha256).order_by(models.c.id.desc())
        ).scalar()


def heartbeat(engine: Engine, scan_id: int) -> None:
    """Renew a running scan's ``alive_until``."""
    with engine.begin() as conn:
        conn.execute(
            scans.update()
            .where(scans.c.id == scan_id, scans.c.status == RUNNING)
            .values(alive_until=_alive_until())
        )


def finish_scan(
    engine: Engine,
    scan_id: int,
    *,
    status: str = FINISHED,
    reason: str | None = None,
    seen: int,
    unchanged: int,
    skipped: int = 0,
    missing: int = 0,
) -> None:
    """Close a scan's row: its final status and the counts not already committed.

    ``labeled`` and ``errors`` are not passed: they were counted with each
    committed batch.
    """
    with engine.begin() as conn:
        conn.execute(
            scans.update()
            .where(scans.c.id == scan_id)
            .values(
                status=status,
                reason=redaction.redact(one_line(reason, 2000)) if reason else None,
                finished_at=utcnow(),
                seen=seen,
                unchanged=unchanged,
                skipped=skipped,
                missing=missing,
                alive_until=None,
            )
        )


def interrupt_stale_scans(engine: Engine, model_id: int) -> int:
    """Mark the model's scans still shown as running as interrupted; returns how many.

    Called by a scan that holds the model's lock: no other scan of the model
    can be running then, so those rows belong to processes that died.
    """
    with engine.begin() as conn:
        result = conn.execute(
            scans.update()
            .where(scans.c.model_id == model_id, scans.c.status == RUNNING)
            .values(
                status=INTERRUPTED,
                reason="the process ended without finishing (killed, or its machine stopped)",
                alive_until=None,
            )
        )
        return int(result.rowcount or 0)


@dataclass(frozen=True)
class ScanRow:
    id: int
    model_id: int | None
    roots: list[str]
    started_at: datetime
    finished_at: datetime | None
    status: str
    reason: str | None
    host: str | None
    pid: int | None
    seen: int
    labeled: int
    unchanged: int
    errors: int
    skipped: int = 0
    missing: int = 0

    def describe(self) -> str:
        """'scan #12 on host h, pid 345, since 2026-11-25 02:15 UTC'"""
        since = _aware(self.started_at).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"scan #{self.id} on host {self.host}, pid {self.pid}, since {since}"


def effective_status(row: dict[str, Any], *, now: datetime | None = None) -> str:
    """A row's status as it truly is: a running scan whose process is gone is interrupted.

    Gone: on this host, its pid no longer exists; anywhere, its heartbeat lapsed.
    """
    if row["status"] != RUNNING:
        return row["status"]
    alive_until = row.get("alive_until")
    if alive_until is not None and _aware(alive_until) < (now or utcnow()):
        return INTERRUPTED
    if row.get("host") == socket.gethostname() and row.get("pid") and not _pid_alive(row["pid"]):
        return INTERRUPTED
    return RUNNING


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def list_scans(engine: Engine, model_id: int | None = None, *, limit: int = 20) -> list[ScanRow]:
    """The latest scans, newest first, with their effective status."""
    query = sa.select(scans).order_by(scans.c.id.desc()).limit(limit)
    if model_id is not None:
        query = query.where(scans.c.model_id == model_id)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    return [
        ScanRow(
            id=r["id"],
            model_id=r["model_id"],
            roots=list(r["roots"] or []),
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            status=effective_status(r),
            reason=r["reason"],
            host=r["host"],
            pid=r["pid"],
            seen=r["seen"],
            labeled=r["labeled"],
            unchanged=r["unchanged"],
            errors=r["errors"],
            skipped=r["skipped"],
            missing=r["missing"],
        )
        for r in rows
    ]


def running_scan(engine: Engine, model_id: int) -> ScanRow | None:
    """The newest scan of the model shown as running, if any (to name a lock's holder)."""
    for row in list_scans(engine, model_id, limit=5):
        if row.status == RUNNING:
            return row
    return None
