"""``review`` (the review queue, and reviews recorded or taken back), ``dataset`` (a
training set from the archive) and ``evaluate --db`` (the archive's own accuracy, on the
reviewed images; ``evaluate`` of cli/train.py hands its --db mode to ``evaluate_reviews``).
None of them imports TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import config
from ..errors import ExitCode, ModlabelError, UsageError
from ..timestamps import iso_utc
from .app import app
from .edge import command, say
from .options import DbOption, ModelIdOption, db_url, output_dir, reviewer_name

QUEUE_COLUMNS = [
    "rank",
    "id",
    "path",
    "label",
    "confidence",
    "runner_up",
    "runner_up_probability",
    "out_of_set",
    "ood_score",
    "dicom_modality",
    "score",
    "why",
]
# The queue as a CSV sheet to fill in: the columns --from-csv reads first (label empty),
# then the model's label and the rest of QUEUE_COLUMNS.
SHEET_COLUMNS = ["path", "label", "note", "reviewer", "model_label", *QUEUE_COLUMNS[4:], "id"]
SCHEMA_VERSION = 1  # of the JSON objects these commands print (outcome.py's conventions)

ReviewerOption = Annotated[
    str | None,
    typer.Option(
        "--reviewer",
        help="Who reviews (default: the user name of this session).",
        show_default=False,
    ),
]


def _json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, allow_nan=False))


def _review_dict(review: Any) -> dict[str, Any]:
    from ..paths import display_path

    return {
        "id": review.id,
        "path": display_path(review.path),
        "sha256": review.sha256,
        "label": review.label,
        "reviewer": review.reviewer,
        "reviewed_at": iso_utc(review.reviewed_at),
        "note": review.note,
        "strategy": review.strategy,
        "undone_at": iso_utc(review.undone_at) if review.undone_at is not None else None,
        "undone_by": review.undone_by,
    }


@command(app)
def review(
    db: DbOption = None,
    model: ModelIdOption = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="The queue: uncertainty (smallest top-2 margin first; the default), "
            "out-of-set (flagged first), disagreement (DICOM Modality contradicts the "
            "label), diverse (k-center greedy on the embeddings), typical (the most typical "
            "image of each cluster of the embeddings, for few reviews) or random (seeded, "
            "unbiased). With --set or --from-csv: the queue that chose the images, to record "
            "(default manual, csv).",
            show_default=False,
        ),
    ] = None,
    label: Annotated[
        str | None, typer.Option("--label", help="Only images the model gave this label.")
    ] = None,
    n: Annotated[int, typer.Option("-n", "--count", min=1, max=10000, help="How many.")] = 20,
    seed: Annotated[
        int, typer.Option("--seed", help="The random, diverse and typical queues' seed.")
    ] = 0,
    set_review: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--set",
            metavar="PATH_OR_ID LABEL",
            help="Record a review: the image (its stored path, a file's path, or #ID) is "
            "LABEL, a class of the model, or none (none of the classes).",
            show_default=False,
        ),
    ] = None,
    undo: Annotated[
        str | None,
        typer.Option(
            "--undo",
            metavar="PATH_OR_ID",
            help="Take back the image's latest review (the one before it, if any, holds again).",
            show_default=False,
        ),
    ] = None,
    from_csv: Annotated[
        Path | None,
        typer.Option(
            "--from-csv",
            help="Record the reviews of a CSV file: columns path,label[,note,reviewer] (a "
            "header row is optional). Each bad line is one error naming the line; the good "
            "lines are recorded.",
            show_default=False,
        ),
    ] = None,
    note: Annotated[
        str | None, typer.Option("--note", help="With --set: a note kept with the review.")
    ] = None,
    reviewer: ReviewerOption = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="The queue as a table, csv (a sheet to fill in: path, an empty label, note, "
            "reviewer, then the model's label; read back with --from-csv) or json; with a "
            "write, json prints its result.",
        ),
    ] = "table",
) -> None:
    """List the next images to review (already reviewed ones left out), or record reviews:
    the human labels, kept apart from the model's. A scan never changes them; the queries,
    images.csv and the report show them beside the model's label (label_final takes the
    review where there is one).

    Example: modlabel review --db labels.db --strategy uncertainty -n 20

    Example: modlabel review --db labels.db --set /archive/ct_0001.png abdominal_ct --note "scout"

    Example: modlabel review --db labels.db --from-csv reviewed.csv
    """
    from ..store.reviews import CSV, MANUAL, QUEUE_STRATEGIES, STRATEGIES, UNCERTAINTY

    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter(f"table, csv or json, not {fmt!r}", param_hint="--format")
    writes = [name for name, v in (("--set", set_review), ("--undo", undo),
                                   ("--from-csv", from_csv)) if v is not None]  # fmt: skip
    if len(writes) > 1:
        raise typer.BadParameter(f"{' and '.join(writes)}: one at a time")
    if note is not None and set_review is None:
        raise typer.BadParameter("only with --set", param_hint="--note")
    known = STRATEGIES if writes else QUEUE_STRATEGIES
    if strategy is not None and strategy not in known:
        raise typer.BadParameter(
            f"{strategy!r}: choose from {', '.join(known)}", param_hint="--strategy"
        )
    if set_review is not None:
        _set(db, model, set_review, note, reviewer_name(reviewer), strategy or MANUAL, fmt)
    elif undo is not None:
        _undo(db, model, undo, reviewer_name(reviewer), fmt)
    elif from_csv is not None:
        _import(db, model, from_csv, reviewer_name(reviewer), strategy or CSV, fmt)
    else:
        _list(db, model, strategy or UNCERTAINTY, label, n, seed, fmt)


def _open_for_writing(db: str | None, model: str | None) -> tuple[Any, Any]:
    from ..store import open_db, pick_model

    engine = open_db(db_url(db), create=False, migrate=True)
    return engine, pick_model(engine, model)


def _row_id(engine: Any, model_row: Any, text: str) -> int:
    from ..similar import stored_key

    row_id = stored_key(engine, model_row.id, text)
    if row_id is None:
        raise ModlabelError(f"{text}: no such image of model {model_row.identity}")
    return row_id


def _set(
    db: str | None,
    model: str | None,
    image_label: tuple[str, str],
    note: str | None,
    reviewer: str,
    strategy: str,
    fmt: str,
) -> None:
    from ..paths import display_path
    from ..review import parse_label
    from ..store import record_review

    engine, model_row = _open_for_writing(db, model)
    image, label_text = image_label
    label = parse_label(label_text)
    if label == "":
        raise typer.BadParameter("LABEL is empty: a class, or none", param_hint="--set")
    try:
        done = record_review(
            engine, _row_id(engine, model_row, image), label,
            reviewer=reviewer, strategy=strategy, note=note, model_id=model_row.id,
        )  # fmt: skip
    except UsageError as exc:  # a label that is no class: the command line's mistake
        raise typer.BadParameter(str(exc), param_hint="--set") from None
    if fmt == "json":
        _json(
            {
                "schema_version": SCHEMA_VERSION,
                "command": "review",
                "recorded": [_review_dict(done)],
            }
        )
        return
    shown = done.label if done.label is not None else "none of the classes"
    typer.echo(f"review #{done.id}: {display_path(done.path)} is {shown} (by {done.reviewer})")


def _undo(db: str | None, model: str | None, image: str, reviewer: str, fmt: str) -> None:
    from ..paths import display_path
    from ..store import current_review, undo_review

    engine, model_row = _open_for_writing(db, model)
    row_id = _row_id(engine, model_row, image)
    undone = undo_review(engine, row_id, reviewer=reviewer)
    now = current_review(engine, row_id)
    if fmt == "json":
        _json({
            "schema_version": SCHEMA_VERSION, "command": "review",
            "undone": _review_dict(undone),
            "current": _review_dict(now) if now is not None else None,
        })  # fmt: skip
        return
    was = undone.label if undone.label is not None else "none of the classes"
    after = (
        f"its review is #{now.id} again ({now.label or 'none of the classes'})"
        if now is not None
        else "it has no review now"
    )
    typer.echo(f"undid review #{undone.id} of {display_path(undone.path)} ({was}); {after}")


def _import(
    db: str | None, model: str | None, path: Path, reviewer: str, strategy: str, fmt: str
) -> None:
    from ..review import import_reviews_csv

    engine, model_row = _open_for_writing(db, model)
    result = import_reviews_csv(
        engine, path, model_id=model_row.id, reviewer=reviewer, strategy=strategy
    )
    for error in result.errors:
        say(f"{path}: {error}")
    if fmt == "json":
        _json({
            "schema_version": SCHEMA_VERSION, "command": "review", "recorded": result.recorded,
            "errors": [{"line": e.line, "reason": e.reason} for e in result.errors],
            "unlabeled": result.unlabeled,
        })  # fmt: skip
    else:
        bad = f"; {len(result.errors)} lines refused (above)" if result.errors else ""
        left = f"; {result.unlabeled} lines without a label skipped" if result.unlabeled else ""
        typer.echo(f"recorded {result.recorded} reviews from {path}{bad}{left}")
    if result.errors:  # the good lines are recorded; a script still learns of the bad ones
        raise typer.Exit(int(ExitCode.ERROR))


def _list(
    db: str | None, model: str | None, strategy: str, label: str | None, n: int, seed: int, fmt: str
) -> None:
    import sys

    from ..paths import display_path
    from ..review import review_queue
    from ..store import open_db, pick_model
    from .query import _format_rows, terminal_width

    engine = open_db(db_url(db), create=False, migrate=False)
    model_row = pick_model(engine, model)
    if label is not None and label not in model_row.class_names:
        known = ", ".join(model_row.class_names)
        raise typer.BadParameter(
            f"{label!r} is no class of the model; known: {known}", param_hint="--label"
        )
    items = review_queue(engine, model_row.id, strategy, label=label, n=n, seed=seed)
    rows = (
        (rank, i.row_id, display_path(i.path), i.label, i.confidence, i.runner_up,
         i.runner_up_probability, i.out_of_set, i.ood_score, i.dicom_modality, i.score, i.why)
        for rank, i in enumerate(items, start=1)
    )  # fmt: skip
    columns = QUEUE_COLUMNS
    if fmt == "csv":  # a sheet to fill in and --from-csv: path, label (empty), note, reviewer
        columns = SHEET_COLUMNS
        rows = ((r[2], "", "", "", *r[3:], r[1]) for r in rows)
    width = terminal_width() if fmt == "table" else None
    for chunk in _format_rows(columns, rows, fmt, width=width):
        sys.stdout.write(chunk)
    if not items:
        say(f"no unreviewed image of {model_row.identity} for the {strategy} queue")


def evaluate_reviews(
    db: str | None, model: str | None, *, as_json: bool, resamples: int, seed: int
) -> None:
    """``evaluate --db``: the model's labels against the reviewed images, printed as text
    or (``as_json``) one JSON object."""
    from ..accuracy import archive_accuracy, format_accuracy
    from ..store import open_db, pick_model, safe_url

    url = db_url(db)
    engine = open_db(url, create=False, migrate=False)
    model_row = pick_model(engine, model)
    result = archive_accuracy(engine, model_row, resamples=resamples, seed=seed)
    if result is None:
        raise ModlabelError(
            f"no image of model {model_row.identity} has a review yet: "
            "record some with `modlabel review --set` (or --from-csv)"
        )
    if as_json:
        _json({"schema_version": SCHEMA_VERSION, "command": "evaluate", "db": safe_url(url),
               **result.to_dict()})  # fmt: skip
        return
    for warning in result.warnings:
        say(f"warning: {warning}")
    typer.echo(format_accuracy(result))


@command(app)
def dataset(
    out: Annotated[
        Path, typer.Option("--out", help="A new (or empty) folder to write the data set to.")
    ],
    db: DbOption = None,
    model: ModelIdOption = None,
    reviewed_only: Annotated[
        bool,
        typer.Option(
            "--reviewed-only",
            help="Only the reviewed images (default: also the confidently labeled ones).",
        ),
    ] = False,  # fmt: skip
    copy: Annotated[
        bool, typer.Option("--copy", help="Copy the files (default: symbolic links to them).")
    ] = False,
    min_confidence: Annotated[
        float | None,
        typer.Option(
            "--min-confidence",
            min=0,
            max=1,
            help="The least confidence of an unreviewed image (default: the model's class-"
            f"average threshold, else {config.DEFAULT_CLASS_MIN_CONFIDENCE}).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object of what was written.")
    ] = False,
) -> None:
    """Write a training set from the archive: a folder per class of the model (the tree
    `modlabel train` reads), with the reviewed images under their reviewed class and,
    unless --reviewed-only, the unreviewed images labeled with at least --min-confidence
    and not flagged out of set (label_final). Images reviewed as none of the classes are
    left out. File names are cleaned and made unique; nothing is written outside --out;
    dataset.csv lists every file and where its label came from.

    Example: modlabel dataset --db labels.db --out reviewed/ --reviewed-only

    Example: modlabel train reviewed/ --out run2 --resume-from run
    """
    from ..dataset import write_dataset
    from ..store import open_db, pick_model

    output_dir(out, create=False)
    engine = open_db(db_url(db), create=False, migrate=False)
    model_row = pick_model(engine, model)
    try:
        result = write_dataset(
            engine, model_row, out, reviewed_only=reviewed_only, copy=copy,
            min_confidence=min_confidence,
        )  # fmt: skip
    except UsageError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from None
    if as_json:
        _json({
            "schema_version": SCHEMA_VERSION, "command": "dataset", "model": model_row.identity,
            "out": str(result.out), "files": result.files, "copied": result.copied,
            "classes": {name: {"folder": result.folders[name], "files": count}
                        for name, count in result.written.items()},
            "label_from": result.label_from, "left_out": result.left_out,
        })  # fmt: skip
        return
    how = "copies" if copy else "links"
    per_class = ", ".join(f"{result.folders[k]} {v}" for k, v in result.written.items())
    typer.echo(f"wrote {result.files} {how} to {out}: {per_class}")
    sources = ", ".join(f"{v} from the {k}" for k, v in sorted(result.label_from.items()))
    if sources:
        typer.echo(f"labels: {sources}")
    for reason, count in sorted(result.left_out.items()):
        typer.echo(f"left out: {count} {reason}")
