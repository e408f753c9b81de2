"""The human labels, kept apart from the model's: the ``reviews`` table's writes and reads.

A review is what a person said an image is: one of the model's classes, or ``None`` for
"none of the classes". It is keyed by the image (``ImageKey``: its stored path and its
content hash), not by a model's row of ``images``, so it holds for every model's row of the
file, and survives relabels, rescans and ``prune``; a file whose content changed is a new
image, unreviewed. Nothing here touches ``images``, and no scan touches ``reviews``.

Reviews are never deleted: undoing one marks it (``undone_at``, ``undone_by``). The latest
review of an image that is not undone is its review; undoing it brings back the one before,
if any. ``current_review_join`` is that rule in SQL, for the reads that show the reviewed
label beside the model's (``images.csv``, the named queries of ``sql/`` spell it the same):
a LEFT JOIN on the partial index ``ix_reviews_current``, two index probes per image row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..errors import ModlabelError, UsageError
from .schema import REVIEWS_LOCK_KEY, _aware, images, models, reviews, utcnow

# The review queues (``modlabel.review``) and the other ways a review is made.
UNCERTAINTY, OUT_OF_SET, DISAGREEMENT, DIVERSE, TYPICAL, RANDOM = (
    "uncertainty",
    "out-of-set",
    "disagreement",
    "diverse",
    "typical",
    "random",
)
QUEUE_STRATEGIES = (UNCERTAINTY, OUT_OF_SET, DISAGREEMENT, DIVERSE, TYPICAL, RANDOM)
MANUAL, CSV = "manual", "csv"
STRATEGIES = (*QUEUE_STRATEGIES, MANUAL, CSV)
# How a person writes "none of the classes" on the command line and in a CSV file.
NONE_WORD = "none"
MAX_REVIEWER_CHARS = 255


@dataclass(frozen=True)
class ImageKey:
    """An image as reviews know it: its stored path (``paths.to_db`` text) and its SHA-256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Review:
    """One row of ``reviews``. ``label`` None: none of the classes. Times are aware, UTC."""

    id: int
    path: str
    sha256: str
    label: str | None
    reviewer: str
    reviewed_at: datetime
    note: str | None
    strategy: str
    model_id: int | None
    undone_at: datetime | None = None
    undone_by: str | None = None

    @property
    def key(self) -> ImageKey:
        return ImageKey(self.path, self.sha256)


def _review(row: Any) -> Review:
    m = row._mapping
    return Review(
        id=int(m["id"]),
        path=m["path"],
        sha256=m["sha256"],
        label=m["label"],
        reviewer=m["reviewer"],
        reviewed_at=_aware(m["reviewed_at"]),
        note=m["note"],
        strategy=m["strategy"],
        model_id=m["model_id"],
        undone_at=_aware(m["undone_at"]) if m["undone_at"] is not None else None,
        undone_by=m["undone_by"],
    )


# -- the current review, in SQL ---------------------------------------------------------


def is_current(review: sa.Table | sa.Alias) -> sa.ColumnElement[bool]:
    """``review`` (an alias of ``reviews``) is its image's current review: not undone, and
    no later review of the image that is not undone (a probe of ``ix_reviews_current``)."""
    later = reviews.alias("later_review")
    return sa.and_(
        review.c.undone_at.is_(None),
        ~sa.exists().where(
            later.c.path == review.c.path,
            later.c.sha256 == review.c.sha256,
            later.c.undone_at.is_(None),
            later.c.id > review.c.id,
        ),
    )


def current_review_join(
    image_rows: sa.Table | sa.Alias = images, *, name: str = "review"
) -> tuple[sa.Alias, sa.ColumnElement[bool]]:
    """(an alias of ``reviews``, the ON clause that joins an image row to its current
    review): ``image_rows.outerjoin(alias, on)`` gives every row, reviewed or not."""
    review = reviews.alias(name)
    on = sa.and_(
        review.c.path == image_rows.c.path,
        review.c.sha256 == image_rows.c.sha256,
        is_current(review),
    )
    return review, on


def unreviewed(image_rows: sa.Table | sa.Alias = images) -> sa.ColumnElement[bool]:
    """``image_rows`` has no current review (the review queues leave the reviewed out)."""
    review = reviews.alias("any_review")
    return ~sa.exists().where(
        review.c.path == image_rows.c.path,
        review.c.sha256 == image_rows.c.sha256,
        review.c.undone_at.is_(None),
    )


