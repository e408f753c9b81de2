"""Commands that make a model: ``synth`` (a synthetic archive), ``train``, ``evaluate``
and ``export`` (TensorFlow, imported only here and only when they run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ModlabelError
from .app import app
from .edge import command, fail, interactive
from .options import VerboseOption
from .review import evaluate_reviews


def _load_tensorflow(verbose: bool) -> None:
    """TensorFlow, quiet unless ``verbose``; a clear error where it is not installed."""
    try:
        from modlabel.train import load_tensorflow

        load_tensorflow(verbose=verbose)
    except ModuleNotFoundError as exc:
        raise ModlabelError(
            f"training and export need TensorFlow ({exc}): pip install 'modlabel[train]'"
        ) from None


@command(app)
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
    noise: Annotated[
        float,
        typer.Option(
            "--noise",
            min=0.0,
            max=1.0,
            help="Extra Gaussian noise on every pixel, its standard deviation as a share of "
            "the full scale (0.08: a noisier scanner than the default archive's, a shifted "
            "style); 0 adds none.",
        ),
    ] = 0.0,
) -> None:
    """Render a synthetic archive of the paper's seven modalities with ground-truth boxes.

    Example: modlabel synth demo/archive --per-class 100 --size 256 --seed 0

    Example: modlabel synth demo/shifted --per-class 60 --size 200 --seed 5 --noise 0.08
    """
    from ..synth import render_archive

    summary = render_archive(
        out, per_class=per_class, size=size, seed=seed, noise=noise, progress=interactive()
    )
    total = summary.total
    typer.echo(f"wrote {total} images in {len(summary.counts)} classes to {out}")
    typer.echo(f"ground truth: {summary.ground_truth}")


@command(app)
def train(
    ctx: typer.Context,
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
            "(default 30; with --resume, the run's own; with --resume-from, 10).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 10,
    seed: Annotated[
        int, typer.Option(help="Seed for the split, initialization and augmentation.")
    ] = 0,
    weights: Annotated[
        str, typer.Option(help="imagenet, none, or a local .h5 / .weights.h5 file.")
    ] = "none",
    learning_rate: Annotated[
        float | None,
        typer.Option(
            "--learning-rate",
            help="Adam's learning rate (default 1e-3; with --resume-from 1e-4, a tenth, "
            "so that fine-tuning adjusts the model rather than retrains it).",
            show_default=False,
        ),
    ] = None,
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
    resume_from: Annotated[
        Path | None,
        typer.Option(
            "--resume-from",
            metavar="RUN",
            help="Fine-tune RUN's model on DATA (e.g. the folder `modlabel dataset` writes) "
            "into a new run at --out: RUN's classes (DATA must have exactly these class "
            "folders), backbone, input size and normalization; up to 10 epochs by default.",
            show_default=False,
        ),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Train the paper's conv/GAP/dense head on a backbone (TensorFlow), or fine-tune a
    finished run's model on new data (--resume-from).

    Example: modlabel train demo/archive --out demo/run --backbone tiny --input-size 128

    Example: modlabel train demo/reviewed --out demo/run2 --resume-from demo/run --epochs 5
    """
    if resume_from is not None:
        _refuse_model_options(ctx, ("backbone", "input_size", "weights", "head_filters", "search"))
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
            resume_from=resume_from,
            verbose=True,
        )
    except ModlabelError as exc:
        raise fail(exc) from None
    typer.echo(f"run written to {run_dir}")


def _refuse_model_options(ctx: typer.Context, names: tuple[str, ...]) -> None:
    """--resume-from takes the model from its run: options that would define another
    model are refused (usage error, exit 2) rather than ignored."""
    given = [
        "--" + name.replace("_", "-")
        for name in names
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    ]
    if given:
        raise typer.BadParameter(
            f"{', '.join(given)}: the model comes from --resume-from's run; leave "
            f"{'it' if len(given) == 1 else 'them'} out",
            param_hint="--resume-from",
        )


