"""``explain`` (an image's maps side by side) and ``localize`` (the maps against a
synthetic archive's ground-truth boxes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ModlabelError
from .app import app
from .edge import command, say
from .options import DeviceOption, MethodsOption, ModelPathOption, model_path, output_dir
from .options import methods as methods_of


@command(app)
def explain(
    images: Annotated[
        list[Path],
        typer.Argument(
            help="Images, or folders walked as `modlabel scan` walks them (sorted; hidden "
            "names skipped; only image files).",
        ),
    ],
    model: ModelPathOption = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the figures.")] = Path("explain"),
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Only the first N images, in the walk's order."),
    ] = None,
    device: DeviceOption = "auto",
    methods: MethodsOption = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="text (a line per image) or json (per image the label, calibrated "
            "confidences, runner-up, out-of-set flag and ROI figures the picture shows).",
        ),
    ] = "text",
) -> None:
    """Label images and draw CAM, Grad-CAM and CRM side by side (paper Figure 5), with
    the label, calibrated confidence and runner-up a scan stores, and a warning on images
    the model flags out of set.

    Folders are walked as `modlabel scan` walks them. An image that cannot be read is
    one line naming it; the others are still explained (exit 1 then).

    Example: modlabel explain scan.jpg --model model.onnx --out figures/ --format json

    Or, the first 20 images under a folder: modlabel explain /archive --limit 20 --model model.onnx
    """
    import json

    from ..explain import explain_roots
    from ..model import OnnxModel

    if fmt not in ("text", "json"):
        raise typer.BadParameter(f"text or json, not {fmt!r}", param_hint="--format")
    wanted = methods_of(methods)
    path = model_path(model)
    output_dir(out)
    onnx_model = OnnxModel(path, device=device)
    results = explain_roots(images, onnx_model, out, limit=limit, methods=wanted)
    failed = sum(1 for r in results if r.error)
    for r in results:
        if r.error:
            say(f"{r.path}: {r.error}")
    if fmt == "json":
        typer.echo(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        for r in results:
            if r.image is not None:
                flag = "\tOUT OF SET" if r.image.out_of_set else ""
                typer.echo(f"{r.path}\t{r.label}\t{r.confidence:.3f}\t{r.figure}{flag}")
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
    methods: Annotated[
        str,
        typer.Option("--methods", help="Map methods, comma-separated, or all (the default)."),
    ] = "all",
) -> None:
    """Score CAM, Grad-CAM and CRM against the archive's ground-truth boxes.

    Prints the paper's Table 3 (ROI pixels and ratio at 300x300, per class and
    method), then the pointing game, ROI precision and recall and the ROI share
    on distractors, over correctly classified images.

    Example: modlabel localize demo/incoming --model demo/model.onnx --out localize.json
    """
    from ..evaluation import evaluate_localization, format_report
    from ..model import OnnxModel

    wanted = methods_of(methods)
    result = evaluate_localization(
        archive, OnnxModel(model_path(model)), limit=limit, methods=wanted
    )
    typer.echo(format_report(result), nl=False)
    if out is not None:
        try:
            out.write_text(result.to_json() + "\n", encoding="utf-8")
        except OSError as exc:
            raise ModlabelError(f"{out}: cannot write: {exc.strerror or exc}") from None
        typer.echo(f"wrote {out}")