def review_columns(review: sa.Alias, image_rows: sa.Table | sa.Alias = images) -> list:
    """The reviewed label beside the model's, as ``images.csv`` and the queries show them:
    ``label_reviewed`` (NULL: none of the classes, or not reviewed), ``label_final`` (the
    review's where there is one, else the model's), ``reviewed_by``, ``reviewed_at``."""
    reviewed = review.c.reviewer.is_not(None)
    return [
        review.c.label.label("label_reviewed"),
        sa.case((reviewed, review.c.label), else_=image_rows.c.label).label("label_final"),
        review.c.reviewer.label("reviewed_by"),
        review.c.reviewed_at.label("reviewed_at"),
    ]


REVIEW_COLUMNS = ("label_reviewed", "label_final", "reviewed_by", "reviewed_at")


def has_reviews(engine: Engine) -> bool:
    """Whether the database holds any review at all (undone ones too): while it holds
    none, the reads that show reviews skip their joins and lookups."""
    with engine.connect() as conn:
        return conn.execute(sa.select(reviews.c.id).limit(1)).first() is not None


def with_reviews(
    engine: Engine, image_rows: sa.Table | sa.Alias = images
) -> tuple[sa.FromClause, list]:
    """(the FROM, the ``review_columns``) of a read that shows each image row's review: the
    rows LEFT JOIN their current review; while the database holds no review at all, the
    rows alone and the columns as constants (NULL, the model's label, NULL, NULL), which
    spares the join's two index probes a row (about a third of streaming the rows)."""
    if has_reviews(engine):
        review, on = current_review_join(image_rows)
        return image_rows.outerjoin(review, on), review_columns(review)
    nothing = [
        sa.null().label("label_reviewed"),
        image_rows.c.label.label("label_final"),
        sa.null().label("reviewed_by"),
        sa.type_coerce(sa.null(), sa.DateTime(timezone=True)).label("reviewed_at"),
    ]
    return image_rows, nothing


# -- which image --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewedImage:
    """The image a review is for, as found in ``images``: its key, the model row it was
    named by (None for a key given as is) and that model's classes."""

    key: ImageKey
    model_id: int | None
    class_names: tuple[str, ...]


def find_image(
    engine: Engine, image: int | str | ImageKey, *, model_id: int | None = None
) -> ReviewedImage:
    """The image named by ``image``: a row id of ``images``, a stored path (the row of
    ``model_id``, else the latest labeled row of that path) or an ``ImageKey``.

    Raises ``ModlabelError`` for an image the database does not hold, or one without a
    content hash (a file that could not be read: there is nothing to look at)."""
    c = images.c
    query = sa.select(c.path, c.sha256, c.model_id, models.c.class_names).join(
        models, models.c.id == c.model_id
    )
    if isinstance(image, ImageKey):
        query = query.where(c.path == image.path, c.sha256 == image.sha256)
    elif isinstance(image, int):
        query = query.where(c.id == image)
    else:
        query = query.where(c.path == image)
    if model_id is not None and not isinstance(image, int):
        query = query.where(c.model_id == model_id)
    query = query.order_by(c.missing_since.is_not(None), c.labeled_at.desc(), c.id.desc())
    with engine.connect() as conn:
        row = conn.execute(query.limit(1)).first()
    named = f"#{image}" if isinstance(image, int) else getattr(image, "path", image)
    if row is None:
        if isinstance(image, ImageKey):
            return ReviewedImage(image, model_id, _class_names(engine, model_id))
        raise ModlabelError(f"{named}: no such image in the database")
    if row.sha256 is None:
        raise ModlabelError(f"{named}: the file could not be read when scanned; nothing to review")
    return ReviewedImage(ImageKey(row.path, row.sha256), row.model_id, tuple(row.class_names))


def _class_names(engine: Engine, model_id: int | None) -> tuple[str, ...]:
    query = sa.select(models.c.class_names)
    if model_id is not None:
        query = query.where(models.c.id == model_id)
    with engine.connect() as conn:
        return tuple(dict.fromkeys(n for (names,) in conn.execute(query) for n in names))


def check_label(label: str | None, class_names: Sequence[str]) -> str | None:
    """``label`` if it is one of ``class_names`` (None: none of the classes); a
    ``UsageError`` naming the classes otherwise."""
    if label is None or label in class_names:
        return label
    raise UsageError(
        f"{label!r} is no class of the model; known: {', '.join(class_names)} "
        f"(or {NONE_WORD}: none of the classes)"
    )


