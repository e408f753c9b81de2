"""``adopt``: take in any ONNX CNN (a PyTorch or Keras export) as a modlabel model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .edge import command

FloatTriple = tuple[float, float, float]


@command(app)
def adopt(
    source: Annotated[Path, typer.Argument(help="The ONNX model to adopt (no modlabel metadata).")],
    out: Annotated[Path, typer.Option("--out", help="The adopted model to write.")],
    classes: Annotated[
        Path,
        typer.Option(
            "--classes", help="Text file of the class names, one a line, in output order."
        ),
    ],
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            metavar="TENSOR",
            help="Expose this 4-D tensor as the activations. A head that is not "
            "pool-plus-dense needs it; the model is then layer-wise only (no closed-form "
            "maps; explain and localize draw CRM at this layer).",
            show_default=False,
        ),
    ] = None,
    layout: Annotated[
        str | None,
        typer.Option(
            "--layout",
            help="The input's layout: nchw (N, 3, H, W: PyTorch) or nhwc (N, H, W, 3: Keras). "
            "Default: from the input's shape.",
            show_default=False,
        ),
    ] = None,
    mean: Annotated[
        FloatTriple,
        typer.Option("--mean", help="Per RGB channel, subtracted after --scale."),
    ] = (0.0, 0.0, 0.0),
    std: Annotated[
        FloatTriple,
        typer.Option("--std", help="Per RGB channel, divided by after the mean."),
    ] = (1.0, 1.0, 1.0),
    scale: Annotated[
        float,
        typer.Option(
            "--scale",
            help="Pixels in [0, 255] are divided by this first: x = (pixels / scale - mean) "
            "/ std (255 with ImageNet's mean and std for torchvision; 127.5 with mean 1 and "
            "std 1 for Keras' MobileNetV2).",
        ),
    ] = 255.0,
    input_size: Annotated[
        tuple[int, int] | None,
        typer.Option(
            "--input-size",
            metavar="H W",
            help="The input's height and width, when the model leaves them open.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Adopt an ONNX CNN that modlabel did not export (a PyTorch or tf2onnx export), so
    that scan, explain, report and localize run it like a modlabel model.

    Finds the last conv layer's map feeding global average pooling and a dense head
    (Gemm, or MatMul and Add), exposes the `logits` and `activations` outputs, stores the
    class names, the preprocessing, the layouts and the head's weights and bias, and
    checks on a random input that the logits are unchanged and equal the head re-applied.
    Any other head (hidden dense layers, a transformer) is refused with what it is, unless
    --layer names a tensor: the model is then layer-wise only.

    Example: modlabel adopt resnet18.onnx --out adopted.onnx --classes classes.txt
    --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225

    Or, VGG16 with its hidden dense layers, CRM at its last conv layer: modlabel adopt
    vgg16.onnx --out vgg16-adopted.onnx --classes classes.txt --layer
    /features/features.29/Relu_output_0
    """
    from ..adopt import Preprocessing, adopt_model, read_class_names

    if layout is not None and layout not in ("nchw", "nhwc"):
        raise typer.BadParameter(f"nchw or nhwc, not {layout!r}", param_hint="--layout")
    if not scale > 0 or any(v == 0 for v in std):
        raise typer.BadParameter("--scale must be positive and --std non-zero")
    if input_size is not None and min(input_size) < 1:
        raise typer.BadParameter("must be positive", param_hint="--input-size")
    adopted = adopt_model(
        source,
        out,
        class_names=read_class_names(classes),
        layer=layer,
        layout=layout,
        preprocessing=Preprocessing(mean=mean, std=std, scale=scale),
        input_size=input_size,
    )
    info = adopted.info
    h, w, k = info.activation_shape
    head = " \u2192 ".join(adopted.head_ops) if adopted.head_ops else "layer-wise only"
    typer.echo(
        f"{source}: {len(info.class_names)} classes, input {info.layout} "
        f"{info.input_size[0]}x{info.input_size[1]}, activations {info.cut_layer!r} "
        f"({h}x{w}x{k}, {info.activations_layout}), head {head}"
    )
    checks = f"outputs unchanged (max relative difference {adopted.output_difference:.2g})"
    if adopted.head_difference is not None:
        checks += f", logits = the head re-applied ({adopted.head_difference:.2g})"
    typer.echo(checks)
    for note in adopted.notes:
        typer.echo(note)
    typer.echo(f"wrote {adopted.path}")
