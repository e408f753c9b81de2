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
* ``exact``: SQLite, and PostgreSQL without the extension. Every searchable row of the
  model is compared, and the k best kept as they pass: exact, memory bounded by a chunk,
  never the table. The embeddings are read from ``embedding_blocks`` (migration 0011):
  a model's rows in blocks of ``BLOCK_ROWS`` row ids, each block one database row of
  arrays (ids, int8 codes, norms, label and out-of-set codes), so that a million rows
  are ~1,000 reads and ~4,000 BLAS calls instead of a million Python rows. Triggers on
  ``images`` mark a block stale when any of its rows changes; a stale block's rows are
  read from ``images`` (the same answer, slower), and the writers rebuild stale blocks
  in their own transactions (``refresh_embedding_blocks``).

Both give the same neighbours up to the index's recall (tests compare them with a brute
force in numpy). Missing files and error rows are never results.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..codec import (
    EMBEDDING_HEADER_BYTES,
    MapCodecError,
    decode_embeddings,
    embedding_codes,
    encode_embeddings,
)
from ..errors import DatabaseError, InputError
from ..paths import display_path
from .cursor import driver_chunks
from .schema import embedding_blocks, images, settings

SEARCH_SETTING = "similar_search"
PGVECTOR, EXACT = "pgvector", "exact"
# Row ids per block of ``embedding_blocks``: a row's block is id // BLOCK_ROWS (the
# triggers of migration 0011 compute it too). About 530 KB of codes a block at K = 512.
BLOCK_ROWS = 1024
# Stale blocks one write rebuilds at most (about 5 ms each): a backlog (after the
# upgrade, a backfill) is worked off over a few writes rather than in one.
REFRESH_BLOCKS = 256
# Blocks a fetch brings (PostgreSQL: the server-side cursor's batch), rows a fetch of a
# stale range brings, rows per BLAS call.
BLOCKS_PER_FETCH = 8
CHUNK_ROWS = 4096
DOT_ROWS = 256
NO_LABEL = 0xFFFF  # label_codes of a row without a label
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
    exact scan in the server); with it, in milliseconds at millions of rows. The table is
    analyzed after it, so that the planner uses it."""
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
        # The planner's statistics, fresh: on a table it has not analyzed since it filled
        # (autovacuum comes later), it takes the model's rows to be few, reads every one
        # by a B-tree and sorts them, and never uses the index (145 ms against 1.9 ms at
        # 20,000 rows, measured). ANALYZE samples the table: seconds at millions of rows.
        conn.execute(sa.text("ANALYZE images"))
    return name


def image_id(engine: Engine, model_id: int, stored_path: str) -> int | None:
    """The row id of the model's image at ``stored_path`` (``paths.to_db``), if stored."""
    c = images.c
    with engine.connect() as conn:
        return conn.execute(
            sa.select(c.id).where(c.model_id == model_id, c.path == stored_path)
        ).scalar()


# Stored paths read for one shown path that holds an escape (``image_id_shown``), at most.
SHOWN_CANDIDATES = 10_000


def image_id_shown(engine: Engine, model_id: int, shown: str) -> int | None:
    """The row id of the model's image whose path is shown as ``shown``
    (``paths.display_path``: a control character written ``\\n`` or ``\\xNN``, as
    images.csv and the review sheets write it), if one is stored: the model's stored paths
    that begin with the text before its first backslash are read (at most
    ``SHOWN_CANDIDATES``, in path order) and compared as shown. None for text without a
    backslash: only a path that was looked up as given and not found comes here."""
    head, backslash, _ = shown.partition("\\")
    if not backslash:
        return None
    c = images.c
    query = (
        sa.select(c.id, c.path)
        .where(c.model_id == model_id, c.path.startswith(head, autoescape=True))
        .order_by(c.path)
        .limit(SHOWN_CANDIDATES)
    )
    with engine.connect() as conn:
        for row_id, path in conn.execute(query):
            if display_path(path) == shown:
                return row_id
    return None


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


def _searchable() -> list:
    """The rows a search may return at all: embedded, present, not an error."""
    c = images.c
    return [c.embedding.is_not(None), c.missing_since.is_(None), c.error.is_(None)]


def _chosen(ask: _Ask) -> list:
    """The search's own filters on searchable rows: its label, out-of-set rows left out."""
    c = images.c
    where = []
    if ask.label is not None:
        where.append(c.label == ask.label)
    if not ask.include_out_of_set:
        where.append(c.out_of_set.is_not(True))
    return where


def _in_block(model_id: int, first: int, end: int) -> list:
    """The model's rows with ids in [first, end), found by the primary key."""
    c = images.c
    # ``+ 0``: SQLite, without statistics, would otherwise walk the model's index (all its
    # rows) rather than the id range; an expression is no index's column.
    return [c.model_id + 0 == model_id, c.id >= first, c.id < end]


def _unit(query: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(query))
    if not np.isfinite(norm) or norm == 0.0:
        raise InputError("the query image's embedding is zero or not finite: nothing is near it")
    return (query / norm).astype(np.float32)


