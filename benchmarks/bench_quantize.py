"""int8 quantization: which options are fastest here, and how closely each follows fp32.

For one run and its fp32 export, every contender is quantized with
``modlabel.export.quantize.quantize_model`` (calibrated on the same training
images), compared with fp32 on the run's test split (label agreement, logits
correlation, per-image CRM correlation, head consistency) and timed with
onnxruntime on the same batch of real images. Timings: each contender in a
process of its own (``OnnxModel``, the scan's session options), one warm-up
run then ``--repeats`` timed runs, over ``--rounds`` rounds in rotating order.
Each process reports the median of its runs; the table gives the best and the
median of those over the rounds, and the ratios use the best: on a busy, shared
machine other jobs only ever slow a contender down.

Contenders: fp32; the chosen default (``QuantizeOptions()``: QDQ,
per-channel, U8S8, pre-processed, float head); and the default with one option
changed: int8 activations (S8S8), per-tensor weights, reduce_range (7-bit
weights), the QOperator format, no ``quant_pre_process``, only Conv
quantized, the head quantized too, and an NCHW input (the input Transpose that
tf2onnx puts before the first Conv removed; the batch is transposed outside
the timed call).

Usage (a VGG16 at 300 x 300, as in the paper; then the properly trained demo model):
    modlabel synth /tmp/q/archive --per-class 12 --size 320 --seed 0
    modlabel train /tmp/q/archive --out /tmp/q/vgg --backbone vgg16 --input-size 300 \\
        --epochs 1 --batch-size 10
    modlabel export /tmp/q/vgg --out /tmp/q/vgg.onnx
    python benchmarks/bench_quantize.py /tmp/q/vgg /tmp/q/vgg.onnx [--calibration 32] \\
        [--batch 8] [--rounds 6] [--repeats 2] [--only default,per-tensor] [--keep DIR]
    (--keep DIR keeps the quantized models and their figures in DIR and reuses them
    on the next run, to time them again without quantizing again)
    python benchmarks/bench_quantize.py demo/run demo/model.onnx
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

DEFAULT = "default"


def contenders() -> dict[str, dict]:
    """name -> QuantizeOptions fields changed from the default (None: fp32)."""
    return {
        "fp32": None,
        DEFAULT: {},
        "S8S8": {"activation_type": "int8"},
        "per-tensor": {"per_channel": False},
        "reduce_range": {"reduce_range": True},
        "QOperator": {"quant_format": "qoperator"},
        "no pre-process": {"preprocess": False},
        "Conv only": {"op_types": ("Conv",)},
        "head quantized": {"quantize_head": True},
        "NCHW input": {},
    }


def nchw_graph(model):
    """The fp32 graph without its input Transpose: input ``image`` (N, 3, H, W)."""
    from modlabel.metadata import INPUT_NAME

    graph = model.graph
    first = next(n for n in graph.node if INPUT_NAME in n.input)
    perm = next(a.ints for a in first.attribute if a.name == "perm")
    assert first.op_type == "Transpose" and list(perm) == [0, 3, 1, 2], first
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == first.output[0]:
                node.input[i] = INPUT_NAME
    graph.node.remove(first)
    dims = graph.input[0].type.tensor_type.shape.dim
    n, h, w, c = (dims[i].SerializeToString() for i in range(4))
    for dim, value in zip(dims, (n, c, h, w), strict=True):
        dim.ParseFromString(value)
    return model


def to_nchw(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.transpose(0, 3, 1, 2)) for k, v in feeds.items()}


class Nchw:
    """A session that takes NHWC batches and feeds them NCHW (for compare_models)."""

    def __init__(self, session) -> None:
        self.session = session

    def run(self, names, feeds):
        return self.session.run(names, to_nchw(feeds))


class NchwReader:
    """A calibration reader that hands out NCHW batches."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def get_next(self):
        feed = self.reader.get_next()
        return None if feed is None else to_nchw(feed)


