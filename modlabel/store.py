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
* ``scans``: one row per scan run, for auditing nightly jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .errors import DatabaseError

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
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
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
    sa.UniqueConstraint("model_id", "path", name="uq_images_model_path"),
)
sa.Index("ix_images_model_label", images.c.model_id, images.c.label)
sa.Index("ix_images_sha256", images.c.sha256)

class_maps = sa.Table(
    "class_maps",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), primary_key=True),
    sa.Column("class_name", sa.String(80), primary_key=True),
    sa.Column("image_count", sa.Integer, nullable=False),
    sa.Column("crm", sa.LargeBinary, nullable=False),
    sa.Column("roi_box", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

scans = sa.Table(
    "scans",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
    sa.Column("roots", sa.JSON, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("seen", sa.Integer, nullable=False, default=0),
    sa.Column("labeled", sa.Integer, nullable=False, default=0),
    sa.Column("unchanged", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Integer, nullable=False, default=0),
)

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def open_db(url: str, *, migrate: bool = True) -> Engine:
    """An engine for ``url`` with the schema upgraded to the newest version."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Waiting on a lock beats failing when two jobs touch the same file.
        kwargs["connect_args"] = {"timeout": 60}
    try:
        engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        with engine.connect():
            pass
    except sa.exc.ArgumentError as exc:
        raise DatabaseError(f"not a database URL: {url!r} ({exc})") from None
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise DatabaseError(f"cannot open database {_safe(url)}: {exc.orig}") from None
    except ModuleNotFoundError as exc:
        raise DatabaseError(f"no driver for {_safe(url)}: {exc}") from None
    if migrate:
        upgrade_schema(engine)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def upgrade_schema(engine: Engine) -> None:
    """Run Alembic's migrations up to head on ``engine``."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


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
) -> int:
    """The id of the model row for ``identity``, inserted on first use."""
    with engine.begin() as conn:
        found = conn.execute(sa.select(models.c.id).where(models.c.identity == identity)).scalar()
        if found is not None:
            conn.execute(models.update().where(models.c.id == found).values(path=path))
            return int(found)
        return int(
            conn.execute(
                models.insert().values(
                    identity=identity,
                    sha256=sha256,
                    backbone=backbone,
                    class_names=list(class_names),
                    input_size=list(input_size),
                    activation_shape=list(activation_shape),
                    path=path,
                    created_at=utcnow(),
                )
            ).inserted_primary_key[0]
        )


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


def known_files(engine: Engine, model_id: int, paths: Sequence[str]) -> dict[str, KnownFile]:
    """What the database already holds for these paths under this model."""
    found: dict[str, KnownFile] = {}
    # Chunked so that the IN list stays within every backend's parameter limit.
    for start in range(0, len(paths), 500):
        chunk = list(paths[start : start + 500])
        query = sa.select(
            images.c.path,
            images.c.size_bytes,
            images.c.mtime,
            images.c.sha256,
            images.c.error.is_not(None),
        ).where(images.c.model_id == model_id, images.c.path.in_(chunk))
        with engine.connect() as conn:
            for path, size, mtime, digest, failed in conn.execute(query):
                found[path] = KnownFile(int(size), float(mtime), digest, bool(failed))
    return found


def touch_files(engine: Engine, model_id: int, stats: Iterable[tuple[str, int, float]]) -> None:
    """Record a new stat for files whose content hash did not change."""
    stats = list(stats)
    if not stats:
        return
    with engine.begin() as conn:
        conn.execute(
            images.update()
            .where(images.c.model_id == model_id, images.c.path == sa.bindparam("p"))
            .values(size_bytes=sa.bindparam("s"), mtime=sa.bindparam("m")),
            [{"p": p, "s": s, "m": m} for p, s, m in stats],
        )


def write_image_rows(engine: Engine, model_id: int, rows: Sequence[dict[str, Any]]) -> None:
    """Insert or replace image rows (one transaction: a batch lands whole or not at all)."""
    if not rows:
        return
    rows = list({r["path"]: r for r in rows}.values())  # one row per path: the last wins
    paths = [r["path"] for r in rows]
    with engine.begin() as conn:
        conn.execute(images.delete().where(images.c.model_id == model_id, images.c.path.in_(paths)))
        conn.execute(images.insert(), [{**r, "model_id": model_id} for r in rows])


def iter_class_maps(
    engine: Engine,
    model_id: int,
    class_name: str,
    *,
    min_confidence: float = 0.0,
    chunk: int = 1000,
) -> Iterator[bytes]:
    """Stream the stored CRM blobs of the images labeled ``class_name``."""
    query = (
        sa.select(images.c.crm)
        .where(
            images.c.model_id == model_id,
            images.c.label == class_name,
            images.c.error.is_(None),
            images.c.crm.is_not(None),
            images.c.confidence >= min_confidence,
        )
        .order_by(images.c.id)
        .execution_options(yield_per=chunk)
    )
    with engine.connect() as conn:
        for (blob,) in conn.execute(query):
            yield bytes(blob)


def class_counts(engine: Engine, model_id: int) -> dict[str, int]:
    query = (
        sa.select(images.c.label, sa.func.count())
        .where(images.c.model_id == model_id, images.c.error.is_(None))
        .group_by(images.c.label)
    )
    with engine.connect() as conn:
        return {label: int(n) for label, n in conn.execute(query)}


def error_rows(engine: Engine, model_id: int, limit: int = 100) -> list[tuple[str, str]]:
    query = (
        sa.select(images.c.path, images.c.error)
        .where(images.c.model_id == model_id, images.c.error.is_not(None))
        .order_by(images.c.path)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [(p, e) for p, e in conn.execute(query)]


def count_errors(engine: Engine, model_id: int) -> int:
    query = (
        sa.select(sa.func.count())
        .select_from(images)
        .where(images.c.model_id == model_id, images.c.error.is_not(None))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def example_rows(
    engine: Engine, model_id: int, class_name: str, limit: int
) -> list[dict[str, Any]]:
    """The most confident images of a class, for the report."""
    query = (
        sa.select(images.c.path, images.c.confidence, images.c.crm, images.c.width, images.c.height)
        .where(
            images.c.model_id == model_id, images.c.label == class_name, images.c.error.is_(None)
        )
        .order_by(images.c.confidence.desc(), images.c.path)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def save_class_map(
    engine: Engine,
    model_id: int,
    class_name: str,
    image_count: int,
    crm_blob: bytes,
    roi_box: Sequence[int] | None,
) -> None:
    with engine.begin() as conn:
        _delete_class_map(conn, model_id, class_name)
        conn.execute(
            class_maps.insert().values(
                model_id=model_id,
                class_name=class_name,
                image_count=image_count,
                crm=crm_blob,
                roi_box=list(roi_box) if roi_box is not None else [],
                updated_at=utcnow(),
            )
        )


def delete_class_map(engine: Engine, model_id: int, class_name: str) -> None:
    with engine.begin() as conn:
        _delete_class_map(conn, model_id, class_name)


def _delete_class_map(conn: sa.Connection, model_id: int, class_name: str) -> None:
    conn.execute(
        class_maps.delete().where(
            class_maps.c.model_id == model_id, class_maps.c.class_name == class_name
        )
    )


def class_maps_stale(engine: Engine, model_id: int) -> bool:
    """True when an image row is newer than the oldest class-level map (or none exists)."""
    newest_row = sa.select(sa.func.max(images.c.labeled_at)).where(images.c.model_id == model_id)
    oldest_map = sa.select(sa.func.min(class_maps.c.updated_at)).where(
        class_maps.c.model_id == model_id
    )
    with engine.connect() as conn:
        row_time = conn.execute(newest_row).scalar()
        map_time = conn.execute(oldest_map).scalar()
    if row_time is None:
        return False
    return map_time is None or _aware(row_time) > _aware(map_time)


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; modlabel writes UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def load_class_maps(engine: Engine, model_id: int) -> list[dict[str, Any]]:
    query = (
        sa.select(class_maps)
        .where(class_maps.c.model_id == model_id)
        .order_by(class_maps.c.class_name)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


# -- scans -----------------------------------------------------------------


def start_scan(engine: Engine, model_id: int, roots: Sequence[str]) -> int:
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
                )
            ).inserted_primary_key[0]
        )


def finish_scan(
    engine: Engine, scan_id: int, *, seen: int, labeled: int, unchanged: int, errors: int
) -> None:
    with engine.begin() as conn:
        conn.execute(
            scans.update()
            .where(scans.c.id == scan_id)
            .values(
                finished_at=utcnow(), seen=seen, labeled=labeled, unchanged=unchanged, errors=errors
            )
        )
