"""Backfill: the embedding of rows labeled before embeddings were kept, labels untouched.

Each labeled row without an embedding is read again from its stored path and decoded in
an isolated worker, like a scan (``pipeline.decoder_pool``), and run through the model
(``infer``); only ``images.embedding`` is written, and only where the file's content hash
is still the stored one: a changed file is the next scan's to relabel, so its label and
its embedding always come from the same bytes. Rows are read in keyset pages by id and
written a page per transaction: a stop keeps what is done, and a rerun goes on from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import codec, infer, stopping
from ..decode_pool import DecodeRequest
from ..errors import Interrupted, ModlabelError
from ..model import OnnxModel
from ..paths import from_db
from ..store import images
from ..store.similar import refresh_embedding_blocks
from .pipeline import DecodeOptions, decoder_pool

PAGE_ROWS = 256


@dataclass
class BackfillStats:
    """What a backfill did: rows given an embedding, and rows it had to leave (their
    file gone or unreadable, or changed since it was labeled)."""

    filled: int = 0
    changed: int = 0  # the file's bytes are not the labeled ones: the next scan's to do
    unreadable: int = 0  # gone, unreadable, or from a table's blob column


def backfill_embeddings(
    engine: Engine,
    model: OnnxModel,
    model_id: int,
    *,
    decoding: DecodeOptions | None = None,
    batch_size: int = 16,
    max_file_bytes: int = 256 * 1024 * 1024,
    on_progress: Callable[[int], None] | None = None,
) -> BackfillStats:
    """Fill ``images.embedding`` of the model's labeled rows that have none."""
    stats = BackfillStats()
    c = images.c
    after = 0
    with decoder_pool(model, decoding or DecodeOptions(), max_file_bytes) as pool:
        while True:
            stopping.check()
            with engine.connect() as conn:
                page = conn.execute(
                    sa.select(c.id, c.path, c.sha256)
                    .where(
                        c.model_id == model_id,
                        c.id > after,
                        c.embedding.is_(None),
                        c.error.is_(None),
                        c.crm.is_not(None),
                        c.missing_since.is_(None),
                    )
                    .order_by(c.id)
                    .limit(PAGE_ROWS)
                ).all()
            if not page:
                return stats
            after = int(page[-1].id)
            done: list[tuple[int, str, np.ndarray]] = []
            for row, decoded in pool.map(
                page, lambda r: DecodeRequest(from_db(r.path)), window=2 * batch_size
            ):
                if decoded is None or decoded.failed is not None:
                    raise ModlabelError(decoded.failed if decoded else "decoding failed")
                if decoded.cancelled:
                    stopping.check()
                    raise Interrupted("decoding stopped")
                if decoded.error is not None or decoded.pixels is None:
                    stats.unreadable += 1
                elif row.sha256 is not None and decoded.sha256 != row.sha256:
                    stats.changed += 1
                else:
                    done.append((int(row.id), row.sha256, decoded.pixels))
            for start in range(0, len(done), batch_size):
                part = done[start : start + batch_size]
                labels = infer.label_batch(model, np.stack([pixels for _, _, pixels in part]))
                blobs = codec.encode_embeddings(labels.embedding)
                rows = [(i, digest, b) for (i, digest, _), b in zip(part, blobs, strict=True)]
                _write(engine, model_id, rows)
                stats.filled += len(part)
            if on_progress is not None:
                on_progress(len(page))


def _write(engine: Engine, model_id: int, rows: list[tuple[int, str | None, bytes]]) -> None:
    """The embeddings of a batch, where the row still holds the bytes they came from."""
    c = images.c
    with engine.begin() as conn:
        for row_id, sha256, blob in rows:
            conn.execute(
                images.update()
                .where(
                    c.model_id == model_id,
                    c.id == row_id,
                    c.embedding.is_(None),
                    c.sha256.is_(None) if sha256 is None else c.sha256 == sha256,
                )
                .values(embedding=blob)
            )
        # The exact search's blocks of these rows are stale now (their trigger): rebuilt in
        # the same transaction, as every writer of images does.
        refresh_embedding_blocks(conn, model_id)
