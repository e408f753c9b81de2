"""The ``images`` table's writes and the scan's lookups: what the store knows of each file,
labeled rows upserted with the class sums kept, files marked missing and pruned."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..dicom import NO_HEADER_COLUMNS
from .class_sums import track
from .runs import ScanProgress, record_progress
from .schema import _aware, images, insert_for, utcnow
from .similar import refresh_embedding_blocks


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


def touch_files(
    engine: Engine,
    model_id: int,
    stats: Iterable[tuple[str, int, float]],
    progress: ScanProgress | None = None,
) -> None:
    """Record a new stat for files whose content hash did not change (and that are there).

    stats: (stored path, size, mtime) per file.
    """
    stats = list(stats)
    if not stats:
        return
    with engine.begin() as conn:
        with track(conn, model_id, [p for p, _, _ in stats]):
            conn.execute(
                images.update()
                .where(images.c.model_id == model_id, images.c.path == sa.bindparam("p"))
                .values(size_bytes=sa.bindparam("s"), mtime=sa.bindparam("m"), missing_since=None),
                [{"p": p, "s": s, "m": m} for p, s, m in stats],
            )
        refresh_embedding_blocks(conn, model_id)  # the search's copy, kept in step
        if progress is not None:
            record_progress(conn, progress, labeled=0, errors=0)


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
    if not paths:
        return 0
    changed = 0
    with engine.begin() as conn:
        for start in range(0, len(paths), 500):
            chunk = list(paths[start : start + 500])
            state = (
                images.c.missing_since.is_(None) if missing else images.c.missing_since.is_not(None)
            )
            with track(conn, model_id, chunk):
                result = conn.execute(
                    images.update()
                    .where(images.c.model_id == model_id, images.c.path.in_(chunk), state)
                    .values(missing_since=utcnow() if missing else None)
                )
            changed += int(result.rowcount or 0)
        refresh_embedding_blocks(conn, model_id)
        if progress is not None:
            record_progress(conn, progress, labeled=0, errors=0)
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
            with track(conn, model_id, paths):
                conn.execute(
                    images.delete().where(
                        images.c.path.in_(paths), *_missing_since(model_id, older_than)
                    )
                )
            refresh_embedding_blocks(conn, model_id)
            deleted += len(paths)


_IMAGE_COLUMNS = tuple(c.name for c in images.columns if c.name not in ("id", "model_id", "path"))
# The out-of-set columns of a row without a score (an error, a model without a threshold).
_NO_OUT_OF_SET = {"ood_score": None, "out_of_set": None}
# The runner-up, the ROI share and the error's kind of a row without them (written by
# other code, or before they existed).
_NO_SECOND_LOOK = {
    "runner_up": None,
    "runner_up_probability": None,
    "roi_share": None,
    "error_kind": None,
    "embedding": None,
}


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
    if not rows:
        return
    defaults = {
        "missing_since": None,
        "source_id": None,
        **NO_HEADER_COLUMNS,
        **_NO_OUT_OF_SET,
        **_NO_SECOND_LOOK,
    }
    rows = list({r["path"]: {**defaults, **r} for r in rows}.values())
    with engine.begin() as conn:
        stmt = insert_for(conn)(images)
        stmt = stmt.on_conflict_do_update(
            index_elements=[images.c.model_id, images.c.path],
            set_={name: stmt.excluded[name] for name in _IMAGE_COLUMNS},
        )
        with track(conn, model_id, [r["path"] for r in rows], written=rows):
            conn.execute(stmt, [{**r, "model_id": model_id} for r in rows])
        refresh_embedding_blocks(conn, model_id)
        if progress is not None:
            errors = sum(1 for r in rows if r["error"] is not None)
            record_progress(conn, progress, labeled=len(rows) - errors, errors=errors)
