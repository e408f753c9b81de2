"""Similar-image search over the stored GAP embeddings (``images.embedding``).

Distance is the cosine distance, 1 - cos(f, g), of two images' embeddings (the K-vectors
the dense head sees; ``codec.encode_embeddings``). How a database answers is chosen once,
when its schema is made (migration 0007), and recorded in ``settings``
(``SEARCH_SETTING``):

* ``pgvector``: PostgreSQL with the ``vector`` extension. A trigger keeps
  ``images.embedding_vec`` (``halfvec``, the embedding's int8 codes, whose cosine is the
  embedding's) in step with ``images.embedding``, and the server orders by pgvector's
  cosine distance: an exact scan in the server, or, once ``modlabel db index-embeddings``
  has built a model's partial HNSW index (``create_search_index``), an approximate search
  in milliseconds at millions of rows.
* ``exact``: SQLite, and PostgreSQL without the extension. The rows are streamed in
  chunks of ``CHUNK_ROWS`` and the k best kept as they pass: exact, memory bounded by
  the chunk, never the table.

Both give the same neighbours up to the index's recall (tests compare them with a brute
force in numpy). Missing files and error rows are never results.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..codec import (
    EMBEDDING_HEADER_BYTES,
    decode_embeddings,
    embedding_codes,
    encode_embeddings,
)
from ..errors import DatabaseError, InputError
from .schema import images, settings

SEARCH_SETTING = "similar_search"
PGVECTOR, EXACT = "pgvector", "exact"
CHUNK_ROWS = 4096
# HNSW's candidate list: at least this, and 2k for a larger k (pgvector's ef_search).
EF_SEARCH = 100


class NoEmbedding(InputError):
    """A stored image without an embedding: an error row, or labeled before they were kept."""


@dataclass(frozen=True)
class Neighbour:
    """One result of a search: a stored image and its cosine distance to the query."""

    id: int
    path: str
    label: str | None
    confidence: float | None
    out_of_set: bool | None
    distance: float


def search_method(engine: Engine) -> str:
    """How this database searches (``pgvector`` or ``exact``), as recorded at its creation."""
    with engine.connect() as conn:
        value = conn.execute(
            sa.select(settings.c.value).where(settings.c.key == SEARCH_SETTING)
        ).scalar()
    return value or EXACT


def _index_name(model_id: int) -> str:
    return f"ix_images_embedding_vec_{int(model_id)}"


def create_search_index(engine: Engine, model_id: int) -> str | None:
    """Build the model's HNSW index on its embeddings, where the database searches with
    pgvector; returns its name (None: nothing to index, the search is exact).

    A partial index per model (each model's embeddings have their own length), built
    CONCURRENTLY: scans and searches go on while it builds. Search works without it (an
    exact scan in the server); with it, in milliseconds at millions of rows."""
    if engine.dialect.name != "postgresql" or search_method(engine) != PGVECTOR:
        return None
    with engine.connect() as conn:
        blob = conn.execute(
            sa.select(images.c.embedding)
            .where(images.c.model_id == model_id, images.c.embedding.is_not(None))
            .limit(1)
        ).scalar()
    if blob is None:
        raise InputError("the model has no stored embeddings yet: scan or backfill first")
    k, m, name = len(blob) - EMBEDDING_HEADER_BYTES, int(model_id), _index_name(model_id)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            sa.text(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON images USING hnsw "
                f"((embedding_vec::halfvec({k})) halfvec_cosine_ops) WHERE model_id = {m}"
            )
        )
    return name


def image_id(engine: Engine, model_id: int, stored_path: str) -> int | None:
    """The row id of the model's image at ``stored_path`` (``paths.to_db``), if stored."""
    c = images.c
    with engine.connect() as conn:
        return conn.execute(
            sa.select(c.id).where(c.model_id == model_id, c.path == stored_path)
        ).scalar()


def stored_embedding(engine: Engine, model_id: int, key: int | str) -> tuple[int, np.ndarray]:
    """(row id, (K,) float32 unit vector) of a stored image, by row id or stored path.

    Raises ``InputError`` naming the image when it is not stored, or has no embedding yet
    (labeled before embeddings were kept: ``modlabel db backfill-embeddings``)."""
    c = images.c
    where = c.id == key if isinstance(key, int) else c.path == key
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(c.id, c.embedding, c.error).where(c.model_id == model_id, where)
        ).first()
    if row is None:
        raise InputError(f"{key}: no such image in the database for this model")
    if row.embedding is None:
        why = "it is an error row" if row.error is not None else "it was labeled before "
        if row.error is None:
            why += "embeddings were kept (modlabel db backfill-embeddings fills them)"
        raise NoEmbedding(f"{key}: the image has no stored embedding: {why}")
    return int(row.id), decode_embeddings([row.embedding])[0]


