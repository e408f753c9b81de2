"""What the report and the commands that only read ask of the store: counts, examples,
histograms, errors by reason, flagged files, every row streamed."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..timestamps import sqlite_timestamp
from .cursor import driver_chunks
from .reviews import with_reviews
from .schema import _aware, class_maps, images


def _present(model_id: int) -> list:
    return [images.c.model_id == model_id, images.c.missing_since.is_(None)]


# The failed files of a model, on the partial index of errors (model_id, path): a range of
# that index's second column (true of every path) is what makes SQLite take it when it has
# no statistics (modlabel never gathers any); else it reads the index of present files'
# labels and looks every row up in the table for its error.
def _failed() -> list:
    return [images.c.error.is_not(None), images.c.path >= ""]


def _minus_failed(conn: sa.Connection, present: sa.Select, failed: sa.Select) -> dict:
    """{key: n} of ``present`` (``key..., n`` rows) less those of ``failed`` (the same
    query over the present files that failed), zeros dropped.

    The counts of the present files come from one narrow index (``ix_images_present_labels``)
    without reading the table, but that index cannot tell a failed file (its error is a
    sentence, too long for an index entry); the failed files are few, and read on the
    partial index of errors. The difference is exactly the count without them.
    """
    totals: dict = {}
    for *key, n in conn.execute(present):
        totals[tuple(key)] = int(n)
    for *key, n in conn.execute(failed):
        totals[tuple(key)] -= int(n)
    return {key: n for key, n in totals.items() if n}


def class_counts(engine: Engine, model_id: int) -> dict[str, int]:
    """Images per label of the files that are there (missing, failed and out-of-set ones
    left out), counted on the index of present files' labels (``_minus_failed``)."""
    present = (
        sa.select(images.c.label, sa.func.count())
        .where(*_present(model_id), images.c.out_of_set.is_not(True))
        .group_by(images.c.label)
    )
    failed = present.where(*_failed())
    with engine.connect() as conn:
        return {label: n for (label,), n in _minus_failed(conn, present, failed).items()}


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
    """How many present files could not be labeled (the partial index of errors, ``_failed``)."""
    query = sa.select(sa.func.count()).select_from(images).where(*_present(model_id), *_failed())
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


def _confidence_bin(dialect: str, confidence: sa.ColumnElement, bins: int) -> sa.ColumnElement:
    """Which of ``bins`` equal bins of [0, 1] holds ``confidence``: bin i holds
    i/bins <= confidence < (i+1)/bins, bin ``bins`` holds 1.0 exactly (the caller folds it
    into the last), NULL for a confidence outside [0, 1] or none.

    ``floor(confidence * bins)`` can be one off next to a bin's edge (the product rounds);
    the two comparisons with the edges, computed as ``i / bins`` is in Python, put it right,
    so that a row falls where the comparisons with the edges alone would put it.
    """
    scaled = confidence * bins
    # CAST truncates on SQLite (floor for the confidences kept); PostgreSQL's CAST rounds.
    raw = sa.cast(sa.func.floor(scaled) if dialect == "postgresql" else scaled, sa.Integer)
    lower = sa.cast(raw, sa.Float) / float(bins)
    upper = sa.cast(raw + 1, sa.Float) / float(bins)
    corrected = (
        raw - sa.case((confidence < lower, 1), else_=0) + sa.case((confidence >= upper, 1), else_=0)
    )
    return sa.case((sa.and_(confidence >= 0.0, confidence <= 1.0), corrected), else_=None)


