"""The ``modlabel`` command line: a thin face over modlabel's Python API.

Each command turns its options into a call of a library function and prints
the result. TensorFlow is imported only inside ``train``, ``evaluate`` and
``export``; ``scan``, ``report``, ``query``, ``explain`` and ``localize`` never
load it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from . import config
from .errors import ExitCode, ModlabelError

app = typer.Typer(
    name="modlabel",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"modlabel {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Label the modality of medical images with a CNN and explain every label with a
    Class-selective Relevance Map (CRM)."""


DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto (CUDA where a GPU and onnxruntime's CUDA provider are there), cpu or cuda. "
        "CUDA counts only when it really loads; otherwise one line says so and the CPU runs.",
    ),
]

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help=f"SQLAlchemy URL or SQLite file (default: ${config.DB_ENV}, "
        f"else ./{config.DEFAULT_DB_FILE}).",
        show_default=False,
    ),
]


VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Show TensorFlow's own start-up and device logs (hidden by default).",
    ),
]


def _load_tensorflow(verbose: bool) -> None:
    """TensorFlow, quiet unless ``verbose``; a clear error where it is not installed."""
    try:
        from modlabel.train import load_tensorflow

        load_tensorflow(verbose=verbose)
    except ModuleNotFoundError as exc:
        raise ModlabelError(
            f"training and export need TensorFlow ({exc}): pip install 'modlabel[train]'"
        ) from None