def nearest(
    engine: Engine,
    model_id: int,
    vector: np.ndarray,
    k: int = 20,
    *,
    label: str | None = None,
    include_out_of_set: bool = False,
    exclude_id: int | None = None,
    method: str | None = None,
) -> list[Neighbour]:
    """The ``k`` stored images nearest to ``vector`` ((K,) real) by cosine distance, nearest
    first: present, labeled rows of the model (of ``label`` only, when given; out-of-set
    ones only with ``include_out_of_set``), ``exclude_id`` left out (the query itself).

    method: ``pgvector`` or ``exact`` (default: the database's, ``search_method``)."""
    query = np.asarray(vector, dtype=np.float64).reshape(-1)
    if k < 1:
        return []
    method = method or search_method(engine)
    if method == PGVECTOR and engine.dialect.name != "postgresql":
        raise DatabaseError("pgvector search needs PostgreSQL")
    ask = _Ask(model_id, int(k), label, include_out_of_set, exclude_id)
    search = _nearest_pgvector if method == PGVECTOR else _nearest_exact
    return _described(engine, search(engine, query, ask))


@dataclass(frozen=True)
class _Ask:
    """What a search is for: the k nearest rows of a model, and which rows may be results."""

    model_id: int
    k: int
    label: str | None
    include_out_of_set: bool
    exclude_id: int | None


def _filters(model_id: int, label: str | None, include_out_of_set: bool) -> list:
    c = images.c
    where = [
        c.model_id == model_id,
        c.embedding.is_not(None),
        c.missing_since.is_(None),
        c.error.is_(None),
    ]
    if label is not None:
        where.append(c.label == label)
    if not include_out_of_set:
        where.append(c.out_of_set.is_not(True))
    return where


def _unit(query: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(query))
    if not np.isfinite(norm) or norm == 0.0:
        raise InputError("the query image's embedding is zero or not finite: nothing is near it")
    return (query / norm).astype(np.float32)


def _nearest_exact(engine: Engine, query: np.ndarray, ask: _Ask) -> list[tuple[int, float]]:
    """Streamed exact search: (id, distance) of the k nearest, nearest first."""
    k, exclude_id = ask.k, ask.exclude_id
    unit = _unit(query)
    best: list[tuple[float, int]] = []  # a min-heap of (similarity, -id): the k best so far
    # One float32 buffer for every chunk's codes: the cosine needs their direction only.
    buffer = np.empty((CHUNK_ROWS, unit.shape[0]), np.float32)
    for ids, blobs in _chunks(engine, ask):
        codes = embedding_codes(blobs)
        if codes.shape[1] != unit.shape[0]:
            raise InputError(
                f"the query has {unit.shape[0]} values and the stored embeddings "
                f"{codes.shape[1]}: a vector of another model"
            )
        vectors = buffer[: len(codes)]
        np.copyto(vectors, codes)
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
        similarity = vectors @ unit
        np.divide(similarity, norms, out=similarity, where=norms > 0)
        if exclude_id is not None:
            similarity[ids == exclude_id] = -np.inf
        top = np.argpartition(-similarity, min(k, len(ids)) - 1)[:k]
        for i in top.tolist():
            s = float(similarity[i])
            if s == -np.inf:
                continue
            item = (s, -int(ids[i]))  # ties: the lower id first
            if len(best) < k:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)
    return [(-neg_id, 1.0 - s) for s, neg_id in sorted(best, reverse=True)]


