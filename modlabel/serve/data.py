"""What the server's pages read: a read-only engine, the class grid's keyset pages, one
image's row and history, its similar images, the scans' health and a path search.

Every query here reads; the engine itself refuses writes (``open_read_only``). Pages are
keyset pages (``WHERE (sort, id) after the last row shown``), never OFFSET, so the
thousandth page of a class costs what the first does, on the indexes the scan made:
(model_id, label, confidence), (model_id, path), (model_id, labeled_at).
"""

from __future__ import annotations

import base64
import heapq
import json
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import store
from ..errors import DatabaseError, InputError, UsageError
from ..store import similar
from ..store.schema import _aware, images, scans

PAGE_SIZE = 48
SIMILAR_SHOWN = 12
SEARCH_SHOWN = 50
# A nightly job is late when its last finished scan is older than this.
NIGHTLY_LATE = timedelta(hours=26)

# Every column of ``images`` a page shows: never the embedding (a database written before
# embeddings were kept has no such column) nor the blobs a page does not draw.
_ROW_COLUMNS = [
    "id", "model_id", "path", "size_bytes", "mtime", "sha256", "width", "height", "label",
    "confidence", "probabilities", "error", "error_kind", "labeled_at", "missing_since",
    "source_id", "dicom_modality", "dicom_body_part", "dicom_sop_uid", "ood_score",
    "out_of_set", "runner_up", "runner_up_probability", "roi_share",
]  # fmt: skip
_GRID_COLUMNS = [
    "id", "path", "label", "confidence", "out_of_set", "error", "missing_since",
    "dicom_modality", "labeled_at",
]  # fmt: skip


# -- a read-only engine ---------------------------------------------------------------


def read_only_url(url: str) -> str:
    """A SQLite file's URL as a read-only URI filename (``file:...?mode=ro``): SQLite
    itself refuses every write. Other URLs are returned as they are (PostgreSQL sessions
    are made read-only when they connect, ``open_read_only``)."""
    database = store.sqlite_file(url)
    if database is None or url.startswith("sqlite:///file:"):
        return url
    quoted = urllib.parse.quote(str(database.absolute()), safe="/")
    return f"sqlite:///file:{quoted}?mode=ro&uri=true"


def open_read_only(url: str, *, connections: int | None = None) -> Engine:
    """An engine that only reads: a SQLite file opened read-only with ``query_only``; a
    PostgreSQL session whose transactions are all READ ONLY. The schema must be this
    modlabel's (``store.open_db`` without ``migrate``: the server never upgrades it).
    ``connections``: the pool keeps that many open and opens no more."""
    database = store.sqlite_file(url)
    if database is not None and not database.exists():
        raise DatabaseError(f"no database at {database}: run `modlabel scan` first, or check --db")
    engine = store.open_db(
        read_only_url(url),
        create=False,
        migrate=False,
        pool_size=connections,
        statement_snapshots=True,  # each page's queries read what is there (no BEGIN)
    )
    sa.event.listen(engine, "connect", _read_only_session)
    engine.dispose()  # the connection open_db pinged with was made before the listener
    return engine