def _fail(exc: ModlabelError) -> typer.Exit:
    typer.secho(f"modlabel: error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(exc.exit_code)


def _log_to_stderr() -> None:
    """modlabel's own warnings (a database retried, a lock waited for) on stderr, one line
    each; the libraries' (psycopg's notes on a lost connection) only when they are errors."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("modlabel: %(message)s"))
    handler.addFilter(
        lambda r: r.levelno >= (logging.WARNING if r.name.startswith("modlabel") else logging.ERROR)
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def _interactive() -> bool:
    return sys.stderr.isatty()


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the archive to.")],
    per_class: Annotated[int, typer.Option("--per-class", min=1, help="Images per class.")] = 50,
    size: Annotated[
        int,
        typer.Option(
            "--size", min=32, help="Typical image side in pixels (each image varies around it)."
        ),
    ] = 256,
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed; the same seed gives the same archive.")
    ] = 0,
) -> None:
    """Render a synthetic archive of the paper's seven modalities with ground-truth boxes.

    Example: modlabel synth demo/archive --per-class 100 --size 256 --seed 0
    """
    from .synth import render_archive

    summary = render_archive(
        out, per_class=per_class, size=size, seed=seed, progress=_interactive()
    )
    total = summary.total
    typer.echo(f"wrote {total} images in {len(summary.counts)} classes to {out}")
    typer.echo(f"ground truth: {summary.ground_truth}")


@app.command()
def train(
    data: Annotated[
        Path,
        typer.Argument(
            help="Folder-per-class archive, optionally with train/ val/ test/ subfolders."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    backbone: Annotated[str, typer.Option(help="tiny, vgg16, inceptionv3 or xception.")] = "tiny",
    input_size: Annotated[
        int, typer.Option("--input-size", min=32, help="Square input side in pixels.")
    ] = 300,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Maximum epochs; early stopping may end sooner "
            "(default 30; with --resume, the run's own).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 10,
    seed: Annotated[
        int, typer.Option(help="Seed for the split, initialization and augmentation.")
    ] = 0,
    weights: Annotated[
        str, typer.Option(help="imagenet, none, or a local .h5 / .weights.h5 file.")
    ] = "none",
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 1e-3,
    beta_1: Annotated[float, typer.Option("--beta-1", help="Adam's momentum.")] = 0.9,
    l2: Annotated[float, typer.Option(help="L2 penalty on the added layers.")] = 1e-4,
    patience: Annotated[int, typer.Option(help="Early-stopping patience in epochs.")] = 5,
    search: Annotated[
        int,
        typer.Option(min=0, help="Randomized search trials before the final training (0: none)."),
    ] = 0,
    search_epochs: Annotated[
        int, typer.Option("--search-epochs", min=1, help="Epochs of each search trial.")
    ] = 2,
    head_filters: Annotated[
        int | None,
        typer.Option(
            "--head-filters", min=1, help="Filters of the added conv (default 512; tiny 128)."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the run's last checkpoint.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Train the paper's conv/GAP/dense head on a backbone (TensorFlow).

    Example: modlabel train demo/archive --out demo/run --backbone tiny --input-size 128
    """
    try:
        _load_tensorflow(verbose)
        from modlabel.train.fit import train_run

        run_dir = train_run(
            data,
            out,
            backbone=backbone,
            input_size=(input_size, input_size),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            weights=weights,
            learning_rate=learning_rate,
            beta_1=beta_1,
            l2=l2,
            patience=patience,
            search=search,
            search_epochs=search_epochs,
            head_filters=head_filters,
            resume=resume,
            verbose=True,
        )
    except ModlabelError as exc:
        raise _fail(exc) from None
    typer.echo(f"run written to {run_dir}")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder written by `modlabel train`.")],
    split: Annotated[str, typer.Option(help="Which split to evaluate on.")] = "test",
    verbose: VerboseOption = False,
) -> None:
    """Compute the paper's Table 2 metrics on a run's test split, or --split val (TensorFlow).

    Example: modlabel evaluate demo/run
    """
    try:
        _load_tensorflow(verbose)
        from modlabel.metrics import format_metrics_table
        from modlabel.train.evaluate import evaluate_run

        metrics = evaluate_run(run, split=split)
    except ModlabelError as exc:
        raise _fail(exc) from None
    typer.echo(format_metrics_table(metrics))


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `modlabel train`.")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write.")],
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    quantize: Annotated[
        str,
        typer.Option(
            help="none, or int8: also write a static int8 model beside --out "
            "(M.onnx -> M.int8.onnx), calibrated on the training split and refused "
            "when its labels agree with fp32's on less than --min-agreement of the test split."
        ),
    ] = "none",
    calibration: Annotated[
        int, typer.Option(min=1, help="Training images to calibrate int8 on (fewer if fewer).")
    ] = 64,
    min_agreement: Annotated[
        float,
        typer.Option(
            "--min-agreement",
            min=0.0,
            max=1.0,
            help="Least share of test images on which int8 and fp32 give the same label.",
        ),
    ] = 0.995,
    ood_rate: Annotated[
        float,
        typer.Option(
            "--ood-rate",
            min=0.0,
            max=0.99,
            help="Most share of the validation split the out-of-set threshold may flag.",
        ),
    ] = 0.05,
    verbose: VerboseOption = False,
) -> None:
    """Export a run to one self-contained ONNX file with outputs logits and activations.

    Fits a temperature (calibrated confidences) and an out-of-set threshold on the
    run's validation split and stores them in the file's metadata.

    Example: modlabel export demo/run --out demo/model.onnx --quantize int8
    """
    if quantize not in ("none", "int8"):
        raise typer.BadParameter(f"{quantize!r}: choose none or int8", param_hint="--quantize")
    try:
        _load_tensorflow(verbose)
        from modlabel.export.onnx_export import export_run

        report = export_run(run, out, opset=opset, ood_rate=ood_rate)
    except ModlabelError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"wrote {report.out_path} (opset {report.opset}); parity: max |Δlogits| "
        f"{report.max_abs_logits_diff:.2e}, max rel. |Δactivations| "
        f"{report.max_rel_activations_diff:.2e}"
    )
    c = report.calibration
    if c is None:
        typer.echo("not calibrated: the run's images cannot be read (temperature 1, no threshold)")
    else:
        typer.echo(
            f"temperature {c.temperature:.4f} (fitted on {c.validation_images} val images; "
            f"NLL {c.nll_before:.4f} -> {c.nll_after:.4f})\n"
            f"ECE (15 bins) on {c.test_images} {c.test_split} images: "
            f"{c.ece_before:.4f} before, {c.ece_after:.4f} after\n"
            f"out-of-set: Mahalanobis distance of the GAP embedding, threshold "
            f"{c.rule.threshold:.4g} (at most {c.rule.rate:.0%} of val); flags "
            f"{c.test_flagged:.1%} of the {c.test_split} images"
        )
    if quantize == "none":
        return
    try:
        from modlabel.export.quantize import int8_path, quantize_run

        q = quantize_run(
            run,
            report.out_path,
            int8_path(report.out_path),
            calibration=calibration,
            min_agreement=min_agreement,
        )
    except ModlabelError as exc:
        raise _fail(exc) from None
    f = q.fidelity
    typer.echo(
        f"wrote {q.out_path} (int8, {q.options.describe()}; calibrated on "
        f"{q.calibration_images} training images)\n"
        f"label agreement with fp32: {f.agreement:.2%} of {f.images} {q.evaluation_split} "
        f"images (--min-agreement {q.min_agreement:g})\n"
        f"logits correlation: {f.logits_correlation:.5f}\n"
        f"CRM correlation per image: min {f.crm_correlation_min:.5f}, "
        f"mean {f.crm_correlation_mean:.5f}"
    )


