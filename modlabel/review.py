"""The review loop's queue and imports: which images a person should look at next, and
many reviews at once from a CSV file.

``review_queue`` lists the next ``n`` images of a model to look at, leaving out the ones
that have a review already (``store.reviews``), by one of five strategies:

* ``uncertainty``: the smallest top-2 margin first, p(label) - p(runner-up) of the
  calibrated probabilities (margin sampling; Scheffer et al. 2001, Settles 2009 §3.1):
  where the model hesitated between two classes.
* ``out-of-set``: the images the model flagged out of set first, highest out-of-set score
  first (``modlabel.ood``), then the unflagged ones nearest to being flagged.
* ``disagreement``: DICOM images whose header's Modality contradicts the label, by the
  mapping of the named query ``modality-agreement`` (``sql/modality-agreement.sql``, its
  one home: edit its VALUES list and the queue follows), least confident first.
* ``diverse``: a spread-out sample of the stored GAP embeddings by k-center greedy
  (Gonzalez 1985; Sener & Savarese 2018, the core-set approach): each pick is the image
  farthest (cosine distance) from every image picked or reviewed before. Bounded: it
  works on a seeded uniform sample of at most ``DIVERSE_POOL`` unreviewed images
  (reservoir sampling while streaming), at most ``DIVERSE_POOL`` reviewed ones as the
  starting centres; memory ``2 * DIVERSE_POOL * K`` float32.
* ``random``: a seeded uniform sample, for an unbiased estimate of the archive's accuracy
  (``modlabel.accuracy``): each image's place is a hash of the seed and its path, so the
  same seed gives the same order, and asking again after reviewing gives the next images
  of it. The others choose the images where the model is likeliest wrong, which makes any
  accuracy measured on them biased.

``label`` restricts any strategy to the images the model gave that label.

``import_reviews_csv`` records the reviews of a CSV file of ``path,label[,note,reviewer]``:
each bad line is one error naming the line and why, and the good lines are recorded.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import spreadsheet, store
from .codec import MapCodecError, decode_embeddings
from .errors import InputError, ModlabelError, UsageError
from .queries import load_query
from .similar import stored_key
from .store.reviews import (
    CSV,
    DISAGREEMENT,
    DIVERSE,
    NONE_WORD,
    OUT_OF_SET,
    QUEUE_STRATEGIES,
    RANDOM,
    UNCERTAINTY,
    ImageKey,
    check_label,
    check_reviewer,
    current_review_join,
    find_image,
    unreviewed,
)

# The diverse queue's bound: images sampled (and reviewed images kept as centres).
DIVERSE_POOL = 10_000
# Rows read from the database at a time by the streamed strategies.
CHUNK_ROWS = 5000
# The named query whose VALUES list maps DICOM Modality codes to classes.
MODALITY_QUERY = "modality-agreement"


@dataclass(frozen=True)
class QueueItem:
    """An image to look at: the model's row and why the queue chose it.

    ``score``: the strategy's own number (uncertainty: the top-2 margin; out-of-set: the
    out-of-set score; disagreement: the confidence; diverse: the cosine distance to the
    nearest image already picked or reviewed, None for the first pick without one;
    random: the image's place in [0, 1) of the seeded order)."""

    row_id: int
    path: str  # stored text (paths.display_path shows it)
    sha256: str
    label: str | None
    confidence: float | None
    runner_up: str | None
    runner_up_probability: float | None
    out_of_set: bool | None
    ood_score: float | None
    dicom_modality: str | None
    strategy: str
    score: float | None
    why: str

    @property
    def key(self) -> ImageKey:
        return ImageKey(self.path, self.sha256)


def _candidates(model_id: int, label: str | None) -> list:
    """The rows a queue may list: the model's present, labeled images (no error, a content
    hash) that have no review yet, of ``label`` when given."""
    c = store.images.c
    where = [
        c.model_id == model_id,
        c.missing_since.is_(None),
        c.error.is_(None),
        c.sha256.is_not(None),
        unreviewed(store.images),
    ]
    if label is not None:
        where.append(c.label == label)
    return where


_ITEM_COLUMNS = (
    "id",
    "path",
    "sha256",
    "label",
    "confidence",
    "runner_up",
    "runner_up_probability",
    "out_of_set",
    "ood_score",
    "dicom_modality",
)


def _item_columns() -> list:
    return [store.images.c[name] for name in _ITEM_COLUMNS]


def _item(row: Any, strategy: str, score: float | None, why: str) -> QueueItem:
    m = row._mapping
    return QueueItem(
        row_id=int(m["id"]),
        path=m["path"],
        sha256=m["sha256"],
        label=m["label"],
        confidence=m["confidence"],
        runner_up=m["runner_up"],
        runner_up_probability=m["runner_up_probability"],
        out_of_set=m["out_of_set"],
        ood_score=m["ood_score"],
        dicom_modality=m["dicom_modality"],
        strategy=strategy,
        score=score,
        why=why,
    )