def _read_only_session(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor.execute("PRAGMA query_only = ON")
        cursor.close()
        return
    cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    cursor.close()
    dbapi_connection.commit()


# -- classes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassCount:
    name: str
    count: int  # present, labeled, in set
    out_of_set: int  # present, labeled, flagged out of set


def class_counts(engine: Engine, model_row: store.ModelRow) -> list[ClassCount]:
    """Per class of the model (and any other stored label, last): the present, labeled
    images in set (``store.class_counts``) and those flagged out of set, both read from
    the index of present files' labels, never from every row."""
    c = images.c
    flagged_query = (
        sa.select(c.label, sa.func.count())
        .where(c.model_id == model_row.id, c.missing_since.is_(None), c.out_of_set.is_(True))
        .where(c.error.is_(None), c.label.is_not(None))
        .group_by(c.label)
    )
    in_set = store.class_counts(engine, model_row.id)
    with engine.connect() as conn:
        flagged = {label: int(n) for label, n in conn.execute(flagged_query)}
    found = {name for name in [*in_set, *flagged] if name is not None}
    names = [*model_row.class_names, *sorted(found - set(model_row.class_names))]
    return [ClassCount(n, in_set.get(n, 0), flagged.get(n, 0)) for n in names]


# The grid's filter values and the model's stored labels are read again at most this often.
MODALITIES_SECONDS = 60.0
_lists: dict[tuple[str, str, int], tuple[float, list[Any]]] = {}


def _read_at_most_every_minute(
    what: str, engine: Engine, model_id: int, read: Callable[[], list[Any]]
) -> list[Any]:
    """``read()``, remembered per database, model and ``what`` for MODALITIES_SECONDS."""
    key = (what, str(engine.url), int(model_id))
    hit = _lists.get(key)
    if hit is not None and time.monotonic() - hit[0] < MODALITIES_SECONDS:
        return hit[1]
    found = read()
    _lists[key] = (time.monotonic(), found)
    return found


def modalities(engine: Engine, model_id: int, limit: int = 64) -> list[str]:
    """The DICOM Modality values stored for the model (its index), for the grid's filter;
    read again at most every MODALITIES_SECONDS."""
    return _read_at_most_every_minute(
        "modalities", engine, model_id, lambda: _read_modalities(engine, model_id, limit)
    )


def stored_labels(engine: Engine, model_id: int) -> list[str | None]:
    """Every label the model's rows hold (None for unlabeled rows: errors, and images a
    scan with ``--abstain`` left without a label), read along the (model_id, label,
    confidence) index; read again at most every MODALITIES_SECONDS."""

    def read() -> list[str | None]:
        query = sa.select(images.c.label).where(images.c.model_id == model_id)
        with engine.connect() as conn:
            return [label for (label,) in conn.execute(query.group_by(images.c.label))]

    return _read_at_most_every_minute("labels", engine, model_id, read)


def _read_modalities(engine: Engine, model_id: int, limit: int) -> list[str]:
    c = images.c
    query = (
        sa.select(c.dicom_modality)
        .where(c.model_id == model_id, c.dicom_modality.is_not(None))
        .group_by(c.dicom_modality)
        .order_by(c.dicom_modality)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [m for (m,) in conn.execute(query)]


# -- the class grid ---------------------------------------------------------------------

SORTS = ("confidence", "path", "date")
CHOICES = ("exclude", "include", "only")


@dataclass(frozen=True)
class GridQuery:
    """What a grid shows: a class (or every class), the filters and the order.

    out_of_set, missing: ``exclude`` (the default), ``include`` or ``only``; errors: only
    the files that could not be labeled (they have no label or confidence, so a class and
    a confidence range do not apply, and they are sorted by path or date)."""

    label: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    out_of_set: str = "exclude"
    missing: str = "exclude"
    modality: str | None = None
    errors: bool = False
    sort: str = "confidence"
    descending: bool = True
    after: tuple[Any, int] | None = None  # the keyset: (sort value, id) of the last row shown

    @classmethod
    def from_params(cls, params: Any) -> GridQuery:
        """From a request's query parameters; a value that is none of the choices is a
        ``UsageError`` (400)."""

        def number(name: str) -> float | None:
            text = (params.get(name) or "").strip()
            if not text:
                return None
            try:
                value = float(text)
            except ValueError:
                raise UsageError(f"{name}: not a number: {text!r}") from None
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"{name}: a confidence is between 0 and 1, not {text}")
            return value

        def choice(name: str, allowed: Sequence[str], default: str) -> str:
            value = params.get(name) or default
            if value not in allowed:
                raise UsageError(f"{name}: one of {', '.join(allowed)}, not {value!r}")
            return value

        errors = params.get("errors") in ("1", "on", "only", "true")
        sort = choice("sort", SORTS, "path" if errors else "confidence")
        if errors and sort == "confidence":
            sort = "path"
        default_dir = "desc" if sort in ("confidence", "date") else "asc"
        query = cls(
            label=params.get("label") or None,
            min_confidence=number("min"),
            max_confidence=number("max"),
            out_of_set=choice("oos", CHOICES, "exclude"),
            missing=choice("missing", CHOICES, "exclude"),
            modality=params.get("modality") or None,
            errors=errors,
            sort=sort,
            descending=choice("dir", ("asc", "desc"), default_dir) == "desc",
        )
        cursor = params.get("after")
        return replace(query, after=decode_cursor(cursor, sort)) if cursor else query

    def params(self, **changes: Any) -> dict[str, str]:
        """The query parameters that ask for this grid again (with ``changes``)."""
        q = replace(self, **changes)
        out = {
            "label": q.label or "",
            "min": "" if q.min_confidence is None else repr(q.min_confidence),
            "max": "" if q.max_confidence is None else repr(q.max_confidence),
            "oos": q.out_of_set,
            "missing": q.missing,
            "modality": q.modality or "",
            "errors": "1" if q.errors else "",
            "sort": q.sort,
            "dir": "desc" if q.descending else "asc",
            "after": encode_cursor(q.after, q.sort) if q.after is not None else "",
        }
        return {k: v for k, v in out.items() if v}


def encode_cursor(after: tuple[Any, int], sort: str) -> str:
    """The keyset as an opaque URL-safe text: JSON [value, id], base64."""
    value, row_id = after
    if sort == "date" and isinstance(value, datetime):
        value = value.isoformat()
    raw = json.dumps([value, int(row_id)], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text: str, sort: str) -> tuple[Any, int]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        value, row_id = json.loads(raw)
        if sort == "confidence":
            value = float(value)
        elif sort == "date":
            value = datetime.fromisoformat(value)
        elif not isinstance(value, str):
            raise ValueError("a path is text")
        return value, int(row_id)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise UsageError("after: not a page of this grid (follow the page's own links)") from None


@dataclass
class GridPage:
    rows: list[dict[str, Any]]
    next_after: tuple[Any, int] | None  # None: the last page
    query: GridQuery
    total: int | None = None  # shown only where it costs one index count
    modalities: list[str] = field(default_factory=list)


def _sort_column(sort: str) -> sa.ColumnElement:
    return {"confidence": images.c.confidence, "path": images.c.path, "date": images.c.labeled_at}[
        sort
    ]


def grid_conditions(model_id: int, q: GridQuery) -> list[sa.ColumnElement]:
    c = images.c
    where: list[sa.ColumnElement] = [c.model_id == model_id]
    if q.errors:
        where.append(c.error.is_not(None))
    else:
        where.append(c.error.is_(None))
        if q.label is not None:
            where.append(c.label == q.label)
        if q.min_confidence is not None:
            where.append(c.confidence >= q.min_confidence)
        if q.max_confidence is not None:
            where.append(c.confidence <= q.max_confidence)
        if q.out_of_set == "exclude":
            where.append(c.out_of_set.is_not(True))
        elif q.out_of_set == "only":
            where.append(c.out_of_set.is_(True))
    if q.missing == "exclude":
        where.append(c.missing_since.is_(None))
    elif q.missing == "only":
        where.append(c.missing_since.is_not(None))
    if q.modality is not None:
        where.append(c.dicom_modality == q.modality)
    if q.sort == "confidence":
        where.append(c.confidence.is_not(None))
    if q.after is not None:
        value, row_id = q.after
        column = _sort_column(q.sort)
        # (sort, id) past the keyset, written so that the first term is an index range on
        # both databases (a row-value comparison or an OR would be a filter on SQLite).
        if q.descending:
            where += [column <= value, sa.or_(column < value, c.id < row_id)]
        else:
            where += [column >= value, sa.or_(column > value, c.id > row_id)]
    return where


def _dicts(result: sa.CursorResult) -> list[dict[str, Any]]:
    """A result's rows as dicts (a third of the cost of ``dict(row)`` over ``mappings()``)."""
    keys = list(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result]


def grid_page(
    engine: Engine,
    model_id: int,
    q: GridQuery,
    *,
    limit: int = PAGE_SIZE,
    labels: Sequence[str] = (),
) -> GridPage:
    """One page of the grid, and the keyset of the next one (None on the last page).

    ``labels``: every label the model's rows hold (``stored_labels``, None among them for
    the images a scan with ``--abstain`` left unlabeled). Every class at once by confidence
    is then one page of each label, read along the (model_id, label, confidence) index,
    merged: there is no index on the confidence alone, and one query of every class sorted
    the whole model's rows for each page (194 ms against 14 ms at 100,000 rows)."""
    c = images.c
    column = _sort_column(q.sort)
    order = [column.desc(), c.id.desc()] if q.descending else [column.asc(), c.id.asc()]
    q = _for_dialect(engine, q)
    where = grid_conditions(model_id, q)
    if q.label is None and q.sort == "confidence" and not q.errors and labels:
        asked = [
            [*where, c.label.is_(None) if label is None else c.label == label]
            for label in dict.fromkeys(labels)
        ]
    else:
        asked = [where]
    rows = []
    with engine.connect() as conn:
        for conditions in asked:
            query = (
                sa.select(*(c[name] for name in _GRID_COLUMNS))
                .where(*conditions)
                .order_by(*order)
                .limit(limit + 1)
            )
            rows += _dicts(conn.execute(query))
    if len(asked) > 1:
        sign = -1 if q.descending else 1
        rows = heapq.nsmallest(
            limit + 1, rows, key=lambda r: (sign * r["confidence"], sign * r["id"])
        )
    more = len(rows) > limit
    rows = rows[:limit]
    next_after = None
    if more and rows:
        last = rows[-1]
        key = {"confidence": "confidence", "path": "path", "date": "labeled_at"}[q.sort]
        next_after = (last[key], int(last["id"]))
    return GridPage(rows, next_after, q)


def _for_dialect(engine: Engine, q: GridQuery) -> GridQuery:
    """SQLite compares the stored timestamps (naive UTC text) with naive values only."""
    if q.sort == "date" and q.after is not None and engine.dialect.name == "sqlite":
        value, row_id = q.after
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return replace(q, after=(value, row_id))
    return q


# -- one image --------------------------------------------------------------------------


@dataclass
class ImageView:
    row: dict[str, Any]
    probabilities: list[tuple[str, float]]  # every class, most probable first
    other_models: list[dict[str, Any]]  # the same path labeled by the database's other models
    # The scan of this model running when it was labeled: id, status (effective), started_at,
    # host; None where no recorded scan had started.
    labeled_by: dict[str, Any] | None


def image_row(engine: Engine, row_id: int) -> dict[str, Any] | None:
    """The stored row of ``row_id`` (no blob but the CRM), or None where there is none."""
    c = images.c
    query = sa.select(*(c[n] for n in _ROW_COLUMNS), c.crm).where(c.id == int(row_id))
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return dict(row) if row is not None else None


def image_view(engine: Engine, row: dict[str, Any], models: Sequence[store.ModelRow]) -> ImageView:
    """The row with its probabilities in order, its labels by other models and the scan
    that labeled it (the model's scan running at ``labeled_at``)."""
    probabilities = sorted(
        ((str(k), float(v)) for k, v in (row.get("probabilities") or {}).items()),
        key=lambda kv: -kv[1],
    )
    c = images.c
    others = [m.id for m in models if m.id != row["model_id"]]
    other_rows: list[dict[str, Any]] = []
    with engine.connect() as conn:
        if others:
            query = sa.select(
                c.id, c.model_id, c.label, c.confidence, c.error, c.labeled_at, c.out_of_set
            ).where(c.model_id.in_(others), c.path == row["path"])
            other_rows = _dicts(conn.execute(query))
        labeled_at = row["labeled_at"]
        scan = conn.execute(
            sa.select(scans.c.id, scans.c.status, scans.c.started_at, scans.c.host)
            .add_columns(scans.c.pid, scans.c.alive_until)
            .where(scans.c.model_id == row["model_id"], scans.c.started_at <= labeled_at)
            .order_by(scans.c.started_at.desc())
            .limit(1)
        ).first()
    identity = {m.id: m.identity for m in models}
    for other in other_rows:
        other["model"] = identity.get(other["model_id"], str(other["model_id"]))
    labeled_by = None
    if scan is not None:
        labeled_by = dict(scan._mapping)
        labeled_by["status"] = store.effective_status(labeled_by)
    return ImageView(row, probabilities, other_rows, labeled_by)


@dataclass(frozen=True)
class SimilarResult:
    neighbours: list[Any]  # store.similar.Neighbour
    note: str | None  # why there are none, for people


NO_EMBEDDING = "no embedding stored"


def similar_to_row(
    engine: Engine, model_id: int, row_id: int, k: int = SIMILAR_SHOWN
) -> SimilarResult:
    """The ``k`` stored images nearest to a stored one, or why there are none: a row
    without an embedding, or a database (or modlabel) that keeps none, says so."""
    try:
        _, vector = similar.stored_embedding(engine, model_id, int(row_id))
        found = similar.nearest(engine, model_id, vector, k, exclude_id=int(row_id))
    except similar.NoEmbedding:
        return SimilarResult([], NO_EMBEDDING)
    except InputError as exc:
        return SimilarResult([], str(exc))
    except (sa.exc.OperationalError, sa.exc.ProgrammingError, DatabaseError):
        # A database written before embeddings were kept (no column, no settings table).
        return SimilarResult([], f"{NO_EMBEDDING} (the database predates embeddings)")
    return SimilarResult(found, None if found else "no other image has an embedding yet")


# Similar images of a stored row, kept this long (a rescan changes them rarely), at most
# SIMILAR_CACHED rows; searches run SIMILAR_AT_ONCE at a time.
SIMILAR_TTL_SECONDS = 600.0
SIMILAR_CACHED = 4096
SIMILAR_AT_ONCE = 1
_similar_cache: OrderedDict[tuple[str, int, int], tuple[float, SimilarResult]] = OrderedDict()
_similar_lock = threading.Lock()
_similar_slots = threading.BoundedSemaphore(SIMILAR_AT_ONCE)


def similar_cached(
    engine: Engine, model_id: int, row_id: int, k: int = SIMILAR_SHOWN
) -> SimilarResult:
    """``similar_to_row``, remembered for SIMILAR_TTL_SECONDS, with at most
    SIMILAR_AT_ONCE searches running: an exact search is CPU-bound, and a server whose
    every thread searched would answer no other page."""
    key = (str(engine.url), int(model_id), int(row_id))
    now = time.monotonic()
    with _similar_lock:
        hit = _similar_cache.get(key)
        if hit is not None and now - hit[0] < SIMILAR_TTL_SECONDS:
            _similar_cache.move_to_end(key)
            return hit[1]
    with _similar_slots:
        result = similar_to_row(engine, model_id, row_id, k)
    with _similar_lock:
        _similar_cache[key] = (time.monotonic(), result)
        while len(_similar_cache) > SIMILAR_CACHED:
            _similar_cache.popitem(last=False)
    return result


def similar_to_vector(engine: Engine, model_id: int, vector: Any, k: int) -> SimilarResult:
    """The ``k`` stored images nearest to an embedding computed here (an upload)."""
    try:
        found = similar.nearest(engine, model_id, vector, k)
    except InputError as exc:
        return SimilarResult([], str(exc))
    except (sa.exc.OperationalError, sa.exc.ProgrammingError, DatabaseError):
        return SimilarResult([], f"{NO_EMBEDDING} (the database predates embeddings)")
    return SimilarResult(found, None if found else "no stored image has an embedding yet")


# -- scans ------------------------------------------------------------------------------


@dataclass
class Health:
    """The nightly job at a glance: how the last run ended, how long ago a scan last
    finished, and whether that is late."""

    last: store.ScanRow | None
    last_finished: store.ScanRow | None
    late: bool
    failed_recently: int  # failed or interrupted among the runs shown
    summary: str
    ok: bool


def nightly_health(runs: Sequence[store.ScanRow], *, now: datetime | None = None) -> Health:
    now = now or datetime.now(timezone.utc)
    last = runs[0] if runs else None
    finished = next((r for r in runs if r.status == store.FINISHED and r.finished_at), None)
    late = finished is None or now - _aware(finished.finished_at) > NIGHTLY_LATE
    bad = sum(1 for r in runs if r.status in (store.FAILED, store.INTERRUPTED))
    if last is None:
        summary, ok = "no scan is recorded for this model", False
    elif last.status == store.RUNNING:
        summary, ok = f"scan #{last.id} is running", not late
    elif last.status != store.FINISHED:
        summary, ok = f"the last scan (#{last.id}) {last.status}", False
    elif late:
        summary, ok = (
            "no scan finished in the last day: is the nightly job running?",
            False,
        )
    else:
        summary, ok = f"the last scan (#{last.id}) finished", True
    return Health(last, finished, late, bad, summary, ok)


# -- search -----------------------------------------------------------------------------


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search_paths(
    engine: Engine, model_id: int, text: str, *, limit: int = SEARCH_SHOWN
) -> list[dict[str, Any]]:
    """The first ``limit`` rows of the model whose stored path holds ``text``, in path
    order (read along the (model_id, path) index, stopping at ``limit`` matches)."""
    c = images.c
    query = (
        sa.select(*(c[name] for name in _GRID_COLUMNS))
        .where(c.model_id == model_id, c.path.like(_like_pattern(text), escape="\\"))
        .order_by(c.path)
        .limit(limit)
    )
    with engine.connect() as conn:
        return _dicts(conn.execute(query))
