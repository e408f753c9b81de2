"""``report``: what the database knows, as an HTML page and files to take elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ModlabelError
from .app import app
from .edge import command
from .options import ClassConfidenceOption, DbOption, RiseMasksOption, db_url, output_dir
from .options import methods as methods_of
from .options import perturbation as perturbation_of
from .scan import JsonOption, printed_outcome


@command(app)
def report(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the report's files to.")],
    db: DbOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Model identity (or prefix) to report on; default: the newest."
        ),
    ] = None,
    examples: Annotated[
        int,
        typer.Option(
            min=0, help="Example images per class: this many most and as many least confident."
        ),
    ] = 4,
    min_confidence: ClassConfidenceOption = None,
    formats: Annotated[
        str,
        typer.Option(
            "--format",
            help="What to write, comma-separated: html (report.html), rois (class_rois.csv "
            "and .json), maps (class_maps/<class>.png, .nobox.png, .npy), images "
            "(images.csv, streamed), or all.",
        ),
    ] = "all",
    truth: Annotated[
        Path | None,
        typer.Option(
            "--truth",
            help="Ground truth to evaluate against: a ground_truth.jsonl as `modlabel synth` "
            "writes it, or a CSV of path,label. Class averages are then taken over the "
            "correctly classified images.",
        ),
    ] = None,
    truth_from_folders: Annotated[
        bool,
        typer.Option(
            "--truth-from-folders", help="Ground truth: each image's class is its folder's name."
        ),
    ] = False,
    faithfulness: Annotated[
        int,
        typer.Option(
            min=0,
            help="With ground truth: correctly classified images sampled for the "
            "faithfulness test (deletion and insertion curves; 0: none).",
        ),
    ] = 0,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="With ground truth: the map methods the evaluation scores, comma-separated, "
            "or all (default: cam, gradcam, crm; see `explain --methods`: scorecam and rise run "
            "the model again, once per channel or mask).",
        ),
    ] = None,
    rise_masks: RiseMasksOption = None,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="Print nothing but errors (not where the report went)."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a report: a self-contained HTML page (per class the count, the average CRM with
    its ROI box, a confidence histogram, the most and least confident images; the scans,
    failed and missing files) and the class ROIs, class maps and image rows as files.

    Example: modlabel report --db labels.db --out report/ --format html,rois
    """
    from ..outcome import Outcome, no_counts
    from ..report import build_report, parse_formats
    from ..store import open_db, pick_model, safe_url, utcnow

    output_dir(out, create=False)  # made once the options are known to be good
    url = db_url(db)
    outcome = None
    if as_json:
        outcome = Outcome("report", utcnow(), db=safe_url(url), counts=no_counts("report"))
    with printed_outcome(outcome):
        wanted = parse_formats(formats)
        truth_data = None
        if truth is not None or truth_from_folders:
            from ..evaluation import load_truth  # only with ground truth

            truth_data = load_truth(truth, from_folders=truth_from_folders)
        else:
            given = [name for name, value in (("--faithfulness", faithfulness),
                     ("--methods", methods), ("--rise-masks", rise_masks)) if value]  # fmt: skip
            if given:  # they shape the ground-truth evaluation alone
                raise ModlabelError(f"{given[0]} needs --truth or --truth-from-folders")
        engine = open_db(url, create=False, migrate=False)
        result = build_report(
            engine,
            out,
            model_identity=model,
            examples_per_class=examples,
            min_confidence=min_confidence,
            db_label=safe_url(url),
            formats=wanted,
            truth=truth_data,
            faithfulness=faithfulness,
            methods=methods_of(methods) if methods is not None else None,
            perturbation=perturbation_of(rise_masks),
        )
        if outcome is not None:
            outcome.model = pick_model(engine, model).identity
            outcome.counts = {
                "images": result.total_images,
                "classes": len(result.classes),
                "errors": result.errors,
                "out_of_set": result.out_of_set,
            }
            outcome.outputs = [str(path) for path in result.files]
    if quiet or as_json:  # stdout is the JSON object's alone
        return
    typer.echo(
        f"report: {out} ({result.total_images} images in {len(result.classes)} classes, "
        f"{result.out_of_set} out of set, {result.errors} errors)"
    )
    names = [path.relative_to(out).as_posix() for path in result.files]
    top = [name for name in names if "/" not in name]
    in_maps = len(names) - len(top)
    typer.echo("wrote " + ", ".join(top + ([f"class_maps/ ({in_maps} files)"] if in_maps else [])))
