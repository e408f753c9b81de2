"""What the report and the commands that only read ask of the store: counts, examples,
histograms, errors by reason, flagged files, every row streamed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .schema import _aware, class_maps, images


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


def load_class_maps(engine: Engine, model_id: int) -> list[dict[str, Any]]:
    query = (
        sa.select(class_maps)
        .where(class_maps.c.model_id == model_id)
        .order_by(class_maps.c.class_name)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
