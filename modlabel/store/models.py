"""The ``models`` table: one row per ONNX file that labeled anything."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..config import DEFAULT_CLASS_MIN_CONFIDENCE
from ..errors import DatabaseError
from .schema import insert_for, models, utcnow


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
            insert_for(conn)(models)
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
    return [_model_row(r) for r in rows]


def model_row(engine: Engine, model_id: int) -> ModelRow:
    """The model of the row ``model_id``; ``DatabaseError`` when there is none."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(models).where(models.c.id == model_id)).mappings().first()
    if row is None:
        raise DatabaseError(f"no model with id {model_id} in the database")
    return _model_row(row)


def _model_row(r: Any) -> ModelRow:
    return ModelRow(
        r["id"],
        r["identity"],
        r["backbone"],
        list(r["class_names"]),
        list(r["input_size"]),
        r["path"],
    )


def pick_model(engine: Engine, identity: str | None = None) -> ModelRow:
    """The model named by ``identity`` (or a prefix of only it), else the newest one."""
    rows = list_models(engine)
    if not rows:
        raise DatabaseError("the database holds no labels yet: run `modlabel scan` first")
    if identity is None:
        return rows[-1]
    # A whole identity is that model's, even when it begins another one.
    matches = [r for r in rows if r.identity == identity] or [
        r for r in rows if r.identity.startswith(identity)
    ]
    if len(matches) != 1:
        known = ", ".join(r.identity for r in rows)
        raise DatabaseError(f"model {identity!r} matches {len(matches)} models; known: {known}")
    return matches[0]


def model_class_min_confidence(engine: Engine, model_id: int) -> float | None:
    """The confidence an image needs to count in the model's class averages (None: not built)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(models.c.class_min_confidence).where(models.c.id == model_id)
        ).scalar()


def class_threshold(stored: float | None, asked: float | None) -> float:
    """The confidence an image needs to count in a class average: the one ``asked`` for,
    else the one the model's sums are kept for (``stored``), else the default."""
    if asked is not None:
        return asked
    return stored if stored is not None else DEFAULT_CLASS_MIN_CONFIDENCE


def model_id_of(engine: Engine, sha256: str) -> int | None:
    """The id of the model row of the ONNX file with this content hash, if it has one."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(models.c.id).where(models.c.sha256 == sha256).order_by(models.c.id.desc())
        ).scalar()