SCAN_EXIT_CODES = """Exit codes: 0 done (files that could not be labeled are rows with
their error, not a failure); 2 bad command line; 3 a root or table does not
exist; 4 the model cannot be loaded; 5 the database cannot be reached,
opened or written; 6 another scan of this model holds the database's lock;
7 interrupted by a signal; 1 any other error."""


@app.command(epilog=SCAN_EXIT_CODES)
def scan(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files or folders to label.")] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help=f"ONNX model (default: ${config.MODEL_ENV}).")
    ] = None,
    db: DbOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = config.DEFAULT_BATCH_SIZE,
    commit_every: Annotated[
        int,
        typer.Option(
            "--commit-every",
            min=1,
            help="Labeled rows per database transaction (and at least every 2 s): larger writes "
            "faster, smaller keeps more of a killed scan.",
        ),
    ] = config.DEFAULT_COMMIT_ROWS,
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = 2,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="Print nothing but errors (the default when not on a terminal)."
        ),
    ] = False,
    table: Annotated[
        str | None,
        typer.Option(
            "--table", help="Read the image paths from this database table instead of PATHS."
        ),
    ] = None,
    path_column: Annotated[
        str, typer.Option("--path-column", help="The --table column holding paths.")
    ] = "path",
    id_column: Annotated[
        str | None,
        typer.Option(
            "--id-column",
            help="The --table column of figure ids, stored with each label (images.source_id).",
        ),
    ] = None,
    blob_column: Annotated[
        str | None,
        typer.Option(
            "--blob-column",
            help="The --table column holding the image bytes themselves (needs --id-column).",
        ),
    ] = None,
    table_db: Annotated[
        str | None,
        typer.Option("--table-db", help="Database of --table (default: the --db database)."),
    ] = None,
    base_dir: Annotated[
        Path | None,
        typer.Option("--base-dir", help="Folder that relative paths of --table are relative to."),
    ] = None,
    retry_errors: Annotated[
        bool,
        typer.Option(
            "--retry-errors", help="Try files stored with an error again, even if unchanged."
        ),
    ] = False,
    follow_symlinks: Annotated[
        bool,
        typer.Option(
            "--follow-symlinks",
            help="Descend into linked folders (each folder is walked once, loops included).",
        ),
    ] = False,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            help="Glob of file names that are images (repeatable; default: the image "
            "suffixes). A glob with '/' matches the whole path.",
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Glob of file names to pass over (repeatable)."),
    ] = None,
    class_min_confidence: Annotated[
        float,
        typer.Option(
            "--class-min-confidence",
            min=0,
            max=1,
            help="Confidence an image needs to count in its class's average map (Eq. 8).",
        ),
    ] = config.DEFAULT_CLASS_MIN_CONFIDENCE,
    abstain: Annotated[
        bool,
        typer.Option(
            "--abstain",
            help="Store no label (NULL) for images the model flags out of set; without it "
            "they keep their label, flagged in images.out_of_set.",
        ),
    ] = False,
    max_file_size: Annotated[
        str,
        typer.Option(
            "--max-file-size",
            help="Refuse larger files before reading them (a row with the reason): e.g. 256M, 2G.",
        ),
    ] = "256M",
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="If another scan of this model is running, wait for it (else exit 6)."
        ),
    ] = False,
    db_retry: Annotated[
        float,
        typer.Option(
            "--db-retry",
            min=0,
            help="Seconds to keep retrying when the database is unreachable (a restart, a "
            "failover) before giving up with exit code 5.",
        ),
    ] = config.DEFAULT_DB_RETRY_SECONDS,
    device: DeviceOption = "auto",
    engine_name: Annotated[
        str,
        typer.Option(
            "--engine",
            help="Where files are decoded and labeled: local (this process) or ray (a Ray "
            "cluster's actors, pip install 'modlabel[ray]'; the paths must be readable on "
            "every node). The database is written from here either way.",
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="--engine ray: the cluster (auto, host:port or ray://host:port; default: "
            "$RAY_ADDRESS, a cluster started here, else a new local one).",
        ),
    ] = None,
    actors: Annotated[
        int, typer.Option("--actors", min=1, help="--engine ray: actors, one model each.")
    ] = 2,
    gpus_per_actor: Annotated[
        float,
        typer.Option("--gpus-per-actor", min=0, help="--engine ray: GPUs per actor (0: CPU)."),
    ] = 0.0,
) -> None:
    """Label every new or changed image under PATHS and store labels and CRMs.

    Unchanged files (same size and mtime, or same content) are skipped, so a
    nightly cron job only pays for what is new. Unreadable images, FIFOs,
    devices and files over --max-file-size become rows with an error; the
    scan goes on. One scan per model and database runs at a time.

    Example: modlabel scan /archive --model model.onnx --db sqlite:///labels.db

    Or, for figures catalogued in a table:
    modlabel scan --table figures --path-column file --base-dir /figures --model model.onnx
    """
    from .model import OnnxModel
    from .paths import display_fs_path
    from .scan import scan_archive
    from .source import ImageFilter, parse_size, table_files
    from .store import open_db

    _log_to_stderr()
    show = _interactive() and not quiet
    model_path = config.resolve_model_path(model)
    if model_path is None:
        raise _fail(ModlabelError(f"no model: pass --model or set ${config.MODEL_ENV}"))
    if not paths and table is None:
        raise _fail(ModlabelError("nothing to scan: give PATHS or --table"))
    try:
        max_bytes = parse_size(max_file_size)
    except ValueError as exc:
        raise _fail(ModlabelError(f"--max-file-size: {exc}")) from None
    if engine_name not in ("local", "ray"):
        raise _fail(ModlabelError(f"--engine: local or ray, not {engine_name!r}"))
    if engine_name == "ray" and blob_column is not None:
        raise _fail(ModlabelError("--engine ray reads files, not --blob-column figures"))
    try:
        run_pipeline = None
        if engine_name == "ray":
            from .scan_ray import ray_pipeline

            run_pipeline = ray_pipeline(
                address=address, actors=actors, gpus_per_actor=gpus_per_actor, device=device
            )
        with _signals_interrupt():
            onnx_model = OnnxModel(model_path, device=device)
            url = config.resolve_db_url(db)
            engine = open_db(url, retry_seconds=db_retry)
            entries, roots = None, [str(p) for p in paths or []]
            if table is not None:
                source_url = config.resolve_db_url(table_db) if table_db else url
                entries = table_files(
                    source_url,
                    table,
                    path_column,
                    id_column=id_column,
                    blob_column=blob_column,
                    base_dir=base_dir,
                    max_bytes=max_bytes,
                )
                roots = [f"table:{table}.{blob_column or path_column}"]
            bar = None
            if show:
                from tqdm import tqdm

                bar = tqdm(unit="img", desc="scan", dynamic_ncols=True)
            try:
                stats = scan_archive(
                    roots,
                    onnx_model,
                    engine,
                    entries=entries,
                    retry_errors=retry_errors,
                    batch_size=batch_size,
                    workers=workers,
                    on_progress=bar.update if bar is not None else None,
                    follow_symlinks=follow_symlinks,
                    max_file_bytes=max_bytes,
                    image_filter=ImageFilter(tuple(include or ()), tuple(exclude or ())),
                    class_min_confidence=class_min_confidence,
                    abstain=abstain,
                    commit_rows=commit_every,
                    wait=wait,
                    db_retry=db_retry,
                    run_pipeline=run_pipeline,
                )
            finally:
                if bar is not None:
                    bar.close()
    except ModlabelError as exc:
        raise _fail(exc) from None
    for path, reason in stats.error_paths:
        typer.echo(f"modlabel: {display_fs_path(path)}: {reason}", err=True)
    if stats.errors > len(stats.error_paths):
        more = stats.errors - len(stats.error_paths)
        typer.echo(f"modlabel: ... and {more} more errors (see images.error)", err=True)
    if show:
        if stats.interrupted_before:
            typer.echo(f"{stats.interrupted_before} earlier run(s) had died; marked interrupted")
        typer.echo(
            f"scan #{stats.scan_id}: {stats.seen} files: {stats.labeled} labeled, "
            f"{stats.unchanged} unchanged, {stats.errors} errors, {stats.skipped} skipped "
            f"as not images, {stats.missing} found gone, in {stats.seconds:.1f} s "
            f"({stats.images_per_second:.1f} images/s)"
        )