def build(run: Path, fp32: Path, out_dir: Path, names: list[str], calibration: int) -> dict:
    """Quantize each contender into out_dir; returns name -> {path, fidelity, seconds}."""
    import onnx
    import onnxruntime as ort

    from modlabel.export.quantize import (
        CALIBRATION_SPLIT,
        CalibrationImages,
        QuantizeOptions,
        compare_models,
        evaluation_split,
        quantize_model,
        split_image_paths,
    )
    from modlabel.metadata import METADATA_KEY
    from modlabel.model import OnnxModel

    info = OnnxModel(fp32, providers=["CPUExecutionProvider"]).info
    metadata = {METADATA_KEY: info.to_json()}
    calib_paths = split_image_paths(run, CALIBRATION_SPLIT, limit=calibration)
    split, evaluation = evaluation_split(run)
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    built = {}
    for name in names:
        changes = contenders()[name]
        if changes is None:
            built[name] = {"path": str(fp32), "seconds": 0.0, "fidelity": None}
            continue
        options = replace(QuantizeOptions(), **changes)
        reader = CalibrationImages(calib_paths, info)
        source = onnx.load(str(fp32))
        if name == "NCHW input":
            source, reader = nchw_graph(source), NchwReader(reader)
        started = time.perf_counter()
        quantized = quantize_model(source, reader, options)
        seconds = time.perf_counter() - started
        del quantized.metadata_props[:]
        onnx.helper.set_model_props(quantized, metadata)
        path = out_dir / (name.replace(" ", "_") + ".onnx")
        onnx.save(quantized, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        if name == "NCHW input":
            session = Nchw(session)
        result = compare_models(reference, session, evaluation, info)
        built[name] = {
            "path": str(path),
            "seconds": seconds,
            "options": options.describe(),
            "fidelity": result.to_dict(),
        }
        print(f"  quantized {name:<20} in {seconds:5.1f} s", file=sys.stderr, flush=True)
    print(
        f"calibration: {len(calib_paths)} {CALIBRATION_SPLIT} images; "
        f"fidelity on {len(evaluation)} {split} images",
        file=sys.stderr,
    )
    return built


def time_one(model: Path, inputs: Path, repeats: int, nchw: bool) -> float:
    """images/s of one model on the saved batch: the median of ``repeats`` runs."""
    from modlabel.model import OnnxModel

    model = OnnxModel(model, providers=["CPUExecutionProvider"])
    batch = np.load(inputs)
    if nchw:
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    model.run(batch)  # warm-up: onnxruntime allocates its buffers on the first run
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.run(batch)
        seconds.append(time.perf_counter() - start)
    return len(batch) / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?")
    parser.add_argument("fp32", type=Path, nargs="?")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep (and reuse) the quantized models here")
    parser.add_argument("--only", help="comma-separated contenders (fp32 is always timed)")
    parser.add_argument("--time", type=Path, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--nchw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time:
        print(json.dumps(time_one(args.time, args.inputs, args.repeats, args.nchw)))
        return
    if args.run is None or args.fp32 is None:
        parser.error("RUN and FP32 are required")

    from modlabel.decode import normalize
    from modlabel.export.parity import image_pixels
    from modlabel.export.quantize import split_image_paths
    from modlabel.model import OnnxModel

    names = list(contenders())
    if args.only:
        wanted = {"fp32", *args.only.split(",")}
        names = [n for n in names if n in wanted]
    import onnxruntime

    info = OnnxModel(args.fp32, providers=["CPUExecutionProvider"]).info
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        tmp = Path(tmp)
        models = args.keep or tmp
        models.mkdir(parents=True, exist_ok=True)
        cache = models / "built.json"
        built = json.loads(cache.read_text()) if cache.is_file() else {}
        missing = [n for n in names if n not in built]
        if missing:
            built.update(build(args.run, args.fp32, models, missing, args.calibration))
            cache.write_text(json.dumps(built, indent=1))
        paths = [p for s in ("test", "val", "train") for p in split_image_paths(args.run, s)]
        pixels = image_pixels(paths[: args.batch], info.input_size)
        np.save(tmp / "inputs.npy", normalize(pixels, info.mean, info.std))

        rates: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--time",
                        built[name]["path"],
                        "--inputs",
                        str(tmp / "inputs.npy"),
                        "--repeats",
                        str(args.repeats),
                        *(["--nchw"] if name == "NCHW input" else []),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                rates[name].append(json.loads(out.stdout.strip().splitlines()[-1]))

    base = max(rates["fp32"])
    print(
        f"{info.backbone} at {info.input_size[0]}x{info.input_size[1]}, batch {args.batch}, "
        f"{args.rounds} rounds x {args.repeats} runs, onnxruntime {onnxruntime.__version__}"
    )
    print(
        f"{'contender':<20} {'best':>6} {'median':>6} {'x fp32':>6} {'agree':>6} {'logit r':>8} "
        f"{'CRM r min':>9} {'CRM r mean':>10} {'head Δ':>8} {'quant s':>7}  rounds img/s"
    )
    for name in names:
        best, median = max(rates[name]), statistics.median(rates[name])
        f = built[name]["fidelity"]
        figures = (
            f"{f['agreement']:>6.3f} {f['logits_correlation']:>8.5f} "
            f"{f['crm_correlation_min']:>9.5f} {f['crm_correlation_mean']:>10.5f} "
            f"{f['max_abs_head_diff']:>8.1e} {built[name]['seconds']:>7.1f}"
            if f
            else f"{'':>6} {'':>8} {'':>9} {'':>10} {'':>8} {'':>7}"
        )
        rounds = " ".join(f"{r:.2f}" for r in rates[name])
        print(f"{name:<20} {best:>6.2f} {median:>6.2f} {best / base:>6.2f} {figures}  {rounds}")


if __name__ == "__main__":
    main()