def _chunks(engine: Engine, ask: _Ask) -> Iterator[tuple[np.ndarray, list[bytes]]]:
    """(ids, blobs) of the rows searched, ``CHUNK_ROWS`` at a time, streamed by the driver
    (a server-side cursor on PostgreSQL)."""
    query = (
        sa.select(images.c.id, images.c.embedding)
        .where(*_filters(ask.model_id, ask.label, ask.include_out_of_set))
        .execution_options(yield_per=CHUNK_ROWS)
    )
    with engine.connect() as conn:
        for part in conn.execute(query).partitions():
            yield np.fromiter((r[0] for r in part), np.int64, len(part)), [r[1] for r in part]


def _codes_literal(query: np.ndarray) -> str:
    """The query as pgvector's text form of its int8 codes, like the stored vectors."""
    blob = encode_embeddings(query[None])[0]
    codes = np.frombuffer(blob[EMBEDDING_HEADER_BYTES:], dtype=np.int8)
    return "[" + ",".join(str(int(v)) for v in codes) + "]"


def _nearest_pgvector(engine: Engine, query: np.ndarray, ask: _Ask) -> list[tuple[int, float]]:
    """pgvector's answer (its HNSW index's, where built): (id, distance) of the k nearest,
    nearest first."""
    model_id, k, label, exclude_id = ask.model_id, ask.k, ask.label, ask.exclude_id
    include_out_of_set = ask.include_out_of_set
    _unit(query)
    dims = int(query.shape[0])
    m = int(model_id)  # a literal, so that the planner matches the model's partial index
    conditions = ["embedding_vec IS NOT NULL", "missing_since IS NULL", "error IS NULL"]
    params: dict[str, object] = {"q": _codes_literal(query), "k": int(k)}
    if label is not None:
        conditions.append("label = :label")
        params["label"] = label
    if not include_out_of_set:
        conditions.append("out_of_set IS NOT TRUE")
    if exclude_id is not None:
        conditions.append("id <> :exclude")
        params["exclude"] = int(exclude_id)
    sql = sa.text(
        f"SELECT id, (embedding_vec::halfvec({dims})) <=> CAST(:q AS halfvec({dims})) AS d "
        f"FROM images WHERE model_id = {m} AND {' AND '.join(conditions)} "
        f"ORDER BY embedding_vec::halfvec({dims}) <=> CAST(:q AS halfvec({dims})) LIMIT :k"
    )
    with engine.begin() as conn:
        conn.execute(sa.text(f"SET LOCAL hnsw.ef_search = {max(EF_SEARCH, 2 * int(k))}"))
        # Filters (a label, no out-of-set) would otherwise leave fewer than k results.
        conn.execute(sa.text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
        rows = conn.execute(sql, params).all()
    found = [(int(i), float(d)) for i, d in rows]
    found.sort(key=lambda item: (item[1], item[0]))  # relaxed order: sort what came back
    return found


def _described(engine: Engine, found: Sequence[tuple[int, float]]) -> list[Neighbour]:
    if not found:
        return []
    c = images.c
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                sa.select(c.id, c.path, c.label, c.confidence, c.out_of_set).where(
                    c.id.in_([i for i, _ in found])
                )
            )
        }
    return [
        Neighbour(
            id=i,
            path=rows[i].path,
            label=rows[i].label,
            confidence=rows[i].confidence,
            out_of_set=rows[i].out_of_set,
            distance=max(0.0, d),
        )
        for i, d in found
        if i in rows
    ]