class _signals_interrupt:
    """SIGTERM (cron's or systemd's stop) and SIGINT stop the scan at its next safe point
    (``modlabel.stopping``), so it records itself as interrupted and exits 7; a second
    signal stops at once."""

    def __enter__(self) -> _signals_interrupt:
        from . import stopping

        stopping.reset()
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Not in the main thread (an embedding application), signals stay as they are.
            with contextlib.suppress(ValueError):
                self.previous[sig] = signal.signal(sig, self._request_stop)
        return self

    @staticmethod
    def _request_stop(signum: int, _frame: object) -> None:
        from . import stopping

        stopping.request(f"interrupted by {signal.Signals(signum).name}")

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@app.command()
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
    min_confidence: Annotated[
        float | None,
        typer.Option(
            "--min-confidence",
            min=0,
            max=1,
            help="Confidence an image needs to count in its class's average map "
            "(default: the threshold the scans keep the averages for).",
        ),
    ] = None,
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
) -> None:
    """Write a report: a self-contained HTML page (per class the count, the average CRM with
    its ROI box, a confidence histogram, the most and least confident images; the scans,
    failed and missing files) and the class ROIs, class maps and image rows as files.

    Example: modlabel report --db labels.db --out report/ --format html,rois
    """
    from .report import build_report, parse_formats
    from .store import open_db, safe_url

    try:
        wanted = parse_formats(formats)
        truth_data = None
        if truth is not None or truth_from_folders:
            from .evaluation import load_truth  # only with ground truth

            truth_data = load_truth(truth, from_folders=truth_from_folders)
        elif faithfulness:
            raise ModlabelError("--faithfulness needs --truth or --truth-from-folders")
        url = config.resolve_db_url(db)
        result = build_report(
            open_db(url, create=False),
            out,
            model_identity=model,
            examples_per_class=examples,
            min_confidence=min_confidence,
            db_label=safe_url(url),
            formats=wanted,
            truth=truth_data,
            faithfulness=faithfulness,
        )
    except ModlabelError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"report: {out} ({result.total_images} images, "
        f"{len(result.classes)} classes, {result.errors} errors)"
    )
    names = [path.relative_to(out).as_posix() for path in result.files]
    top = [name for name in names if "/" not in name]
    in_maps = len(names) - len(top)
    typer.echo("wrote " + ", ".join(top + ([f"class_maps/ ({in_maps} files)"] if in_maps else [])))


