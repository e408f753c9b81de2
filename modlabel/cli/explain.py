"""``explain`` (an image's maps side by side) and ``localize`` (the maps against a
synthetic archive's ground-truth boxes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ModlabelError
from .app import app
from .edge import command, say
from .options import DeviceOption, ModelPathOption, model_path, output_dir


@command(app)
def explain(
    images: Annotated[list[Path], typer.Argument(help="Images to explain.")],
    model: ModelPathOption = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the figures.")] = Path("explain"),
    device: DeviceOption = "auto",
) -> None:
    """Label images and draw CAM, Grad-CAM and CRM side by side (paper Figure 5).

    Example: modlabel explain scan.jpg --model model.onnx --out figures/
    """
    from ..explain import explain_images
    from ..model import OnnxModel

    path = model_path(model)
    output_dir(out)
    results = explain_images([str(p) for p in images], OnnxModel(path, device=device), out)
    failed = 0
    for r in results:
        if r.error:
            failed += 1
            say(f"{r.path}: {r.error}")
        else:
            typer.echo(f"{r.path}\t{r.label}\t{r.confidence:.3f}\t{r.figure}")
    if failed:
        raise typer.Exit(1)


@command(app)
def localize(
    archive: Annotated[
        Path, typer.Argument(help="Archive with a ground_truth.jsonl, as `modlabel synth` writes.")
    ],
    model: ModelPathOption = None,
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
    from ..localize import evaluate_localization
    from ..model import OnnxModel

    result = evaluate_localization(archive, OnnxModel(model_path(model)), limit=limit)
    typer.echo(result.format_table(), nl=False)
    if out is not None:
        try:
            out.write_text(result.to_json() + "\n", encoding="utf-8")
        except OSError as exc:
            raise ModlabelError(f"{out}: cannot write: {exc.strerror or exc}") from None
        typer.echo(f"wrote {out}")
