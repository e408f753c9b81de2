"""The store's schema: its tables (SQLAlchemy Core), and its versions (Alembic).

Tables:

* ``models``: one row per ONNX file (by content hash) that labeled anything.
* ``images``: one row per (model, path): stat and content hash, label,
  confidence, runner-up, every class probability, the compressed CRM and its ROI
  share, the out-of-set score and flag, a DICOM file's header, or the error (and
  its kind) that kept the file from being labeled.
* ``class_maps``: the class-level average CRM (paper Eq. 8) per (model, class),
  kept as running sums (``class_sums``).
* ``settings``: facts about the database itself (how it searches similar images).
* ``scans``: one row per scan run, for auditing nightly jobs: its status
  (running, finished, failed, interrupted), host and pid, and the counts of
  what it committed.
* ``reviews``: what people said the images are, keyed by stored path and content
  hash (not by a model's row): the human labels, kept apart (``store.reviews``).

Paths are stored as text through ``modlabel.paths`` (any byte string a file
system allows). The schema is created and upgraded by Alembic migrations
(``modlabel/migrations``) by the commands that write; the commands that only
read check it (``check_schema``) and never write it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..errors import DatabaseError

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
    # The second class and its calibrated probability; the CRM's ROI share as shown (the
    # display threshold, at the input size); the kind of an error row (reasons.Kind).
    sa.Column("runner_up", sa.String(80)),
    sa.Column("runner_up_probability", sa.Float),
    sa.Column("roi_share", sa.Float),
    sa.Column("error_kind", sa.String(32)),
    # The GAP embedding, for similar-image search (codec.encode_embeddings: int8 codes of the
    # unit vector and a scale). PostgreSQL with pgvector also has ``embedding_vec``, kept by
    # a trigger and outside this table's metadata (store.similar).
    sa.Column("embedding", sa.LargeBinary),
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
sa.Index("ix_images_model_dicom_modality", images.c.model_id, images.c.dicom_modality)
# The class counts, mean confidences and histograms of the files that are there, read from
# this narrow index alone (migration 0008 says why missing_since is a column of it too).
sa.Index(
    "ix_images_present_labels",
    images.c.model_id,
    images.c.label,
    images.c.out_of_set,
    images.c.confidence,
    images.c.missing_since,
    postgresql_where=images.c.missing_since.is_(None),
    sqlite_where=images.c.missing_since.is_(None),
)
# The duplicates query groups the model's hashes, with their paths and labels, on this
# index alone (migrations 0009, 0012).
_PRESENT_WITH_A_HASH = sa.and_(
    images.c.sha256.is_not(None), images.c.error.is_(None), images.c.missing_since.is_(None)
)
sa.Index(
    "ix_images_present_hashes",
    images.c.model_id,
    images.c.sha256,
    images.c.out_of_set,
    images.c.error,
    images.c.missing_since,
    images.c.path,
    images.c.label,
    postgresql_where=_PRESENT_WITH_A_HASH,
    sqlite_where=_PRESENT_WITH_A_HASH,
)
# model-disagreements reads each model's rows in path order from this index alone (0012).
sa.Index(
    "ix_images_model_path_labels",
    images.c.model_id,
    images.c.path,
    images.c.label,
    images.c.confidence,
    images.c.out_of_set,
    images.c.missing_since,
)
# The errors query's rows in its own order (migration 0009 says why).
sa.Index(
    "ix_images_errors_by_kind",
    images.c.model_id,
    images.c.error_kind,
    images.c.path,
    postgresql_where=images.c.error.is_not(None),
    sqlite_where=images.c.error.is_not(None),
)
# modality-agreement joins its mapping on UPPER(dicom_modality).
sa.Index(
    "ix_images_model_dicom_modality_upper",
    images.c.model_id,
    sa.func.upper(images.c.dicom_modality),
)
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

# Facts about the database itself, one row each: ``similar_search`` (store.similar).
settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# The exact similar-image search's copy of the embeddings (migration 0011, store.similar):
# one row per (model, block of 1024 row ids), the block's searchable rows as arrays. A row
# whose row_count is NULL is stale (triggers on images mark it) and is read from images.
embedding_blocks = sa.Table(
    "embedding_blocks",
    metadata,
    sa.Column(
        "model_id",
        sa.Integer,
        sa.ForeignKey("models.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("block", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("row_count", sa.Integer),
    sa.Column("dims", sa.Integer),
    sa.Column("ids", sa.LargeBinary),
    sa.Column("codes", sa.LargeBinary),
    sa.Column("norms", sa.LargeBinary),
    sa.Column("labels", sa.JSON),
    sa.Column("label_codes", sa.LargeBinary),
    sa.Column("out_of_set", sa.LargeBinary),
)

# What people said the images are (migration 0010): one row per review, never deleted,
# keyed by the image (stored path and content hash), not by a model's row, so that it
# survives relabels, rescans and prunes. label NULL: none of the classes. The latest
# review of an image that is not undone (``undone_at`` NULL) is its review (store.reviews).
reviews = sa.Table(
    "reviews",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("path", PATH_TYPE, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("label", sa.String(80)),
    sa.Column("reviewer", sa.String(255), nullable=False),
    sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("note", sa.Text),
    # The queue that chose the image, or manual / csv (reviews.STRATEGIES).
    sa.Column("strategy", sa.String(32), nullable=False),
    # The model whose labels the reviewer saw, for the record (NULL: unknown).
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id")),
    sa.Column("undone_at", sa.DateTime(timezone=True)),
    sa.Column("undone_by", sa.String(255)),
)
# An image's current review, and that no later one exists, by index probes (0010).
sa.Index(
    "ix_reviews_current",
    reviews.c.path,
    reviews.c.sha256,
    reviews.c.id,
    postgresql_where=reviews.c.undone_at.is_(None),
    sqlite_where=reviews.c.undone_at.is_(None),
)
sa.Index("ix_reviews_reviewed_at", reviews.c.reviewed_at)

# Scan statuses. A "running" row whose heartbeat (``alive_until``) has lapsed, or whose
# process is gone, is shown as interrupted.
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
# A running scan renews ``alive_until`` every HEARTBEAT_SECONDS, to now + ALIVE_SECONDS.
HEARTBEAT_SECONDS = 30.0
ALIVE_SECONDS = 120.0

MIGRATIONS = Path(__file__).parent.parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; modlabel writes UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def insert_for(conn: sa.Connection) -> Callable[[sa.Table], Any]:
    """The dialect's INSERT with ``on_conflict_do_*`` (PostgreSQL and SQLite have both)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - modlabel supports SQLite and PostgreSQL
        raise DatabaseError(f"unsupported database dialect {conn.dialect.name!r}")
    return insert


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
# Held by every transaction that writes reviews (``store.reviews``), one at a time.
REVIEWS_LOCK_KEY = MIGRATION_LOCK_KEY + 1