def code_norms(codes: np.ndarray) -> np.ndarray:
    """(N,) float32 L2 norms of (N, K) int8 embedding codes, their squares summed exactly
    in integers: the same for a row wherever it is read from (a block or ``images``)."""
    squares = np.einsum("ij,ij->i", codes, codes, dtype=np.int64)
    return np.sqrt(squares.astype(np.float64)).astype(np.float32)


def _cosines(
    codes: np.ndarray, norms: np.ndarray, unit: np.ndarray, scratch: np.ndarray
) -> np.ndarray:
    """(N,) float32 cos(f, q) of (N, K) int8 codes with norms (N,) and the unit query
    (K,): codes · q / |codes| (the scale of the codes is one positive factor a row; a
    zero embedding's cosine is 0). One BLAS matrix-vector product per ``DOT_ROWS`` rows,
    whose float32 copy (``scratch``, (DOT_ROWS, K)) stays in the cache."""
    n = len(codes)
    similarity = np.empty(n, np.float32)
    for start in range(0, n, DOT_ROWS):
        part = scratch[: min(DOT_ROWS, n - start)]
        np.copyto(part, codes[start : start + len(part)])
        np.matmul(part, unit, out=similarity[start : start + len(part)])
    np.divide(similarity, norms, out=similarity, where=norms > 0)
    return similarity


class _Nearest:
    """The k most similar rows offered so far: a min-heap of (similarity, -id)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[float, int]] = []

    def offer(self, ids: np.ndarray, similarity: np.ndarray) -> None:
        k, heap = self.k, self.heap
        if len(ids) == 0:
            return
        if len(heap) == k:  # only what beats the k-th best so far can enter
            better = similarity >= heap[0][0]
            if not better.any():
                return
            ids, similarity = ids[better], similarity[better]
        top = np.argpartition(-similarity, min(k, len(ids)) - 1)[:k]
        for i in top.tolist():
            s = float(similarity[i])
            if s == -np.inf:
                continue
            item = (s, -int(ids[i]))  # ties: the lower id first
            if len(heap) < k:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

    def found(self) -> list[tuple[int, float]]:
        """(id, cosine distance) nearest first."""
        return [(-neg_id, 1.0 - s) for s, neg_id in sorted(self.heap, reverse=True)]


def _nearest_exact(engine: Engine, query: np.ndarray, ask: _Ask) -> list[tuple[int, float]]:
    """Exact search: (id, distance) of the k nearest, nearest first. The model's blocks
    (``embedding_blocks``) are read one after the other, and the rows of its stale blocks
    from ``images``, all in one snapshot; memory is bounded by a block or a chunk."""
    unit = _unit(query)
    nearest_rows = _Nearest(ask.k)
    scratch = np.empty((DOT_ROWS, unit.shape[0]), np.float32)
    with _snapshot(engine) as conn:
        for ids, codes, norms in _searched(conn, ask):
            if codes.shape[1] != unit.shape[0]:
                raise InputError(
                    f"the query has {unit.shape[0]} values and the stored embeddings "
                    f"{codes.shape[1]}: a vector of another model"
                )
            similarity = _cosines(codes, norms, unit, scratch)
            if ask.exclude_id is not None:
                similarity[ids == ask.exclude_id] = -np.inf
            nearest_rows.offer(ids, similarity)
    return nearest_rows.found()


@contextmanager
def _snapshot(engine: Engine) -> Iterator[sa.Connection]:
    """A connection in one read transaction: the blocks and the rows of the stale ones
    as of one moment (SQLite's WAL snapshot; PostgreSQL's REPEATABLE READ)."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids (N,) int64, codes (N, K) int8, norms


def _searched(conn: sa.Connection, ask: _Ask) -> Iterator[Chunk]:
    """The rows searched, as (ids, codes, norms) chunks: each current block of the model,
    then the rows of its stale blocks, ``CHUNK_ROWS`` at a time."""
    b = embedding_blocks.c
    stale = (
        conn.execute(
            sa.select(b.block)
            .where(b.model_id == ask.model_id, b.row_count.is_(None))
            .order_by(b.block)
        )
        .scalars()
        .all()
    )
    current = (
        sa.select(*(b[name] for name in _Block._fields))
        .where(b.model_id == ask.model_id, b.row_count > 0)
        .order_by(b.block)
    )
    for part in driver_chunks(conn, current, BLOCKS_PER_FETCH):
        for values in part:
            chunk = _block_rows(_Block._make(values), ask)
            if chunk is not None:
                yield chunk
    for first, end in _id_ranges(stale):
        query = sa.select(images.c.id, images.c.embedding).where(
            *_in_block(ask.model_id, first, end), *_searchable(), *_chosen(ask)
        )
        for rows in driver_chunks(conn, query, CHUNK_ROWS):
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            codes = embedding_codes([r[1] for r in rows])
            yield ids, codes, code_norms(codes)


class _Block(NamedTuple):
    """A stored block as the driver gives it (``embedding_blocks``' columns)."""

    block: int
    row_count: int
    dims: int
    ids: bytes
    codes: bytes
    norms: bytes
    labels: list | str | None  # JSON: parsed by psycopg, text from SQLite
    label_codes: bytes
    out_of_set: bytes


