"""``similar``: the stored images most like one image; ``db backfill-embeddings``: the
embeddings of rows labeled before they were kept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import config
from .app import app
from .edge import command, interactive, say
from .options import DbOption, ModelIdOption, db_url, size_bytes
from .query import db_app

SIMILAR_COLUMNS = ["rank", "id", "path", "label", "confidence", "out_of_set", "distance"]


@command(app)
def similar(
    image: Annotated[
        str,
        typer.Argument(
            help="A stored image (its path, or #ID of its row), or an image file that is not "
            "in the database: it is run through the model first, and nothing is stored."
        ),
    ],
    db: DbOption = None,
    k: Annotated[int, typer.Option("-k", "--top", min=1, max=10000, help="How many.")] = 20,
    label: Annotated[str | None, typer.Option("--label", help="Only images of this label.")] = None,
    include_out_of_set: Annotated[
        bool,
        typer.Option(
            "--include-out-of-set", help="Also images the model flagged out of set (left out)."
        ),
    ] = False,
    model: ModelIdOption = None,
    onnx: Annotated[
        Path | None,
        typer.Option(
            "--onnx",
            help="The ONNX file to embed a new image with (default: the model's stored path); "
            "it must be the database's model.",
        ),
    ] = None,
    max_file_size: Annotated[
        str, typer.Option("--max-file-size", help="Refuse a larger new image (e.g. 256M).")
    ] = "256M",
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Find the stored images most like IMAGE: the cosine distance of their GAP embeddings
    (the K-vector the model's dense head sees), nearest first, with each one's label,
    confidence and out-of-set flag. Missing files, error rows and (without
    --include-out-of-set) flagged images are never results; the image itself is left out.

    Example: modlabel similar /archive/2024/ct_0001.png --db labels.db -k 10 --label abdominal_ct
    """
    from ..paths import display_path
    from ..similar import resolve_query, similar_images
    from ..store import open_db, pick_model
    from .query import _format_rows

    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter(f"table, csv or json, not {fmt!r}", param_hint="--format")
    engine = open_db(db_url(db), create=False, migrate=False)
    model_row = pick_model(engine, model)
    if label is not None and label not in model_row.class_names:
        known = ", ".join(model_row.class_names)
        raise typer.BadParameter(
            f"{label!r} is no class of the model; known: {known}", param_hint="--label"
        )
    query = resolve_query(
        engine, model_row, image, onnx=onnx, max_bytes=size_bytes(max_file_size, "--max-file-size")
    )
    found = similar_images(
        engine, model_row, query, k, label=label, include_out_of_set=include_out_of_set
    )
    rows = (
        (rank, n.id, display_path(n.path), n.label, n.confidence, n.out_of_set, n.distance)
        for rank, n in enumerate(found, start=1)
    )
    for line in _format_rows(SIMILAR_COLUMNS, rows, fmt):
        typer.echo(line, nl=False)


@command(db_app, name="backfill-embeddings", interruptible=False)
def db_backfill_embeddings(
    db: DbOption = None,
    model: ModelIdOption = None,
    onnx: Annotated[
        Path | None,
        typer.Option("--onnx", help="The model's ONNX file (default: its stored path)."),
    ] = None,
    decoders: Annotated[
        int, typer.Option("--decoders", min=1, help="Decode worker processes.")
    ] = config.DEFAULT_DECODERS,
) -> None:
    """Give each labeled row that has no embedding (labeled before they were kept) its
    embedding, for `modlabel similar`, without touching its label: the file is read and
    decoded again, in isolated workers, and run through the model. A file whose bytes
    changed since it was labeled is left for the next scan. Stops cleanly on a signal, and
    a rerun goes on where it stopped; never beside a scan of the model (its lock).

    Example: modlabel db backfill-embeddings --db labels.db
    """
    from ..errors import InputError
    from ..scan import DecodeOptions, backfill_embeddings
    from ..scan.lock import acquire_scan_lock
    from ..store import open_db, pick_model
    from .scan import load_model

    engine = open_db(db_url(db), create=False, migrate=True)
    row = pick_model(engine, model)
    model_file = onnx if onnx is not None else Path(row.path)
    if not model_file.is_file():
        raise InputError(f"the model file {model_file} is not there: give --onnx PATH")
    onnx_model = load_model(model_file, "auto")
    if onnx_model.identity != row.identity:
        raise InputError(f"{model_file} is model {onnx_model.identity}, not {row.identity}")
    bar = None
    if interactive():
        from tqdm import tqdm

        bar = tqdm(unit="img", desc="backfill", dynamic_ncols=True)
    lock = acquire_scan_lock(engine, row.id)
    try:
        stats = backfill_embeddings(
            engine,
            onnx_model,
            row.id,
            decoding=DecodeOptions(decoders=decoders),
            on_progress=bar.update if bar is not None else None,
        )
    finally:
        lock.release()
        if bar is not None:
            bar.close()
    say(
        f"embeddings of {row.identity}: {stats.filled} filled, {stats.changed} left for the "
        f"next scan (changed since labeled), {stats.unreadable} unreadable"
    )


@command(db_app, name="index-embeddings")
def db_index_embeddings(db: DbOption = None, model: ModelIdOption = None) -> None:
    """Build the model's HNSW index for `modlabel similar` on a PostgreSQL with pgvector
    (CREATE INDEX CONCURRENTLY: scans and searches go on meanwhile). Without it the search
    is exact, in the server; with it, approximate and fast at millions of images. On
    SQLite, or PostgreSQL without pgvector, there is nothing to build: the search streams
    the rows exactly.

    Example: modlabel db index-embeddings --db postgresql://modlabel@db/archive
    """
    from ..store import open_db, pick_model
    from ..store.similar import create_search_index, refresh_embedding_blocks, search_method

    engine = open_db(db_url(db), create=False, migrate=True)
    row = pick_model(engine, model)
    name = create_search_index(engine, row.id)
    if name is None:
        # The exact search reads contiguous blocks: build every stale one now, so the
        # first searches after an upgrade or a backfill need not read row by row.
        with engine.begin() as conn:
            built = refresh_embedding_blocks(conn, row.id, limit=None)
        say(
            f"this database searches {search_method(engine)}ly: there is no index to build; "
            f"{built:,} stale block{'s' if built != 1 else ''} of the exact search rebuilt"
        )
    else:
        say(f"index {name} of {row.identity} is built")
