"""What does CRM at a layer cost per image, next to the closed form and the model itself?

A VGG16-shaped model is built here with ``onnx.helper`` (VGG16's 13 conv layers and 5
max pools, as torchvision exports them: NCHW; then the paper's head, global average
pooling and one dense layer over 7 classes; He-normal random weights, which do not
change the timings), adopted with ``modlabel.adopt``, and timed per image on one batch
of seeded noise:

* ``forward``: one run of the whole model (``OnnxModel.run``), the scan's cost;
* ``closed form``: the CRM of ``maps.crm`` from that run's activations (Eq. 7 in closed
  form, at the last conv layer only);
* ``layer LAYER``: ``layer_crm`` at that layer: h x w runs of the layers above it
  (batches of ``--ablations``), for ``block5_conv3`` (the last conv layer: the same map
  as the closed form) and ``block4_conv3`` (the one below its max pool, 4x the
  locations and three conv layers above it).

Each contender runs in a process of its own (best of ``--repeats`` after a warm-up), and
the table prints milliseconds per image and the ratio to ``forward``.

    .venv/bin/python benchmarks/bench_layer_crm.py                 # 64x64, 4 images
    .venv/bin/python benchmarks/bench_layer_crm.py --size 224 --images 1 --repeats 1

Needs numpy, onnx and onnxruntime (no TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modlabel import maps  # noqa: E402
from modlabel.adopt import Preprocessing, adopt_model  # noqa: E402
from modlabel.layer_crm import LayerCut, layer_crm  # noqa: E402
from modlabel.model import OnnxModel  # noqa: E402

# VGG16's blocks: (conv layers, channels); a 2x2 max pool after each.
VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
CLASSES = 7
LAYERS = ("block5_conv3", "block4_conv3")


def vgg16_onnx(path: Path, size: int, seed: int = 0) -> Path:
    """Write the VGG16-shaped NCHW model (input (N, 3, size, size)) to ``path``. The paper
    cuts VGG16 at block5_conv3 (no block5 pool), then GAP and Dense."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, channels = "input", 3
    for b, (convs, width) in enumerate(VGG16_BLOCKS, start=1):
        for c in range(1, convs + 1):
            name = f"block{b}_conv{c}"
            w = rng.normal(0, np.sqrt(2 / (9 * channels)), (width, channels, 3, 3))
            inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}_w"))
            inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"{name}_b"))
            nodes += [
                helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_conv"],
                                 kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                helper.make_node("Relu", [f"{name}_conv"], [name]),
            ]  # fmt: skip
            x, channels = name, width
        if b < len(VGG16_BLOCKS):
            nodes.append(
                helper.make_node("MaxPool", [x], [f"block{b}_pool"], kernel_shape=[2, 2],
                                 strides=[2, 2])
            )  # fmt: skip
            x = f"block{b}_pool"
    head_w = rng.normal(0, 0.05, (CLASSES, channels)).astype(np.float32)
    head_b = rng.normal(0, 0.1, CLASSES).astype(np.float32)
    inits += [numpy_helper.from_array(head_w, "fc_w"), numpy_helper.from_array(head_b, "fc_b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "vgg16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def worker(contender: str, model_path: str, images: int, repeats: int, ablations: int) -> dict:
    """Time one contender in this process: best seconds per image."""
    model = OnnxModel(model_path, device="cpu")
    h, w = model.info.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (images, h, w, 3), dtype=np.uint8)
    inputs = model.preprocess(pixels)
    info = model.info
    extra: dict = {}
    if contender == "forward":
        run = lambda: model.run(inputs)  # noqa: E731
    elif contender == "closed form":
        _, activations = model.run(inputs)
        run = lambda: maps.crm(activations, info.head_weights, bias=info.head_bias)  # noqa: E731
        extra["map"] = list(activations.shape[1:3])
    else:
        cut = LayerCut(model, contender.split(" ", 1)[1])
        run = lambda: layer_crm(cut, inputs, batch_size=ablations)  # noqa: E731
        tensor, _ = cut.lower_run(inputs[:1])
        extra["map"] = list(tensor.shape[2:])
    run()  # warm-up: onnxruntime plans its buffers on the first run
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return {"contender": contender, "seconds_per_image": best / images, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--images", type=int, default=4, help="images in the batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ablations", type=int, default=64, help="ablations per upper run")
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.images, args.repeats,
                                args.ablations)))  # fmt: skip
        return

    with tempfile.TemporaryDirectory() as tmp:
        source = vgg16_onnx(Path(tmp) / "vgg16.onnx", args.size)
        adopted = adopt_model(
            source,
            Path(tmp) / "vgg16-adopted.onnx",
            class_names=[f"class{i}" for i in range(CLASSES)],
            preprocessing=Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        )
        contenders = ["forward", "closed form"] + [f"layer {n}" for n in args.layers.split(",")]
        rows = []
        for contender in contenders:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", contender, "--model", str(adopted.path),
                 "--images", str(args.images), "--repeats", str(args.repeats),
                 "--ablations", str(args.ablations)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"VGG16-shaped model at {args.size}x{args.size}, batch of {args.images}, "
        f"{args.ablations} ablations per run; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, best of {args.repeats}"
    )
    forward = rows[0]["seconds_per_image"]
    print(f"{'contender':<22}{'map h x w':>10}{'runs/image':>12}{'ms/image':>12}{'x forward':>11}")
    for row in rows:
        hw = row.get("map")
        runs = hw[0] * hw[1] if hw and row["contender"].startswith("layer") else 1
        size = f"{hw[0]}x{hw[1]}" if hw else "-"
        ms = 1000 * row["seconds_per_image"]
        ratio = row["seconds_per_image"] / forward
        print(f"{row['contender']:<22}{size:>10}{runs:>12}{ms:>12.2f}{ratio:>11.2f}")


if __name__ == "__main__":
    main()