def _block_rows(block: _Block, ask: _Ask) -> Chunk | None:
    """The rows of a stored block that the search keeps (its label, out-of-set ones only
    when asked for); None when none."""
    n, k = int(block.row_count), int(block.dims)
    if len(block.codes) != n * k or len(block.ids) != 8 * n or len(block.norms) != 4 * n:
        raise DatabaseError(
            f"embedding_blocks: block {block.block} of model {ask.model_id} is damaged "
            "(its arrays do not hold row_count x dims values)"
        )
    ids = np.frombuffer(block.ids, "<i8")
    codes = np.frombuffer(block.codes, np.int8).reshape(n, k)
    norms = np.frombuffer(block.norms, "<f4")
    keep = None
    if ask.label is not None:
        labels = json.loads(block.labels) if isinstance(block.labels, str) else block.labels
        if ask.label not in (labels or []):
            return None
        keep = np.frombuffer(block.label_codes, "<u2") == labels.index(ask.label)
    if not ask.include_out_of_set:
        inside = np.frombuffer(block.out_of_set, np.uint8) == 0
        keep = inside if keep is None else keep & inside
    if keep is not None and not keep.all():
        if not keep.any():
            return None
        ids, codes, norms = ids[keep], codes[keep], norms[keep]
    return ids, codes, norms


def _id_ranges(blocks: Sequence[int]) -> Iterator[tuple[int, int]]:
    """[first, end) row ids of runs of consecutive block numbers (ascending)."""
    run_start = previous = None
    for block in blocks:
        if previous is not None and block == previous + 1:
            previous = block
            continue
        if run_start is not None:
            yield run_start * BLOCK_ROWS, (previous + 1) * BLOCK_ROWS
        run_start = previous = block
    if run_start is not None:
        yield run_start * BLOCK_ROWS, (previous + 1) * BLOCK_ROWS


def refresh_embedding_blocks(
    conn: sa.Connection, model_id: int, *, limit: int | None = REFRESH_BLOCKS
) -> int:
    """Rebuild the model's stale blocks (``limit`` at most; None: all), in ``conn``'s
    transaction: the writers of ``images`` call it after their writes. The block that is
    still filling (the table's newest id) is left for later: rebuilt once it is full
    rather than after every batch. Returns how many blocks were rebuilt.

    About 5 ms a block of 1,024 rows; a scan rebuilds each block about once."""
    b = embedding_blocks.c
    newest = conn.execute(sa.select(sa.func.max(images.c.id))).scalar()
    query = (
        sa.select(b.block).where(b.model_id == model_id, b.row_count.is_(None)).order_by(b.block)
    )
    if newest is not None:
        query = query.where(b.block != int(newest) // BLOCK_ROWS)
    if limit is not None:
        query = query.limit(limit)
    stale = conn.execute(query).scalars().all()
    return sum(_rebuild_block(conn, model_id, int(block)) for block in stale)


def _rebuild_block(conn: sa.Connection, model_id: int, block: int) -> bool:
    """Store one block's searchable rows as arrays (or drop the block when the model has
    no rows in it any more); False when it was left stale."""
    b, c = embedding_blocks.c, images.c
    here = [b.model_id == model_id, b.block == block]
    if conn.dialect.name == "postgresql":
        # Lock it first: a write that marks it stale while this one reads waits for this
        # transaction, then marks it again; one before it committed what is read here.
        locked = sa.select(b.block).where(*here, b.row_count.is_(None)).with_for_update()
        if conn.execute(locked).first() is None:
            return False  # rebuilt by another meanwhile
    in_block = _in_block(model_id, block * BLOCK_ROWS, (block + 1) * BLOCK_ROWS)
    rows = conn.execute(
        sa.select(c.id, c.embedding, c.label, c.out_of_set)
        .where(*in_block, *_searchable())
        .order_by(c.id)
    ).all()
    if not rows and conn.execute(sa.select(c.id).where(*in_block).limit(1)).first() is None:
        conn.execute(embedding_blocks.delete().where(*here))
        return True
    ids, blobs, labels, flagged = zip(*rows, strict=True) if rows else ((), (), (), ())
    try:
        codes = embedding_codes(list(blobs))
    except MapCodecError:
        return False  # a damaged embedding: its rows stay searched one by one, which says so
    names = sorted({label for label in labels if label is not None})
    index = {name: i for i, name in enumerate(names)}
    conn.execute(
        embedding_blocks.update()
        .where(*here)
        .values(
            row_count=len(rows),
            dims=int(codes.shape[1]),
            ids=np.array(ids, "<i8").tobytes(),
            codes=np.ascontiguousarray(codes).tobytes(),
            norms=code_norms(codes).astype("<f4").tobytes(),
            labels=names,
            label_codes=np.array([index.get(lab, NO_LABEL) for lab in labels], "<u2").tobytes(),
            out_of_set=np.array([bool(f) for f in flagged], np.uint8).tobytes(),
        )
    )
    return True


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