def review_queue(
    engine: Engine,
    model_id: int,
    strategy: str,
    *,
    label: str | None = None,
    n: int = 20,
    seed: int = 0,
) -> list[QueueItem]:
    """The next ``n`` unreviewed images of the model to look at, by ``strategy`` (one of
    ``QUEUE_STRATEGIES``; see the module's docstring), of ``label`` when given. ``seed``:
    the random and diverse queues' seed (the same seed, the same queue)."""
    if strategy not in QUEUE_STRATEGIES:
        raise UsageError(
            f"unknown queue strategy {strategy!r}; choose from {', '.join(QUEUE_STRATEGIES)}"
        )
    if n < 1:
        raise UsageError(f"a queue lists at least one image, not {n}")
    if label is not None:
        model = store.pick_model(engine, _identity(engine, model_id))
        check_label(label, model.class_names)
    queue = {
        UNCERTAINTY: _uncertainty,
        OUT_OF_SET: _out_of_set,
        DISAGREEMENT: _disagreement,
        DIVERSE: _diverse,
        RANDOM: _random,
    }[strategy]
    return queue(engine, model_id, label, n, seed)


def _identity(engine: Engine, model_id: int) -> str:
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(store.models.c.identity).where(store.models.c.id == model_id)
        ).scalar()
    if found is None:
        raise ModlabelError(f"no model with id {model_id} in the database")
    return found


def _uncertainty(
    engine: Engine, model_id: int, label: str | None, n: int, seed: int
) -> list[QueueItem]:
    c = store.images.c
    margin = (c.confidence - sa.func.coalesce(c.runner_up_probability, 0.0)).label("margin")
    query = (
        sa.select(*_item_columns(), margin)
        .where(*_candidates(model_id, label), c.confidence.is_not(None))
        .order_by(margin, c.path)
        .limit(n)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        _item(
            r,
            UNCERTAINTY,
            float(r.margin),
            f"top-2 margin {r.margin:.3f} ({r.label} vs {r.runner_up or '-'})",
        )
        for r in rows
    ]