def check_reviewer(reviewer: str) -> str:
    """``reviewer`` without surrounding blanks; a ``UsageError`` for an empty or long one."""
    reviewer = reviewer.strip()
    if not reviewer or len(reviewer) > MAX_REVIEWER_CHARS:
        raise UsageError(f"a reviewer is a name of 1 to {MAX_REVIEWER_CHARS} characters")
    return reviewer


# -- writes -------------------------------------------------------------------------------


def record_review(
    engine: Engine,
    image: int | str | ImageKey,
    label: str | None,
    *,
    reviewer: str,
    strategy: str,
    note: str | None = None,
    model_id: int | None = None,
    reviewed_at: datetime | None = None,
) -> Review:
    """Record that ``reviewer`` says ``image`` (``find_image``) is ``label`` (a class of
    the model, or None: none of the classes); returns the new review, now the image's.

    ``strategy``: the queue that chose the image (``QUEUE_STRATEGIES``), or ``manual`` /
    ``csv``. ``model_id``: the model whose labels the reviewer saw (default: the model of
    the row ``image`` names). An earlier review of the image stays, superseded."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown review strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    reviewer = check_reviewer(reviewer)
    found = find_image(engine, image, model_id=model_id)
    check_label(label, found.class_names)
    values = {
        "path": found.key.path,
        "sha256": found.key.sha256,
        "label": label,
        "reviewer": reviewer,
        "reviewed_at": reviewed_at or utcnow(),
        "note": _note(note),
        "strategy": strategy,
        "model_id": model_id if model_id is not None else found.model_id,
    }
    with _writing_reviews(engine) as conn:
        (new_id,) = conn.execute(reviews.insert().values(**values)).inserted_primary_key
        row = conn.execute(sa.select(reviews).where(reviews.c.id == new_id)).one()
    return _review(row)


def record_reviews(engine: Engine, entries: Sequence[dict[str, Any]], *, strategy: str) -> int:
    """Record many reviews in one transaction: each entry has ``image``, ``label``,
    ``reviewer`` and optionally ``note`` (as ``record_review`` takes them). All are
    checked first, then all are written, or none; returns how many."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown review strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    rows = []
    now = utcnow()
    for entry in entries:
        found = find_image(engine, entry["image"])
        check_label(entry["label"], found.class_names)
        rows.append(
            {
                "path": found.key.path,
                "sha256": found.key.sha256,
                "label": entry["label"],
                "reviewer": check_reviewer(entry["reviewer"]),
                "reviewed_at": now,
                "note": _note(entry.get("note")),
                "strategy": strategy,
                "model_id": found.model_id,
            }
        )
    if rows:
        with _writing_reviews(engine) as conn:
            conn.execute(reviews.insert(), rows)
    return len(rows)


@contextlib.contextmanager
def _writing_reviews(engine: Engine) -> Iterator[sa.Connection]:
    """A transaction that writes reviews, one at a time against every other: BEGIN
    IMMEDIATE on SQLite, and on PostgreSQL the reviews' advisory lock, held until it ends.
    So an undo's look at an image's current review and its update of it see the same
    reviews: none recorded or undone by another process in between."""
    with engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": REVIEWS_LOCK_KEY})
        yield conn


def _note(note: str | None) -> str | None:
    return (note.strip() or None) if note is not None else None


class NotTheCurrentReview(ModlabelError):
    """The review to take back is not its image's review any more (``undo_review``'s
    ``review_id``): another came since, or it was undone elsewhere."""


def undo_review(
    engine: Engine,
    image: int | str | ImageKey,
    *,
    reviewer: str,
    model_id: int | None = None,
    review_id: int | None = None,
) -> Review:
    """Take back the image's current review (mark it undone by ``reviewer``); the review
    before it, if any, is the image's review again. Returns the review undone; a
    ``ModlabelError`` when the image has none. ``review_id``: take it back only if it is
    that review, checked in the same transaction (``NotTheCurrentReview`` otherwise), so
    that a review recorded in between by someone else is never the one undone, and a
    review is undone once (``_writing_reviews``)."""
    reviewer = check_reviewer(reviewer)
    found = find_image(engine, image, model_id=model_id)
    current = reviews.alias("review")
    with _writing_reviews(engine) as conn:
        row = conn.execute(
            sa.select(current).where(
                current.c.path == found.key.path,
                current.c.sha256 == found.key.sha256,
                is_current(current),
            )
        ).first()
        if row is None and review_id is None:
            raise ModlabelError(f"{found.key.path}: no review to undo")
        if review_id is not None and (row is None or row.id != review_id):
            raise NotTheCurrentReview(
                f"{found.key.path}: review {review_id} is not the image's review any more"
            )
        conn.execute(
            reviews.update()
            .where(reviews.c.id == row.id, reviews.c.undone_at.is_(None))
            .values(undone_at=utcnow(), undone_by=reviewer)
        )
        undone = conn.execute(sa.select(reviews).where(reviews.c.id == row.id)).one()
    return _review(undone)


