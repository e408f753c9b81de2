"""``bench``: the model, the whole scan, decoding, the maps and the database, measured on
the user's own machine and images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import config
from ..errors import ModlabelError
from .app import app
from .edge import command, fail
from .options import DeviceOption, db_url


@command(app)
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
    from ..bench import run_bench

    models = list(model or [])
    if not models:
        env_model = config.resolve_model_path(None)
        models = [env_model] if env_model is not None else []
    if not models:
        raise typer.BadParameter(f"pass --model or set ${config.MODEL_ENV}", param_hint="--model")
    keras_run = None
    if compare and compare[0] is not None:
        if compare[0] != "keras":
            raise typer.BadParameter(f"keras RUN, not {compare[0]!r}", param_hint="--compare")
        keras_run = compare[1]
    try:
        result = run_bench(
            [str(m) for m in models],
            images=images,
            sample=sample,
            batch_size=batch_size,
            device=device,
            db_url=db_url(db) if db else None,
            keras_run=keras_run,
            rounds=rounds,
        )
    except ModlabelError as exc:
        raise fail(exc) from None
    typer.echo(result.format(), nl=False)
