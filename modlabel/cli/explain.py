"""``explain`` (an image's maps side by side) and ``localize`` (the maps against a
synthetic archive's ground-truth boxes)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from ..errors import ModlabelError
from ..paths import display_fs_path
from .app import app
from .edge import command, say
from .options import (
    DeviceOption,
    MethodsOption,
    ModelPathOption,
    RiseMasksOption,
    model_path,
    output_dir,
    perturbation,
)
from .options import methods as methods_of

if TYPE_CHECKING:
    from ..infer import LayerMaps
    from ..model import OnnxModel

LayerOption = Annotated[
    str | None,
    typer.Option(
        "--layer",
        metavar="TENSOR",
        help="Also draw CRM at this layer: a 4-D tensor of the ONNX graph, each of its "
        "spatial elements removed in turn and the layers above it run again (Eq. 6-7; h x w "
        "runs of them per image). A layer-wise-only model (adopt --layer) draws it at its "
        "activations unless told. Needs the onnx package.",
        show_default=False,
    ),
]


def layer_maps(model: OnnxModel, layer: str | None) -> LayerMaps | None:
    """``--layer`` as the layer-wise CRM to draw (``layer_crm``, which needs onnx: imported
    only when there is one)."""
    if layer is None and not model.info.layer_wise_only:
        return None
    from ..layer_crm import layer_maps_for

    return layer_maps_for(model, layer)


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
    rise_masks: RiseMasksOption = None,
    layer: LayerOption = None,
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

    More methods (docs: Models and training, "Map methods"): modlabel explain scan.jpg
    --model model.onnx --methods gradcampp,eigencam,scorecam,rise --rise-masks 4000

    Or, the first 20 images under a folder: modlabel explain /archive --limit 20 --model model.onnx

    CRM at another layer (any ONNX model, docs: "Explaining any ONNX model"): modlabel
    explain scan.jpg --model adopted.onnx --layer /layer3/layer3.1/relu_1/Relu_output_0
    """
    import json

    from ..explain import explain_roots
    from ..model import OnnxModel

    if fmt not in ("text", "json"):
        raise typer.BadParameter(f"text or json, not {fmt!r}", param_hint="--format")
    wanted = methods_of(methods) if methods is not None else None  # None: the model's defaults
    path = model_path(model)
    output_dir(out)
    onnx_model = OnnxModel(path, device=device)
    results = explain_roots(
        images,
        onnx_model,
        out,
        limit=limit,
        methods=wanted,
        perturbation=perturbation(rise_masks),
        layer_maps=layer_maps(onnx_model, layer),
    )
    failed = sum(1 for r in results if r.error)
    if not results:  # an empty folder, or only files that are no images by name
        say("no image to explain under " + ", ".join(display_fs_path(str(p)) for p in images))
    for r in results:
        if r.error:
            say(f"{display_fs_path(str(r.path))}: {r.error}")
    if fmt == "json":
        typer.echo(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        for r in results:
            if r.image is not None:
                flag = "\tOUT OF SET" if r.image.out_of_set else ""
                shown = display_fs_path(str(r.path))  # one line, whatever the name holds
                typer.echo(f"{shown}\t{r.label}\t{r.confidence:.3f}\t{r.figure}{flag}")
    if failed:
        raise typer.Exit(1)


UNREADABLE_SAID = 20  # unreadable files named on stderr; the JSON (--out) lists them all


def _say_unreadable(unreadable: list[dict[str, str]]) -> None:
    """Each file localize left out as unreadable, with why, on stderr (as explain names
    them): the first UNREADABLE_SAID, then how many more."""
    for item in unreadable[:UNREADABLE_SAID]:
        say(f"{display_fs_path(item['path'])}: {item['reason']}")
    if len(unreadable) > UNREADABLE_SAID:
        say(f"and {len(unreadable) - UNREADABLE_SAID} more unreadable files (all in --out's JSON)")


def spread_option(args: list[str], option: str) -> list[str]:
    """``--models A B C`` as ``--models A --models B --models C``: the words after
    ``option``, up to the next one that starts with ``-``, are all its values."""
    out: list[str] = []
    state = ""  # "first": the option was the last word; "more": one of its values
    for word in args:
        if state and not word.startswith("-"):
            if state == "more":
                out.append(option)
            out.append(word)
            state = "more"
            continue
        state = "first" if word == option else ""
        out.append(word)
    return out


class _SpreadModels(TyperCommand):
    """``localize``'s parser: ``--models`` takes every word after it (``spread_option``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spread_option(list(args), "--models"))


def model_labels(paths: list[Path]) -> list[str]:
    """How the pooled output names each model: its path, numbered where one repeats."""
    names = [str(p) for p in paths]
    return [f"{name} (#{i + 1})" if names.count(name) > 1 else name for i, name in enumerate(names)]


@command(app, cls=_SpreadModels)
def localize(
    archive: Annotated[
        Path, typer.Argument(help="Archive with a ground_truth.jsonl, as `modlabel synth` writes.")
    ],
    model: ModelPathOption = None,
    models: Annotated[
        list[Path] | None,
        typer.Option(
            "--models",
            metavar="PATH...",
            help="Several independently trained ONNX models, pooled (after the archive: "
            "--models A.onnx B.onnx C.onnx): each model's figures, then the mean over models "
            "with intervals over models and images, method pairs and model pairs tested.",
            show_default=False,
        ),
    ] = None,
    resamples: Annotated[
        int | None,
        typer.Option(
            "--resamples",
            min=0,
            help="Bootstrap resamples of the 95% intervals and paired tests; 0 for none "
            "(default: 2000, more where Holm's adjustment over the method pairs needs them: "
            "4 x pairs / 5%, 4,400 for the 11 closed-form methods).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="JSON file to write.")] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=1, help="Only the first N images of ground_truth.jsonl (file order)."
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Map methods, comma-separated, or all (see `explain --methods`; default: "
            "every closed-form one, all but scorecam and rise, which run the model again "
            "once per channel or mask).",
            show_default=False,
        ),
    ] = None,
    rise_masks: RiseMasksOption = None,
    layer: LayerOption = None,
) -> None:
    """Score the maps (CAM, Grad-CAM, CRM and the other methods) against the archive's
    ground-truth boxes.

    Prints the paper's Table 3 (ROI pixels and ratio at 300x300, per class and
    method), then the pointing game, ROI precision and recall and the ROI share
    on distractors, over correctly classified images; then, over all classes, each
    figure with its 95% bootstrap interval over the images, and a sentence per two
    methods saying which differences are significant at 5% (McNemar's exact test for
    the pointing game, a paired bootstrap otherwise, Holm-adjusted).

    Example: modlabel localize demo/incoming --model demo/model.onnx --out localize.json

    Three models trained with different seeds, pooled:
    modlabel localize demo/incoming --models seed0.onnx seed1.onnx seed2.onnx --out pooled.json
    """
    from ..evaluation import (
        StatisticsSettings,
        evaluate_localization,
        format_pooled,
        format_report,
        pool_localization,
    )
    from ..model import OnnxModel

    if models and model is not None:
        raise typer.BadParameter("give --model or --models, not both", param_hint="--models")
    wanted = methods_of(methods) if methods is not None else None
    if resamples is None:
        from .. import maps
        from ..evaluation.significance import resamples_for

        count = len(wanted if wanted is not None else maps.closed_form_methods())
        resamples = resamples_for(count * (count - 1) // 2)
    settings = StatisticsSettings(resamples=resamples) if resamples else None
    if models and settings is None:
        raise typer.BadParameter("pooling models needs --resamples above 0", param_hint="--models")
    paths = list(models) if models else [model_path(model)]
    labels = model_labels(paths)
    reports = []
    for label, path in zip(labels, paths, strict=True):
        onnx_model = OnnxModel(path)
        report = evaluate_localization(
            archive,
            onnx_model,
            limit=limit,
            methods=wanted,
            perturbation=perturbation(rise_masks),
            layer_maps=layer_maps(onnx_model, layer),
            settings=settings,
        )
        if models:
            typer.echo(f"== {label} ==")
        typer.echo(format_report(report), nl=False)
        _say_unreadable(report.unreadable)
        reports.append(report)
    result = reports[0]
    if models and settings is not None:
        result = pool_localization(reports, labels, settings=settings)
        typer.echo("")
        typer.echo(format_pooled(result), nl=False)
    if out is not None:
        try:
            out.write_text(result.to_json() + "\n", encoding="utf-8")
        except OSError as exc:
            raise ModlabelError(f"{out}: cannot write: {exc.strerror or exc}") from None
        typer.echo(f"wrote {out}")
