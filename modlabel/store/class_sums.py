"""Class sums: the class-level average CRM (paper Eq. 8) of every class, kept current.

Eq. 8 averages the CRMs of the images of a class that were classified
correctly. An archive has no ground truth, so an image counts in the average
of its predicted class when it is labeled with a confidence of at least the
model's threshold (``models.class_min_confidence``; ``--class-min-confidence``,
default ``config.DEFAULT_CLASS_MIN_CONFIDENCE``), is not an error, is not
missing and is not flagged out of set (``out_of_set IS NOT TRUE``). Each map
is normalized by its own maximum first (``maps.ClassAverage``), so every image
weighs the same.

The averages are kept as running sums per (model, class) in
``class_maps.map_sum`` (float64) with ``image_count``. Every write of image
rows (a batch of labels, a touched file, a file found missing or back, a
prune) goes through ``track``: the contributions of the rows it touches are
read before and after the write, in the same transaction, and the difference
is added to the sums. A nightly scan so costs time in proportion to the rows
that changed, never to the archive; ``rebuild_class_maps`` recomputes
everything (on a threshold change, or to check the sums).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import codec, geometry, maps
from .schema import class_maps, images, insert_for, models, utcnow


@dataclass(frozen=True)
class ClassMap:
    """One class's average CRM at the feature-map resolution, and its ROI box."""

    class_name: str
    image_count: int
    average: np.ndarray  # (h, w) float32, normalized so its max is 1
    roi_box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) in map cells, x1/y1 exclusive


def class_map_from_sum(
    class_name: str,
    map_sum: np.ndarray,
    count: int,
    *,
    roi_fraction: float = geometry.CLASS_ROI_FRACTION,
) -> ClassMap:
    """The average of ``count`` unit maps whose sum is ``map_sum``, scaled to max 1."""
    average = map_sum / max(count, 1)
    peak = float(average.max()) if average.size else 0.0
    if peak > 0:
        average = average / peak
    box = geometry.roi_box(average, fraction=roi_fraction) if peak > 0 else None
    return ClassMap(
        class_name,
        count,
        average.astype(np.float32),
        tuple(int(v) for v in box) if box is not None else None,
    )


def unit_map(blob: bytes) -> np.ndarray:
    """A stored CRM as it counts in a class average: decoded, divided by its max, float64."""
    return geometry.normalize_unit(codec.decode_map(bytes(blob))).astype(np.float64)


def _counted(model_id: int, threshold: float) -> list:
    """The conditions for an image row to count in its class's average."""
    c = images.c
    return [
        c.model_id == model_id,
        c.label.is_not(None),
        c.error.is_(None),
        c.missing_since.is_(None),
        c.crm.is_not(None),
        c.confidence >= threshold,
        c.out_of_set.is_not(True),
    ]


# -- running sums ---------------------------------------------------------------


@dataclass
class _Sums:
    counts: dict[str, int]
    sums: dict[str, np.ndarray]

    def add(self, label: str, unit: np.ndarray, sign: int = 1) -> None:
        self.counts[label] = self.counts.get(label, 0) + sign
        if label in self.sums:
            self.sums[label] += sign * unit
        else:
            self.sums[label] = sign * unit


def _contributions(conn: sa.Connection, model_id: int, threshold: float, keys: Sequence[str]):
    sums = _Sums({}, {})
    c = images.c
    for start in range(0, len(keys), 500):
        # Looked up by path alone, so that every planner takes the (model_id, path) index
        # (SQLite would otherwise walk the label and confidence index); counted here.
        query = sa.select(
            c.label, c.crm, c.confidence, c.error.is_(None), c.missing_since.is_(None),
            c.out_of_set,
        ).where(c.model_id == model_id, c.path.in_(list(keys[start : start + 500])))  # fmt: skip
        for label, blob, confidence, ok, present, flagged in conn.execute(query):
            if _counts(label, blob, confidence, ok, present, threshold, flagged):
                sums.add(label, unit_map(blob))
    return sums


def _counts(
    label, blob, confidence, ok: bool, present: bool, threshold: float, flagged=None
) -> bool:
    """Does a row count in its class's average (``_counted``, in Python)?"""
    return bool(
        ok
        and present
        and flagged is not True
        and label is not None
        and blob is not None
        and confidence is not None
        and confidence >= threshold
    )


def model_threshold(conn: sa.Connection, model_id: int) -> float | None:
    """The model's ``class_min_confidence``; None while its sums are not built."""
    return conn.execute(
        sa.select(models.c.class_min_confidence).where(models.c.id == model_id)
    ).scalar()