@app.command()
def prune(
    db: DbOption = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model identity (or prefix); default: the newest."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the rows that would go; delete nothing.")
    ] = False,
) -> None:
    """Delete the rows of files that scans found gone (images.missing_since).

    Missing files already leave counts, class averages, the report and the
    named queries; prune removes their rows for good. It takes the scan lock,
    so it never runs beside a scan of the same model.

    Example: modlabel prune --db labels.db --dry-run
    """
    from .lock import acquire_scan_lock
    from .paths import display_path
    from .store import iter_missing, open_db, pick_model, prune_missing

    try:
        engine = open_db(config.resolve_db_url(db), create=False)
        model_row = pick_model(engine, model)
        if dry_run:
            count = 0
            for path, since in iter_missing(engine, model_row.id):
                typer.echo(f"{display_path(path)}\tmissing since {since:%Y-%m-%d %H:%M}")
                count += 1
            typer.echo(f"{count} missing files would be pruned (dry run)", err=True)
            return
        lock = acquire_scan_lock(engine, model_row.id)
        try:
            count = prune_missing(engine, model_row.id)
        finally:
            lock.release()
    except ModlabelError as exc:
        raise _fail(exc) from None
    typer.echo(f"pruned {count} rows of missing files")


@app.command()
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
    from .queries import list_queries, load_query, load_sql_file, open_query
    from .store import open_db

    if name is not None and sql_file is not None:
        raise _fail(ModlabelError("give a query NAME or --sql-file, not both"))
    if name is None and sql_file is None:
        for q in list_queries():
            params = " ".join(f"{p}=..." for p in q.parameters)
            typer.echo(f"{q.name:<22} {q.description}" + (f"  [{params}]" if params else ""))
        return
    params: dict[str, str] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise _fail(ModlabelError(f"--param takes NAME=VALUE, got {item!r}"))
        params[key.strip()] = value
    if fmt not in ("table", "csv", "json"):
        raise _fail(ModlabelError(f"--format must be table, csv or json, not {fmt!r}"))
    try:
        engine = open_db(config.resolve_db_url(db), create=False)
        named = load_sql_file(sql_file) if sql_file is not None else load_query(name)
        with open_query(engine, named, params) as result:
            for chunk in _format_rows(result.columns, result.rows, fmt):
                sys.stdout.write(chunk)
    except ModlabelError as exc:
        raise _fail(exc) from None