# -- reads --------------------------------------------------------------------------------


def current_review(engine: Engine, image: int | str | ImageKey) -> Review | None:
    """The image's review (the latest not undone), or None."""
    key = image if isinstance(image, ImageKey) else find_image(engine, image).key
    return current_reviews(engine, [key]).get(key)


def current_reviews(
    engine: Engine, keys: Sequence[ImageKey], *, any_known: bool = False
) -> dict[ImageKey, Review]:
    """The current review of each of ``keys`` that has one (the reviewed label per image,
    for a page of images: serve, the report). ``any_known``: the caller knows that the
    database holds reviews (``has_reviews`` is not asked again)."""
    found: dict[ImageKey, Review] = {}
    if not keys or not (any_known or has_reviews(engine)):
        return found
    review = reviews.alias("review")
    paths = sorted({k.path for k in keys})
    wanted = set(keys)
    for start in range(0, len(paths), 500):  # within every backend's parameter limit
        query = sa.select(review).where(
            review.c.path.in_(paths[start : start + 500]), is_current(review)
        )
        with engine.connect() as conn:
            for row in conn.execute(query):
                r = _review(row)
                if r.key in wanted:
                    found[r.key] = r
    return found


def latest_reviews(
    engine: Engine, *, limit: int = 20, include_undone: bool = False
) -> list[Review]:
    """The latest reviews, newest first (undone ones too with ``include_undone``)."""
    query = sa.select(reviews).order_by(reviews.c.reviewed_at.desc(), reviews.c.id.desc())
    if not include_undone:
        query = query.where(reviews.c.undone_at.is_(None))
    with engine.connect() as conn:
        return [_review(r) for r in conn.execute(query.limit(limit))]


def review_history(engine: Engine, key: ImageKey) -> list[Review]:
    """Every review of the image, undone ones too, oldest first."""
    query = (
        sa.select(reviews)
        .where(reviews.c.path == key.path, reviews.c.sha256 == key.sha256)
        .order_by(reviews.c.id)
    )
    with engine.connect() as conn:
        return [_review(r) for r in conn.execute(query)]


def count_reviews(engine: Engine) -> int:
    """How many images have a review (a current one)."""
    review = reviews.alias("review")
    query = sa.select(sa.func.count()).select_from(review).where(is_current(review))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


@dataclass(frozen=True)
class ReviewedRow:
    """A model's present, labeled row of an image that has a review, with the review.

    ``probabilities``: {class: calibrated probability} as the scan stored them."""

    row_id: int
    path: str
    label: str | None  # the model's (None: it abstained on an out-of-set image)
    confidence: float | None
    probabilities: dict[str, float] | None
    out_of_set: bool | None
    dicom_modality: str | None
    review: Review


def reviewed_rows(engine: Engine, model_id: int) -> Iterator[ReviewedRow]:
    """Every present row of the model that was labeled (no error) and whose image has a
    review, with its review, in path order; streamed."""
    c = images.c
    review, on = current_review_join(images)
    query = (
        sa.select(
            c.id,
            c.path,
            c.label,
            c.confidence,
            c.probabilities,
            c.out_of_set,
            c.dicom_modality,
            *[review.c[col.name].label(f"r_{col.name}") for col in reviews.columns],
        )
        .select_from(images.join(review, on))
        .where(c.model_id == model_id, c.missing_since.is_(None), c.error.is_(None))
        .order_by(c.path)
        .execution_options(yield_per=1000)
    )
    with engine.connect() as conn:
        for row in conn.execute(query):
            m = row._mapping
            r = _review(_Prefixed(m, "r_"))
            yield ReviewedRow(
                row_id=int(m["id"]),
                path=m["path"],
                label=m["label"],
                confidence=m["confidence"],
                probabilities=m["probabilities"],
                out_of_set=m["out_of_set"],
                dicom_modality=m["dicom_modality"],
                review=r,
            )


class _Prefixed:
    """A row's ``prefix``-named columns as a row of their own (``_review`` reads it)."""

    def __init__(self, mapping: Any, prefix: str) -> None:
        self._mapping = {k[len(prefix) :]: v for k, v in mapping.items() if k.startswith(prefix)}