def _out_of_set(
    engine: Engine, model_id: int, label: str | None, n: int, seed: int
) -> list[QueueItem]:
    c = store.images.c
    flagged_first = sa.case((c.out_of_set.is_(True), 0), else_=1)
    query = (
        sa.select(*_item_columns())
        .where(*_candidates(model_id, label))
        .order_by(flagged_first, c.ood_score.desc().nulls_last(), c.path)
        .limit(n)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    items = []
    for r in rows:
        score = float(r.ood_score) if r.ood_score is not None else None
        shown = f"{score:.3g}" if score is not None else "none (the model has no threshold)"
        why = ("flagged out of set" if r.out_of_set else "not flagged") + f", score {shown}"
        items.append(_item(r, OUT_OF_SET, score, why))
    return items


_MODALITY_PAIR = re.compile(r"\(\s*'([^']+)'\s*,\s*'([^']+)'\s*\)")


def modality_mapping() -> dict[str, str]:
    """{DICOM Modality code (upper case): class} as the named query ``modality-agreement``
    maps them (the pairs of its ``expected`` VALUES list)."""
    body = load_query(MODALITY_QUERY).body
    values = body.split("VALUES", 1)[1].split("SELECT", 1)[0] if "VALUES" in body else ""
    mapping = {code.upper(): label for code, label in _MODALITY_PAIR.findall(values)}
    if not mapping:
        raise ModlabelError(f"sql/{MODALITY_QUERY}.sql maps no Modality code to a class")
    return mapping


def _disagreement(
    engine: Engine, model_id: int, label: str | None, n: int, seed: int
) -> list[QueueItem]:
    c = store.images.c
    mapping = modality_mapping()
    expected = sa.case(mapping, value=sa.func.upper(c.dicom_modality), else_=None).label("expected")
    query = (
        sa.select(*_item_columns(), expected)
        .where(
            *_candidates(model_id, label),
            sa.func.upper(c.dicom_modality).in_(sorted(mapping)),
            c.label.is_not(None),
            c.label != expected,
        )
        .order_by(c.confidence.asc().nulls_last(), c.path)
        .limit(n)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        _item(
            r,
            DISAGREEMENT,
            r.confidence,
            f"DICOM Modality {r.dicom_modality} says {r.expected}, the model {r.label}",
        )
        for r in rows
    ]


def _place(seed: int, path: str) -> int:
    """The image's place in the seeded random order: 64 bits of BLAKE2b(seed, path)."""
    digest = hashlib.blake2b(f"{seed}\0{path}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def _random(engine: Engine, model_id: int, label: str | None, n: int, seed: int) -> list[QueueItem]:
    c = store.images.c
    query = (
        sa.select(c.id, c.path)
        .where(*_candidates(model_id, label))
        .execution_options(yield_per=CHUNK_ROWS)
    )
    with engine.connect() as conn:
        rows = conn.execute(query)
        first = heapq.nsmallest(n, ((_place(seed, p), i) for i, p in rows))
    places = {row_id: place / 2.0**64 for place, row_id in first}
    found = _rows_by_id(engine, list(places))
    return [
        _item(found[row_id], RANDOM, place, f"seeded random sample (seed {seed})")
        for row_id, place in places.items()
    ]


def _rows_by_id(engine: Engine, ids: Sequence[int]) -> dict[int, Any]:
    if not ids:
        return {}
    query = sa.select(*_item_columns()).where(store.images.c.id.in_(list(ids)))
    with engine.connect() as conn:
        return {int(r.id): r for r in conn.execute(query)}


@dataclass
class _Reservoir:
    """A seeded uniform sample of at most ``size`` items of a stream (Algorithm R,
    Vitter 1985): ``ids`` and their ``blobs``."""

    size: int
    rng: np.random.Generator
    seen: int = 0
    ids: list[int] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)

    def offer(self, item_id: int, blob: bytes) -> None:
        self.seen += 1
        if len(self.ids) < self.size:
            self.ids.append(item_id)
            self.blobs.append(blob)
            return
        at = int(self.rng.integers(0, self.seen))
        if at < self.size:
            self.ids[at], self.blobs[at] = item_id, blob


def _embedding_sample(
    engine: Engine, where: list, size: int, rng: np.random.Generator, *, reviewed: bool
) -> _Reservoir:
    """A reservoir sample of the rows matching ``where`` that have an embedding (joined to
    their current review when ``reviewed``), in path order before sampling."""
    c = store.images.c
    source: Any = store.images
    if reviewed:
        review, on = current_review_join(store.images)
        source = store.images.join(review, on)
    query = (
        sa.select(c.id, c.embedding)
        .select_from(source)
        .where(*where, c.embedding.is_not(None))
        .order_by(c.path)
        .execution_options(yield_per=CHUNK_ROWS)
    )
    sample = _Reservoir(size, rng)
    with engine.connect() as conn:
        for row_id, blob in conn.execute(query):
            sample.offer(int(row_id), bytes(blob))
    return sample


def _vectors(blobs: list[bytes]) -> np.ndarray:
    try:
        return decode_embeddings(blobs)
    except MapCodecError as exc:
        raise ModlabelError(f"a stored embedding cannot be read: {exc}") from None


def k_center_greedy(
    candidates: np.ndarray, centers: np.ndarray, n: int, *, first: int = 0
) -> list[tuple[int, float | None]]:
    """k-center greedy (Gonzalez 1985; Sener & Savarese 2018): ``n`` rows of
    ``candidates`` (M, K) unit vectors, each the farthest by cosine distance (1 - u.v)
    from ``centers`` (C, K) and the rows picked before it. With no centres the first pick
    is row ``first``. Returns (row, its distance to the nearest centre before it; None for
    a first pick without centres). Time O(n M K + C M K), memory O(M)."""
    m = candidates.shape[0]
    nearest = np.full(m, np.inf, dtype=np.float64)
    for start in range(0, centers.shape[0], 1024):
        block = 1.0 - candidates @ centers[start : start + 1024].T  # (M, <=1024)
        np.minimum(nearest, block.min(axis=1), out=nearest)
    picked: list[tuple[int, float | None]] = []
    for _ in range(min(n, m)):
        if np.isinf(nearest).all():
            row, distance = first, None
        else:
            row = int(np.argmax(nearest))
            distance = float(nearest[row])
            if distance <= -np.inf:  # every candidate picked already
                break
        picked.append((row, distance))
        np.minimum(nearest, 1.0 - candidates @ candidates[row], out=nearest)
        nearest[row] = -np.inf  # never picked twice
    return picked


def _diverse(
    engine: Engine, model_id: int, label: str | None, n: int, seed: int
) -> list[QueueItem]:
    c = store.images.c
    rng = np.random.default_rng(seed)
    pool = _embedding_sample(
        engine, _candidates(model_id, label), DIVERSE_POOL, rng, reviewed=False
    )
    if not pool.ids:
        return []
    present = [c.model_id == model_id, c.missing_since.is_(None), c.error.is_(None)]
    done = _embedding_sample(engine, present, DIVERSE_POOL, rng, reviewed=True)
    candidates = _vectors(pool.blobs)
    k = candidates.shape[1]
    centers = _vectors(done.blobs) if done.ids else np.zeros((0, k), np.float32)
    if centers.shape[1] != k:
        raise ModlabelError("the stored embeddings of the model differ in length")
    first = int(rng.integers(0, len(pool.ids)))
    picked = k_center_greedy(candidates, centers, n, first=first)
    found = _rows_by_id(engine, [pool.ids[i] for i, _ in picked])
    items = []
    for i, distance in picked:
        why = (
            "a seeded first pick"
            if distance is None
            else f"cosine distance {distance:.3f} to the nearest image picked or reviewed"
        )
        items.append(_item(found[pool.ids[i]], DIVERSE, distance, why))
    return items


# -- reviews from a CSV file -------------------------------------------------------------

CSV_COLUMNS = ("path", "label", "note", "reviewer")


@dataclass(frozen=True)
class CsvLineError:
    """A line of a reviews CSV that was not recorded, and why."""

    line: int  # 1-based, as an editor numbers the file's lines
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class CsvImport:
    """What ``import_reviews_csv`` did: reviews recorded, lines refused (each with why),
    and lines left without a label (not reviewed yet: a queue's CSV half filled in)."""

    recorded: int
    errors: list[CsvLineError]
    unlabeled: int = 0


def parse_label(text: str) -> str | None:
    """A label as a person writes it: ``none`` (any case) is none of the classes."""
    text = text.strip()
    return None if text.lower() == NONE_WORD else text


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str] | dict[str, str]]]:
    """(line number, cells) of each non-empty row: a list of cells, or, in a file whose
    first row is a header naming ``path`` and ``label``, a dict of the CSV_COLUMNS there
    (other columns ignored: a queue's ``--format csv``)."""
    header: dict[str, int] | None = None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                names = [cell.strip().lower() for cell in cells]
                if reader.line_num == 1 and "path" in names and "label" in names:
                    header = {n: names.index(n) for n in CSV_COLUMNS if n in names}
                    continue
                cells = [spreadsheet.restore(cell) for cell in cells]
                if header is None:
                    yield reader.line_num, cells
                else:
                    yield (
                        reader.line_num,
                        {n: cells[i] if i < len(cells) else "" for n, i in header.items()},
                    )
    except OSError as exc:
        raise InputError(f"{path}: cannot read the reviews: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a CSV file of reviews: {exc}") from None