@contextmanager
def track(
    conn: sa.Connection,
    model_id: int,
    keys: Iterable[str],
    *,
    written: Sequence[dict] | None = None,
) -> Iterator[None]:
    """Keep the class sums true across a write of the rows ``keys`` (stored paths).

    Use inside the write's transaction::

        with engine.begin() as conn, aggregate.track(conn, model_id, keys):
            conn.execute(...)  # insert, update or delete those rows

    ``written``: the rows as the write leaves them, when the caller has them
    (an upsert of whole rows), which spares reading them back.
    """
    keys = list(dict.fromkeys(keys))
    threshold = model_threshold(conn, model_id)
    if threshold is None or not keys:
        yield  # sums not built yet: rebuild_class_maps will count everything
        return
    before = _contributions(conn, model_id, threshold, keys)
    yield
    if written is not None:
        after = _Sums({}, {})
        for row in written:
            if _counts(
                row.get("label"),
                row.get("crm"),
                row.get("confidence"),
                row.get("error") is None,
                row.get("missing_since") is None,
                threshold,
                row.get("out_of_set"),
            ):
                after.add(row["label"], unit_map(row["crm"]))  # fmt: skip
    else:
        after = _contributions(conn, model_id, threshold, keys)
    delta = _Sums(dict(after.counts), dict(after.sums))
    for label, unit_sum in before.sums.items():
        delta.counts[label] = delta.counts.get(label, 0) - before.counts[label]
        delta.sums[label] = delta.sums[label] - unit_sum if label in delta.sums else -unit_sum
    changed = [name for name, n in delta.counts.items() if n != 0 or np.any(delta.sums[name])]
    if changed:
        _apply(conn, model_id, {name: (delta.counts[name], delta.sums[name]) for name in changed})


def _apply(conn: sa.Connection, model_id: int, deltas: dict[str, tuple[int, np.ndarray]]) -> None:
    cm = class_maps.c
    rows = conn.execute(
        sa.select(cm.class_name, cm.image_count, cm.map_sum).where(
            cm.model_id == model_id, cm.class_name.in_(list(deltas))
        )
    ).all()
    current = {name: (count, _load_sum(blob)) for name, count, blob in rows}
    for name, (d_count, d_sum) in deltas.items():
        count, total = current.get(name, (0, None))
        count += d_count
        total = d_sum if total is None else total + d_sum
        _store_class(conn, model_id, name, count, total)


def _store_class(
    conn: sa.Connection, model_id: int, name: str, count: int, total: np.ndarray | None
) -> None:
    cm = class_maps.c
    if count <= 0 or total is None:
        # No image counts any more: the row goes, and with it any rounding left in the sum.
        conn.execute(class_maps.delete().where(cm.model_id == model_id, cm.class_name == name))
        return
    class_map = class_map_from_sum(name, total, count)
    upsert_class_map(
        conn,
        model_id,
        name,
        image_count=count,
        crm_blob=codec.encode_map(class_map.average),
        roi_box=class_map.roi_box,
        map_sum=_dump_sum(total),
    )


def _dump_sum(total: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(total, dtype=np.float64), allow_pickle=False)
    return buf.getvalue()


def _load_sum(blob: bytes | None) -> np.ndarray | None:
    if blob is None:
        return None
    return np.load(io.BytesIO(bytes(blob)), allow_pickle=False)


# -- full computations -------------------------------------------------------------


def sum_class_maps(
    engine: Engine, model_id: int, min_confidence: float, *, chunk: int = 1000
) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Count and sum every counted image's unit map, per class, streaming the store."""
    sums = _Sums({}, {})
    c = images.c
    query = (
        sa.select(c.label, c.crm)
        .where(*_counted(model_id, min_confidence))
        .execution_options(yield_per=chunk)
    )
    with engine.connect() as conn:
        for label, blob in conn.execute(query):
            sums.add(label, unit_map(blob))
    return sums.counts, sums.sums


def rebuild_class_maps(
    engine: Engine, model_id: int, class_names: Sequence[str], min_confidence: float
) -> list[ClassMap]:
    """Recompute every class's sums from the stored maps and make ``min_confidence``
    the model's threshold. Reads the whole archive's maps once (O(archive))."""
    counts, sums = sum_class_maps(engine, model_id, min_confidence)
    with engine.begin() as conn:
        conn.execute(class_maps.delete().where(class_maps.c.model_id == model_id))
        for name in class_names:
            if counts.get(name, 0) > 0:
                _store_class(conn, model_id, name, counts[name], sums[name])
        conn.execute(
            models.update()
            .where(models.c.id == model_id)
            .values(class_min_confidence=min_confidence)
        )
    return [class_map_from_sum(n, sums[n], counts[n]) for n in class_names if counts.get(n, 0)]


def ensure_class_maps(
    engine: Engine, model_id: int, class_names: Sequence[str], min_confidence: float
) -> bool:
    """Rebuild the sums when they were built for another threshold (or never); True if so."""
    with engine.connect() as conn:
        threshold = model_threshold(conn, model_id)
    if threshold is not None and threshold == min_confidence:
        return False
    rebuild_class_maps(engine, model_id, class_names, min_confidence)
    return True


def class_average(
    engine: Engine,
    model_id: int,
    class_name: str,
    *,
    min_confidence: float,
    roi_fraction: float = geometry.CLASS_ROI_FRACTION,
) -> ClassMap | None:
    """One class's average at any threshold, computed from the stored maps (not stored)."""
    accumulator = maps.ClassAverage()
    c = images.c
    query = (
        sa.select(c.crm)
        .where(*_counted(model_id, min_confidence), c.label == class_name)
        .execution_options(yield_per=1000)
    )
    with engine.connect() as conn:
        for (blob,) in conn.execute(query):
            accumulator.add(codec.decode_map(bytes(blob)))
    if accumulator.count == 0:
        return None
    return class_map_from_sum(
        class_name,
        accumulator.mean() * accumulator.count,
        accumulator.count,
        roi_fraction=roi_fraction,
    )


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
        insert_for(conn)(class_maps)
        .values(model_id=model_id, class_name=class_name, **values)
        .on_conflict_do_update(
            index_elements=[class_maps.c.model_id, class_maps.c.class_name], set_=values
        )
    )