# The table format sizes its columns on the first rows, then streams the rest.
TABLE_SIZING_ROWS = 200


def _format_rows(columns: list[str], rows: Iterator[tuple], fmt: str) -> Iterator[str]:
    """The rows as text in ``fmt`` (table, csv or json), streamed a line at a time."""
    import csv
    import io
    import json

    from .paths import display_path

    if fmt == "json":
        yield "["
        for i, row in enumerate(rows):
            item = json.dumps(dict(zip(columns, row, strict=True)), default=str)
            yield ("\n " if i == 0 else ",\n ") + item
        yield "\n]\n"
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
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


@app.command()
def bench(
    images: Annotated[
        Path | None,
        typer.Argument(help="A folder of your images to sample (default: a synthetic archive)."),
    ] = None,
    model: Annotated[
        list[Path] | None,
        typer.Option(
            "--model", help="ONNX model; repeat to compare (an fp32 model and its int8 export)."
        ),
    ] = None,
    sample: Annotated[int, typer.Option("--sample", min=1, help="Images to measure on.")] = 64,
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds", min=1, help="Measure everything this many times in turn; keep the best."
        ),
    ] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = config.DEFAULT_BATCH_SIZE,
    device: DeviceOption = "auto",
    db: Annotated[
        str | None,
        typer.Option("--db", help="Database to time row writes on (default: a scratch SQLite)."),
    ] = None,
    compare: Annotated[
        tuple[str, Path] | None,
        typer.Option(
            "--compare",
            help="keras RUN: also time the Keras + GradientTape Grad-CAM a user would write "
            "instead, on the run's Keras model (needs TensorFlow).",
        ),
    ] = None,
) -> None:
    """Measure the model, the whole scan, decoding, the maps and the database on this machine.

    Each figure comes from a fresh process of its own, one after the other, on
    the same images; nothing is written to your archive, and the rows timed on
    --db are removed.

    Example: modlabel bench /archive/sample --model model.onnx --model model.int8.onnx
    """
    from .bench import run_bench

    models = list(model or [])
    if not models:
        env_model = config.resolve_model_path(None)
        models = [env_model] if env_model is not None else []
    if not models:
        raise _fail(ModlabelError(f"no model: pass --model or set ${config.MODEL_ENV}"))
    keras_run = None
    if compare and compare[0] is not None:
        if compare[0] != "keras":
            raise _fail(ModlabelError(f"--compare takes keras RUN, not {compare[0]!r}"))
        keras_run = compare[1]
    try:
        result = run_bench(
            [str(m) for m in models],
            images=images,
            sample=sample,
            batch_size=batch_size,
            device=device,
            db_url=config.resolve_db_url(db) if db else None,
            keras_run=keras_run,
            rounds=rounds,
        )
    except ModlabelError as exc:
        raise _fail(exc) from None
    typer.echo(result.format(), nl=False)


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="Images to explain.")],
    model: Annotated[
        Path | None, typer.Option("--model", help=f"ONNX model (default: ${config.MODEL_ENV}).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the figures.")] = Path("explain"),
    device: DeviceOption = "auto",
) -> None:
    """Label images and draw CAM, Grad-CAM and CRM side by side (paper Figure 5).

    Example: modlabel explain scan.jpg --model model.onnx --out figures/
    """
    from .explain import explain_images
    from .model import OnnxModel

    model_path = config.resolve_model_path(model)
    if model_path is None:
        raise _fail(ModlabelError(f"no model: pass --model or set ${config.MODEL_ENV}"))
    try:
        results = explain_images(
            [str(p) for p in images], OnnxModel(model_path, device=device), out
        )
    except ModlabelError as exc:
        raise _fail(exc) from None
    failed = 0
    for r in results:
        if r.error:
            failed += 1
            typer.echo(f"modlabel: {r.path}: {r.error}", err=True)
        else:
            typer.echo(f"{r.path}\t{r.label}\t{r.confidence:.3f}\t{r.figure}")
    if failed:
        raise typer.Exit(1)


