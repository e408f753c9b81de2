"""Similar images: "show me images like this one", for a stored image or a new file.

A stored image (by its path or row id) is searched by its stored embedding; a file the
database does not hold is decoded in an isolated worker (``decode_pool``, as a scan
decodes it) and run through the model first (``infer``: the same GAP embedding a scan
stores), and nothing is written. The search itself is ``store.similar.nearest``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine

from . import paths, store
from .decode_pool import DecodePool, DecodeRequest, image_pool
from .errors import ImageError, InputError
from .infer import Labels, label_pixels
from .model import OnnxModel
from .store.similar import Neighbour, nearest, stored_embedding


@dataclass(frozen=True)
class Query:
    """What is searched for: a stored row (``row_id``) or a file that was embedded here."""

    vector: np.ndarray  # (K,) float32, unit length
    row_id: int | None  # the stored image, left out of its own results
    described: str  # how to name the query in messages


def stored_key(engine: Engine, model_id: int, text: str) -> int | None:
    """The row id of a stored image named by ``text``: ``#123`` / ``id:123``, its stored
    path as given, the path of a file as a scan stores it (absolute, normalized), or its
    path as modlabel shows it (``\\n`` for a newline: images.csv, the review sheets)."""
    for prefix in ("#", "id:"):
        if text.startswith(prefix) and text[len(prefix) :].isdigit():
            return int(text[len(prefix) :])
    candidates = [text, paths.to_db(paths.absolute(text))]
    for candidate in candidates:
        row = store.image_id(engine, model_id, candidate)
        if row is not None:
            return row
    return store.image_id_shown(engine, model_id, text)


def label_one(model: OnnxModel, pool: DecodePool, request: DecodeRequest) -> Labels:
    """One image (a file, or its bytes: an upload) decoded by ``pool``'s isolated workers and
    run through the model: its label and embedding, as a scan would store them. Raises
    ``ImageError`` naming it when it cannot be decoded."""
    decoded = pool.decode(request)
    if decoded.failed is not None:
        raise InputError(decoded.failed)
    if decoded.error is not None or decoded.cancelled or decoded.pixels is None:
        raise ImageError(request.path, decoded.error or "decoding stopped")
    return label_pixels(model, np.asarray(decoded.pixels)[None])


def embed_bytes_or_file(
    model: OnnxModel, *, path: str | None = None, data: bytes | None = None, max_bytes: int
) -> np.ndarray:
    """The (K,) embedding of one image (a file, or its bytes: an upload), decoded in an
    isolated worker under the default memory and time limits, ``max_bytes`` at most."""
    request = DecodeRequest(path or "the upload", data=data, max_bytes=max_bytes)
    with image_pool(model.info.input_size, max_bytes=max_bytes) as pool:
        return label_one(model, pool, request).embedding[0]


def resolve_query(
    engine: Engine,
    model_row: store.ModelRow,
    text: str,
    *,
    onnx: Path | None = None,
    max_bytes: int = 256 * 1024 * 1024,
) -> Query:
    """The query named by ``text``: a stored image, else a file run through the model
    (``onnx``, else the model's stored path; it must be the database's model)."""
    row_id = stored_key(engine, model_row.id, text)
    if row_id is not None:
        found, vector = stored_embedding(engine, model_row.id, row_id)
        return Query(vector, found, text)
    if not os.path.isfile(text):
        raise InputError(f"{text}: neither a stored image of model {model_row.identity} nor a file")
    model_file = onnx if onnx is not None else Path(model_row.path)
    if not model_file.is_file():
        raise InputError(
            f"{text} is not in the database, and the model file to embed it "
            f"({model_file}) is not there: give --onnx PATH"
        )
    model = OnnxModel(model_file)
    if model.identity != model_row.identity:
        raise InputError(
            f"{model_file} is model {model.identity}, not the database's {model_row.identity}: "
            "its embeddings would not compare"
        )
    return Query(embed_bytes_or_file(model, path=text, max_bytes=max_bytes), None, text)


def similar_images(
    engine: Engine,
    model_row: store.ModelRow,
    query: Query,
    k: int = 20,
    *,
    label: str | None = None,
    include_out_of_set: bool = False,
) -> list[Neighbour]:
    """The ``k`` stored images nearest to ``query``, nearest first (the query left out)."""
    return nearest(
        engine,
        model_row.id,
        query.vector,
        k,
        label=label,
        include_out_of_set=include_out_of_set,
        exclude_id=query.row_id,
    )