@command(app)
def evaluate(
    run: Annotated[
        Path | None,
        typer.Argument(
            help="Run folder written by `modlabel train` (not with --db).", show_default=False
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Which split to evaluate on.")] = "test",
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="Instead of a run: measure a scanned archive's labels against its reviewed "
            "images (`modlabel review`), with 95% intervals; no TensorFlow.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="With --db: model identity (or prefix); default: the newest."),
    ] = None,
    resamples: Annotated[
        int, typer.Option("--resamples", min=100, help="With --db: bootstrap resamples.")
    ] = 2000,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --db: print one JSON object.")
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Compute the paper's Table 2 metrics on a run's test split, or --split val (TensorFlow);
    or, with --db, on the reviewed images of a scanned archive (see `modlabel review`).

    Example: modlabel evaluate demo/run

    Example: modlabel evaluate --db labels.db --json
    """
    if db is not None:
        if run is not None:
            raise typer.BadParameter("a RUN or --db, not both", param_hint="--db")
        evaluate_reviews(db, model, as_json=as_json, resamples=resamples, seed=0)
        return
    if run is None:
        raise typer.BadParameter("give a RUN folder, or --db URL", param_hint="RUN")
    try:
        _load_tensorflow(verbose)
        from modlabel.metrics import format_metrics_table
        from modlabel.train.evaluate import evaluate_run

        metrics = evaluate_run(run, split=split)
    except ModlabelError as exc:
        raise fail(exc) from None
    typer.echo(format_metrics_table(metrics))


@command(app)
def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `modlabel train`.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The fp32 ONNX file to write (always written; with --quantize int8 the "
            "int8 model goes to --int8-out).",
        ),
    ],
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    quantize: Annotated[
        str,
        typer.Option(
            help="none, or int8: also write a static int8 model to --int8-out, calibrated on "
            "the training split and refused when its labels agree with fp32's on less than "
            "--min-agreement of the test split."
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
    int8_out: Annotated[
        Path | None,
        typer.Option(
            "--int8-out",
            help="With --quantize int8: the int8 ONNX file to write (default: beside --out, "
            "M.onnx -> M.int8.onnx).",
            show_default=False,
        ),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Export a run to one self-contained ONNX file with outputs logits and activations.

    Fits a temperature (calibrated confidences) and an out-of-set threshold on the
    run's validation split and stores them in the file's metadata. --out is the fp32
    model; --quantize int8 adds an int8 one (--int8-out). Both paths are printed, labeled.

    Example: modlabel export demo/run --out demo/model.onnx --quantize int8
    (writes fp32 demo/model.onnx and int8 demo/model.int8.onnx)
    """
    if quantize not in ("none", "int8"):
        raise typer.BadParameter(f"{quantize!r}: choose none or int8", param_hint="--quantize")
    int8_target = export_int8_path(out, int8_out, quantize)
    try:
        _load_tensorflow(verbose)
        from modlabel.export.onnx_export import export_run

        report = export_run(run, out, opset=opset, ood_rate=ood_rate)
    except ModlabelError as exc:
        raise fail(exc) from None
    typer.echo(
        f"wrote fp32 model {report.out_path} (opset {report.opset}); parity: max |Δlogits| "
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
    if int8_target is None:
        return
    try:
        from modlabel.export.quantize import quantize_run

        q = quantize_run(
            run,
            report.out_path,
            int8_target,
            calibration=calibration,
            min_agreement=min_agreement,
        )
    except ModlabelError as exc:
        raise fail(exc) from None
    f = q.fidelity
    typer.echo(
        f"wrote int8 model {q.out_path} ({q.options.describe()}; calibrated on "
        f"{q.calibration_images} training images)\n"
        f"label agreement with fp32: {f.agreement:.2%} of {f.images} {q.evaluation_split} "
        f"images (--min-agreement {q.min_agreement:g})\n"
        f"logits correlation: {f.logits_correlation:.5f}\n"
        f"CRM correlation per image: min {f.crm_correlation_min:.5f}, "
        f"mean {f.crm_correlation_mean:.5f}"
    )
    typer.echo(f"fp32: {report.out_path}\nint8: {q.out_path}")


def export_int8_path(out: Path, int8_out: Path | None, quantize: str) -> Path | None:
    """Where ``export`` writes the int8 model (None: it writes none), checked before the
    export's long work: ``--int8-out``, else ``int8_path(--out)`` beside the fp32 model.

    ``--out model.int8.onnx`` without ``--int8-out`` is refused: --out is the fp32
    model, and the int8 one would land at ``model.int8.int8.onnx``."""
    from modlabel.export.quantize import INT8_SUFFIX, int8_path

    if quantize != "int8":
        if int8_out is not None:
            raise typer.BadParameter("needs --quantize int8", param_hint="--int8-out")
        return None
    if int8_out is None:
        if out.name.endswith(INT8_SUFFIX):
            fp32 = out.with_name(out.name[: -len(INT8_SUFFIX)] + ".onnx")
            raise typer.BadParameter(
                f"{out} is where the fp32 model goes, and its name says int8: pass "
                f"--out {fp32} (the int8 model then goes to {int8_path(fp32)}), or name "
                "the int8 file with --int8-out",
                param_hint="--out",
            )
        return int8_path(out)
    if int8_out.resolve() == out.resolve():
        raise typer.BadParameter(
            f"{int8_out} is --out, the fp32 model: name another file", param_hint="--int8-out"
        )
    if int8_out.is_dir():
        raise typer.BadParameter(
            f"{int8_out} is a folder; name the .onnx file to write", param_hint="--int8-out"
        )
    return int8_out
