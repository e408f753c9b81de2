"""``query``: the retrieval queries of sql/ (and the user's own), read-only; ``db``: the
schema's version and its upgrade."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import sys
import unicodedata
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from ..paths import display_path
from ..timestamps import iso_utc
from .app import app
from .edge import command
from .options import ClassConfidenceOption, DbOption, db_url


class _QueryCommand(TyperCommand):
    """``query``'s help ends with the named queries, each with its purpose and parameters,
    read from the headers of sql/ when the help is shown: it cannot drift from the files."""

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        try:  # rich renders the help (typer's default); escape its markup, [ and ]
            from rich.markup import escape
        except ImportError:  # pragma: no cover - typer without rich: click's plain help
            escape = str
        self.epilog = escape("Named queries (-p NAME=VALUE sets a parameter):\n\n" + query_list())
        super().format_help(ctx, formatter)


def query_list(width: int | None = None) -> str:
    """Each named query of sql/: its name and purpose, then its parameters with their
    defaults, wrapped to ``width`` (default: the terminal's) under a hanging indent."""
    import textwrap

    from ..queries import list_queries

    if width is None:
        width = shutil.get_terminal_size().columns - 2  # the help's own margins
    indent = " " * (QUERY_NAME_WIDTH + 1)
    text_width = max(width - len(indent), 30)
    lines = []
    for q in list_queries():
        specs = [
            p.name + (" (required)" if p.required else f"={p.default}") for p in q.parameter_specs
        ]
        for i, text in enumerate((q.purpose, ", ".join(specs) or "no parameters")):
            wrapped = textwrap.wrap(text, text_width, break_on_hyphens=False) or [""]
            first = f"{q.name:<{QUERY_NAME_WIDTH}} " if i == 0 else indent
            lines.append(first + wrapped[0])
            lines.extend(indent + rest for rest in wrapped[1:])
    return "\n".join(lines)


QUERY_NAME_WIDTH = 20


@command(app, cls=_QueryCommand)
def query(
    ctx: typer.Context,
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
        list[str] | None,
        typer.Option(
            "--param", "-p", help="A query parameter, NAME=VALUE (the queries' own: below)."
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="table (floats rounded, fitted to the terminal's width), csv or json "
            "(full values).",
        ),
    ] = "table",
) -> None:
    """Run a retrieval query of sql/ against the labels, and print its rows.

    Queries run read-only (a read-only transaction on PostgreSQL, query_only on
    SQLite): a query that would write fails and changes nothing. A parameter left
    out takes its default (listed below); one the query does not have is a usage
    error (exit 2). A label that is no class of the model still runs, and a hint on
    stderr names the known labels.

    Timestamps are ISO 8601 in UTC, to the millisecond (2026-12-01T08:05:37.980Z), on
    SQLite and PostgreSQL alike, in every format. The table rounds floats to 4
    significant digits and, on a terminal (or with $COLUMNS), shortens long cells with
    an ellipsis so that no line is wider than the terminal; csv and json keep every
    value whole. A reader that closes the pipe early (| head) ends the query quietly.

    Example: modlabel query by-label -p label=chest_xray -p min_confidence=0.9 --db labels.db

    Example: modlabel query scans --db labels.db | head -5
    """
    from ..errors import UsageError
    from ..queries import check_parameters, label_hint, load_query, load_sql_file, open_query
    from ..store import open_db
    from .edge import click_exceptions, say

    if name is not None and sql_file is not None:
        raise typer.BadParameter("give a query NAME or --sql-file, not both")
    if name is None and sql_file is None:
        typer.echo(query_list())
        return
    params: dict[str, str] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"NAME=VALUE, not {item!r}", param_hint="--param")
        params[key.strip()] = value
    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter(f"table, csv or json, not {fmt!r}", param_hint="--format")
    named = load_sql_file(sql_file) if sql_file is not None else load_query(name)
    try:
        check_parameters(named, params)
    except UsageError as exc:  # the command line's own: its message, exit 2, and "see -h"
        raise click_exceptions.UsageError(str(exc), ctx=ctx) from None
    engine = open_db(db_url(db), create=False, migrate=False)
    width = terminal_width() if fmt == "table" else None
    with open_query(engine, named, params) as result:
        for chunk in _format_rows(result.columns, result.rows, fmt, width=width):
            sys.stdout.write(chunk)
    hint = label_hint(engine, named, params)
    if hint is not None:
        sys.stdout.flush()  # the rows first, then the hint
        say(hint)


def terminal_width() -> int | None:
    """The width a table must fit: $COLUMNS, else the terminal's; None (no limit) when
    the output is no terminal and $COLUMNS is unset, so that a pipe to grep or a file
    gets every cell whole."""
    if os.environ.get("COLUMNS", "").strip().isdigit() or sys.stdout.isatty():
        return max(shutil.get_terminal_size().columns, 20)
    return None


# The table format sizes its columns on the first rows, then streams the rest.
TABLE_SIZING_ROWS = 200
# A table's floats: 4 significant digits (0.9877, 12.35, 1.234e-05; 98765 stays whole).
TABLE_FLOAT_DIGITS = 4
# A column narrowed to fit the terminal keeps at least this many characters of its
# values, and at least TABLE_MIN_HEADER of its header.
TABLE_MIN_COLUMN = 10
TABLE_MIN_HEADER = 5
ELLIPSIS = "\u2026"