@app.command()
def localize(
    archive: Annotated[
        Path, typer.Argument(help="Archive with a ground_truth.jsonl, as `modlabel synth` writes.")
    ],
    model: Annotated[
        Path | None, typer.Option("--model", help=f"ONNX model (default: ${config.MODEL_ENV}).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="JSON file to write.")] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=1, help="Only the first N images of ground_truth.jsonl (file order)."
        ),
    ] = None,
) -> None:
    """Score CAM, Grad-CAM and CRM against the archive's ground-truth boxes.

    Prints the paper's Table 3 (ROI pixels and ratio at 300x300, per class and
    method), then the pointing game, ROI precision and recall and the ROI share
    on distractors, over correctly classified images.

    Example: modlabel localize demo/incoming --model demo/model.onnx --out localize.json
    """
    from .localize import evaluate_localization
    from .model import OnnxModel

    model_path = config.resolve_model_path(model)
    if model_path is None:
        raise _fail(ModlabelError(f"no model: pass --model or set ${config.MODEL_ENV}"))
    try:
        result = evaluate_localization(archive, OnnxModel(model_path), limit=limit)
    except ModlabelError as exc:
        raise _fail(exc) from None
    typer.echo(result.format_table(), nl=False)
    if out is not None:
        try:
            out.write_text(result.to_json() + "\n", encoding="utf-8")
        except OSError as exc:
            raise _fail(ModlabelError(f"{out}: cannot write: {exc.strerror or exc}")) from None
        typer.echo(f"wrote {out}")


def main() -> None:
    """The console entry point: ``app`` with no traceback for a user, whatever happens.

    Errors of modlabel's own are handled in each command. What reaches here
    is a closed pipe (``modlabel query ... | head``), Ctrl-C outside a scan,
    or a bug: one line and an exit code; MODLABEL_DEBUG=1 shows the traceback.
    """
    try:
        app(standalone_mode=True)
    except BrokenPipeError:
        # The reader went away; say nothing, like other Unix tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(ExitCode.ERROR)
    except KeyboardInterrupt:
        typer.echo("modlabel: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as exc:
        if os.environ.get("MODLABEL_DEBUG"):
            raise
        typer.echo(
            f"modlabel: internal error: {type(exc).__name__}: {exc} "
            "(MODLABEL_DEBUG=1 shows the traceback; please report it)",
            err=True,
        )
        sys.exit(ExitCode.INTERNAL)