def confidence_histograms(engine: Engine, model_id: int, bins: int = 20) -> dict[str, list[int]]:
    """Per label, the count of labeled images (present, no error, not out of set) in each
    of ``bins`` equal bins of confidence over [0, 1] (the last bin holds 1.0).

    One GROUP BY (label, bin) on the index of present files' labels, less the failed files
    (``_minus_failed``): a bin number per row, not a comparison per row and bin."""
    c = images.c
    where = [*_present(model_id), c.label.is_not(None), c.out_of_set.is_not(True)]
    with engine.connect() as conn:

        def binned_counts(*also: sa.ColumnElement) -> sa.Select:
            bin_ = _confidence_bin(conn.dialect.name, c.confidence, bins).label("bin")
            rows = sa.select(c.label, bin_).where(*where, *also).subquery()
            return sa.select(rows.c.label, rows.c.bin, sa.func.count()).group_by(
                rows.c.label, rows.c.bin
            )

        counted = _minus_failed(conn, binned_counts(), binned_counts(*_failed()))
    histograms: dict[str, list[int]] = {}
    for (label, bin_), n in counted.items():
        counts = histograms.setdefault(label, [0] * bins)
        if bin_ is not None:  # a confidence outside [0, 1] or none: a label, in no bin
            counts[min(int(bin_), bins - 1)] += n
    return histograms


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
    failed = [*_present(model_id), *_failed()]
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
    engine: Engine, model_id: int, columns: Sequence[str], *, chunk: int = 1000
) -> Iterator[dict[str, Any]]:
    """Every row of the model (missing and failed ones included) as a dict of ``columns``
    (names of ``images``; ``crm`` always among them), in path order; streamed ``chunk``
    rows at a time (a server-side cursor on PostgreSQL): memory stays flat at any size."""
    names = list(dict.fromkeys([*columns, "crm", "path"]))
    c = images.c
    query = (
        sa.select(*(c[name] for name in names))
        .where(c.model_id == model_id)
        .order_by(c.path)
        .execution_options(yield_per=chunk)
    )
    with engine.connect() as conn:
        for row in conn.execute(query).mappings():
            out = dict(row)
            if out.get("missing_since") is not None:
                out["missing_since"] = _aware(out["missing_since"])
            yield out


def iter_image_columns(
    engine: Engine,
    model_id: int,
    columns: Sequence[str],
    *,
    chunk: int = 10_000,
    reviewed: bool = False,
) -> Iterator[list[Sequence[Any]]]:
    """Every row of the model (missing and failed ones included), in path order, streamed
    from the database ``chunk`` rows at a time, each chunk as its columns: one sequence of
    ``chunk`` values (fewer in the last) per name of ``columns`` (names of ``images``), then
    ``reviewed``'s, then the stored CRM of each row that has no ``roi_share`` (labeled
    before the scan stored it; None for an error, and for every row that has its share).

    Memory stays flat at any size, and the maps of the rows that have their share are not
    read at all: they are most of a row's bytes. The rows come from the driver's cursor as
    it gives them (``driver_chunks``): no row objects, and a chunk's columns are one
    ``zip``; the values are the Python API's (timestamps aware, flags bool, as
    ``iter_image_rows`` gives them).

    ``reviewed``: after ``columns``, the image's review (``reviews.REVIEW_COLUMNS``:
    label_reviewed, label_final, reviewed_by, reviewed_at with its zone), by a LEFT JOIN
    on the index of current reviews (``reviews.with_reviews``: none while there is none).
    """
    c = images.c
    legacy_crm = sa.case((c.roi_share.is_(None), c.crm), else_=None)
    source: Any = images
    extra: list = []
    if reviewed:
        source, extra = with_reviews(engine, images)
    query = (
        sa.select(
            *(c[name] for name in columns), *extra, sa.type_coerce(legacy_crm, sa.LargeBinary)
        )
        .select_from(source)
        .where(c.model_id == model_id)
        .order_by(c.path)
    )
    with engine.connect() as conn, conn.begin():
        as_python = _sqlite_values(query) if conn.dialect.name == "sqlite" else {}
        for rows in driver_chunks(conn, query, chunk):
            values: list[Sequence[Any]] = list(zip(*rows, strict=True))
            for i, convert in as_python.items():
                if values[i].count(None) < len(values[i]):
                    values[i] = [None if v is None else convert(v) for v in values[i]]
            yield values


def _sqlite_values(query: sa.Select) -> dict[int, Callable[[Any], Any]]:
    """What SQLAlchemy's result processing does to ``query``'s columns on SQLite, which
    stores a timestamp as text without its zone (modlabel writes UTC) and a flag as 0 or 1:
    {column position: the conversion of a stored value that is not NULL}."""
    conversions: dict[int, Callable[[Any], Any]] = {}
    for i, column in enumerate(query.selected_columns):
        if isinstance(column.type, sa.DateTime):
            conversions[i] = _sqlite_moment
        elif isinstance(column.type, sa.Boolean):
            conversions[i] = bool
    return conversions


def _sqlite_moment(text: str) -> datetime:
    moment = sqlite_timestamp(text)
    if moment is None:  # not the form SQLAlchemy writes: what its own processing would say
        raise ValueError(f"not a stored timestamp: {text!r}")
    return moment


def load_class_maps(engine: Engine, model_id: int) -> list[dict[str, Any]]:
    query = (
        sa.select(class_maps)
        .where(class_maps.c.model_id == model_id)
        .order_by(class_maps.c.class_name)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