def import_reviews_csv(
    engine: Engine,
    path: str | Path,
    *,
    model_id: int,
    reviewer: str,
    strategy: str = CSV,
) -> CsvImport:
    """Record the reviews of a CSV file: columns path,label[,note,reviewer], one review a
    line; a header row naming them is optional, and with one the columns are read by name
    (others are ignored). ``path``: a stored image (its path, a file's path as a scan
    stores it, or #ID); ``label``: a class of the model, or ``none``; ``reviewer``: the
    line's, else ``reviewer``. Lines that name the same image record in order, the last
    one the image's review; a line whose label is empty is not reviewed yet, and skipped.

    Every line is checked first; the good ones are then recorded together, and each bad
    one is a ``CsvLineError`` naming its line and why (nothing is recorded for it)."""
    path = Path(path)
    model = store.pick_model(engine, _identity(engine, model_id))
    entries: list[dict[str, Any]] = []
    errors: list[CsvLineError] = []
    unlabeled = 0
    for line, cells in _csv_rows(path):
        if isinstance(cells, list):
            if len(cells) < 2 or len(cells) > len(CSV_COLUMNS):
                errors.append(
                    CsvLineError(
                        line,
                        f"{len(cells)} columns; expected {','.join(CSV_COLUMNS[:2])}"
                        f"[,{','.join(CSV_COLUMNS[2:])}]",
                    )
                )
                continue
            cells = dict(zip(CSV_COLUMNS, cells, strict=False))
        image = cells.get("path", "").strip()
        note, who = cells.get("note", "").strip(), cells.get("reviewer", "").strip()
        if not image:
            errors.append(CsvLineError(line, "no path"))
            continue
        label = parse_label(cells.get("label", ""))
        if label == "":
            unlabeled += 1
            continue
        row_id = stored_key(engine, model.id, image)
        if row_id is None:
            errors.append(CsvLineError(line, f"{image}: no such image of the model"))
            continue
        try:
            check_label(label, find_image(engine, row_id).class_names)
            check_reviewer(who or reviewer)
        except ModlabelError as exc:
            errors.append(CsvLineError(line, str(exc)))
            continue
        entries.append(
            {"image": row_id, "label": label, "note": note or None, "reviewer": who or reviewer}
        )
    recorded = store.record_reviews(engine, entries, strategy=strategy)
    return CsvImport(recorded, errors, unlabeled)
