"""``query``: the retrieval queries of sql/ (and the user's own), read-only; ``db``: the
schema's version and its upgrade."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .edge import command
from .options import ClassConfidenceOption, DbOption, db_url


@command(app)
def query(
    name: Annotated[
        str | None,
        typer.Argument(help="A query of sql/ (e.g. by-label). Omit to list the queries."),
    ] = None,
    sql_file: Annotated[
        Path | None,
        typer.Option("--sql-file", help="Run the query of this .sql file instead (read-only)."),
    ] = None,
    db: DbOption = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="A query parameter, NAME=VALUE.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Run a retrieval query of sql/ against the labels, and print its rows.

    Queries run read-only (a read-only transaction on PostgreSQL, query_only on
    SQLite): a query that would write fails and changes nothing.

    Example: modlabel query by-label -p label=chest_xray -p min_confidence=0.9 --db labels.db
    """
    from ..queries import list_queries, load_query, load_sql_file, open_query
    from ..store import open_db

    if name is not None and sql_file is not None:
        raise typer.BadParameter("give a query NAME or --sql-file, not both")
    if name is None and sql_file is None:
        for q in list_queries():
            params = " ".join(f"{p}=..." for p in q.parameters)
            typer.echo(f"{q.name:<22} {q.description}" + (f"  [{params}]" if params else ""))
        return
    params: dict[str, str] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"NAME=VALUE, not {item!r}", param_hint="--param")
        params[key.strip()] = value
    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter(f"table, csv or json, not {fmt!r}", param_hint="--format")
    engine = open_db(db_url(db), create=False, migrate=False)
    named = load_sql_file(sql_file) if sql_file is not None else load_query(name)
    with open_query(engine, named, params) as result:
        for chunk in _format_rows(result.columns, result.rows, fmt):
            sys.stdout.write(chunk)


# The table format sizes its columns on the first rows, then streams the rest.
TABLE_SIZING_ROWS = 200


def _format_rows(columns: list[str], rows: Iterator[tuple], fmt: str) -> Iterator[str]:
    """The rows as text in ``fmt`` (table, csv or json), streamed a line at a time."""
    import io
    import json

    from .. import spreadsheet
    from ..paths import display_path

    if fmt == "json":
        yield "["
        for i, row in enumerate(rows):
            item = json.dumps(dict(zip(columns, row, strict=True)), default=str)
            yield ("\n " if i == 0 else ",\n ") + item
        yield "\n]\n"
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = spreadsheet.writer(buf)  # cells that would run as formulas are defused
        for row in itertools.chain([columns], rows):
            writer.writerow(row)
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        return

    # One row, one line: newlines and other control characters in a cell are escaped.
    def cells(row: tuple) -> list[str]:
        return ["" if v is None else display_path(str(v)) for v in row]

    head = [cells(r) for r in itertools.islice(rows, TABLE_SIZING_ROWS)]
    widths = [max([len(c)] + [len(r[i]) for r in head]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip() + "\n"

    yield line(list(columns))
    yield line(["-" * w for w in widths])
    count = 0
    for row in itertools.chain(head, (cells(r) for r in rows)):
        yield line(row)
        count += 1
    yield f"({count} rows)\n"


db_app = typer.Typer(
    name="db",
    help="The database itself: its schema version, and its upgrade.\n\n"
    "Example: modlabel db status --db labels.db",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
)
app.add_typer(db_app)


@command(db_app, name="upgrade")
def db_upgrade(db: DbOption = None) -> None:
    """Upgrade the database's schema to this modlabel's (the commands that only read never
    do; the next scan would). Safe beside running scans; a newer schema is refused.

    Example: modlabel db upgrade --db postgresql://modlabel@db/archive
    """
    from ..store import open_db, schema_revisions

    engine = open_db(db_url(db), create=False, migrate=True)
    current, head, _known = schema_revisions(engine)
    typer.echo(f"schema at revision {current} (this modlabel's: {head})")


@command(db_app, name="status")
def db_status(db: DbOption = None) -> None:
    """Say which schema revision the database is at, and whether this modlabel reads it.

    Example: modlabel db status --db labels.db
    """
    from ..store import open_db, schema_revisions

    engine = open_db(db_url(db), create=False, migrate=False, check=False)
    current, head, known = schema_revisions(engine)
    if current == head:
        typer.echo(f"schema at revision {current}: this modlabel's")
    elif current is None:
        typer.echo("no modlabel schema yet: the first scan creates it")
    elif known:
        typer.echo(
            f"schema at revision {current}, behind this modlabel's {head}: modlabel db upgrade"
        )
    else:
        typer.echo(f"schema at revision {current}: written by a newer modlabel (this one: {head})")


@command(db_app, name="rebuild-class-maps")
def db_rebuild_class_maps(
    db: DbOption = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model identity (or prefix); default: the newest."),
    ] = None,
    min_confidence: ClassConfidenceOption = None,
) -> None:
    """Recompute every class's average map (Eq. 8) from the stored maps and store it: for a
    database written by an older modlabel, or to check the running sums. Reads every map of
    the model once; the scans keep the sums current otherwise.

    Example: modlabel db rebuild-class-maps --db labels.db --min-confidence 0.95
    """
    from ..scan.lock import acquire_scan_lock
    from ..store import (
        class_threshold,
        model_class_min_confidence,
        open_db,
        pick_model,
        rebuild_class_maps,
    )

    engine = open_db(db_url(db), create=False, migrate=True)
    row = pick_model(engine, model)
    threshold = class_threshold(model_class_min_confidence(engine, row.id), min_confidence)
    lock = acquire_scan_lock(engine, row.id)  # never beside a scan of the model
    try:
        built = rebuild_class_maps(engine, row.id, row.class_names, threshold)
    finally:
        lock.release()
    counted = sum(m.image_count for m in built)
    typer.echo(
        f"class maps of {row.identity}: {len(built)} classes, {counted} images of confidence "
        f">= {threshold:g}"
    )