def _format_rows(
    columns: list[str], rows: Iterator[tuple], fmt: str, *, width: int | None = None
) -> Iterator[str]:
    """The rows as text in ``fmt`` (table, csv or json), streamed a line at a time.

    Timestamps are ``timestamps.iso_utc`` in every format. ``width``: the most
    characters a line of the table may have (None: no limit)."""
    import io
    import json

    from .. import spreadsheet

    if fmt == "json":
        yield "["
        for i, row in enumerate(rows):
            item = json.dumps(dict(zip(columns, row, strict=True)), default=_json_value)
            yield ("\n " if i == 0 else ",\n ") + item
        yield "\n]\n"
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = spreadsheet.writer(buf)  # cells that would run as formulas are defused
        for row in itertools.chain([columns], rows):
            writer.writerow([iso_utc(v) if isinstance(v, datetime) else v for v in row])
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        return
    yield from _table(columns, rows, width)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, Decimal):  # PostgreSQL's NUMERIC: a number, as on SQLite
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)


def _table(columns: list[str], rows: Iterator[tuple], width: int | None) -> Iterator[str]:
    head = list(itertools.islice(rows, TABLE_SIZING_ROWS))
    numeric = [
        all(_is_number(r[i]) for r in head if r[i] is not None)
        and any(r[i] is not None for r in head)
        for i in range(len(columns))
    ]
    head_cells = [_table_cells(r) for r in head]
    headers = [_text_width(c) for c in columns]
    values = [max([0] + [_text_width(r[i]) for r in head_cells]) for i in range(len(columns))]
    if width is None:
        widths = [max(h, v) for h, v in zip(headers, values, strict=True)]
    else:
        widths = _fit_widths(headers, values, width)

    def line(values: list[str]) -> str:
        cells = []
        for value, w, right in zip(values, widths, numeric, strict=True):
            if width is not None:
                value = _shorten(value, w)
            pad = " " * max(w - _text_width(value), 0)
            cells.append(pad + value if right else value + pad)
        text = "  ".join(cells).rstrip()
        if width is not None and _text_width(text) > width:  # even the narrowest columns
            text = _shorten(text, width, keep_end=False)
        return text + "\n"

    yield line(list(columns))
    yield line(["-" * w for w in widths])
    count = 0
    for cells in itertools.chain(head_cells, (_table_cells(r) for r in rows)):
        yield line(cells)
        count += 1
    yield f"({count} row)\n" if count == 1 else f"({count} rows)\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def _table_cells(row: tuple) -> list[str]:
    """A row as the table shows it: one line per row (control characters in a cell are
    escaped), floats rounded, timestamps ISO 8601 UTC."""
    cells = []
    for v in row:
        if v is None:
            cells.append("")
        elif isinstance(v, datetime):
            cells.append(iso_utc(v))
        elif isinstance(v, (float, Decimal)):
            cells.append(_rounded(float(v)))
        else:
            cells.append(display_path(str(v)))
    return cells


def _rounded(value: float) -> str:
    """``value`` to TABLE_FLOAT_DIGITS significant digits, trailing zeros kept so that a
    column reads evenly (0.5000); 10,000 and above as a whole number."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 10**TABLE_FLOAT_DIGITS:
        return f"{value:.0f}"
    return f"{value:#.{TABLE_FLOAT_DIGITS}g}"


def _fit_widths(headers: list[int], values: list[int], limit: int) -> list[int]:
    """Column widths whose line (two spaces between columns) fits in ``limit`` where it
    can: first the headers wider than their values are shortened (to TABLE_MIN_HEADER),
    then the widest columns are narrowed, none below TABLE_MIN_COLUMN (or its own
    width). What still does not fit is cut at the line's end (``_table``)."""
    gaps = 2 * (len(headers) - 1)
    natural = [max(h, v) for h, v in zip(headers, values, strict=True)]
    if sum(natural) + gaps <= limit:
        return natural
    base = [max(v, min(h, TABLE_MIN_HEADER)) for h, v in zip(headers, values, strict=True)]
    if sum(base) + gaps <= limit:
        return _give_back(base, natural, limit - gaps - sum(base))

    def capped(cap: int) -> list[int]:
        return [min(w, max(cap, TABLE_MIN_COLUMN)) for w in base]

    low, high = 0, max(base)  # the widest cap that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        if sum(capped(mid)) + gaps <= limit:
            low = mid
        else:
            high = mid - 1
    fitted = capped(low)
    return _give_back(fitted, base, limit - gaps - sum(fitted))


def _give_back(widths: list[int], wanted: list[int], spare: int) -> list[int]:
    """``widths`` with ``spare`` columns handed back, left to right, to those narrower
    than ``wanted``."""
    widths = list(widths)
    for i, want in enumerate(wanted):
        if spare <= 0:
            break
        extra = min(want - widths[i], spare)
        if extra > 0:
            widths[i] += extra
            spare -= extra
    return widths


def _text_width(text: str) -> int:
    """The columns ``text`` takes on a terminal (wide East Asian characters take two)."""
    if text.isascii():
        return len(text)
    return sum(_char_width(c) for c in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _shorten(text: str, width: int, *, keep_end: bool | None = None) -> str:
    """``text`` in at most ``width`` columns, with an ellipsis where it was cut. A path
    (a text with a ``/``) keeps its start and its file name, cut in the middle; any other
    text keeps its start. ``keep_end`` overrides the guess."""
    if _text_width(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    room = width - 1
    if keep_end is None:
        keep_end = "/" in text
    if not keep_end:
        return _take(text, room) + ELLIPSIS
    start = _take(text, room // 2)
    end = _take(text[::-1], room - _text_width(start))[::-1]
    return start + ELLIPSIS + end


def _take(text: str, width: int) -> str:
    """The longest start of ``text`` that fits in ``width`` columns."""
    if text.isascii():
        return text[:width]
    used = 0
    for i, char in enumerate(text):
        used += _char_width(char)
        if used > width:
            return text[:i]
    return text


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
