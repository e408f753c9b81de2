"""How much do the maps cost next to the model that feeds them?

For each model, one batch of N images (seeded noise at the input size) is run
through onnxruntime, and then every map modlabel computes is computed for that
batch from the outputs: CAM, Grad-CAM, CRM, CRM on the outputs (Eq. 5) and
CAM squared (``maps.compute_maps``), plus ``codec.encode_maps`` of every one of
those maps (5 N blobs; a scan stores only the N CRMs). Both are timed on the
same machine in the same run (best of ``--repeats`` after one warm-up, the same
for both) and printed side by side with their ratio; the target is <= 2%. The
"maps only" column leaves the codec out; "scan" is what a scan adds per batch:
the CRM and its N blobs only. A second table splits "maps" into the shared head
terms and each method (``maps.METHODS``), and gives the codec's cost per map, in
microseconds, so a regression shows where it comes from.

Models: ``--model FILE.onnx`` (any exported modlabel model), or built here with
``train.backbones`` (random weights, which do not change the timings) and
tf2onnx: ``vgg16@300`` (the paper's model: 18x18x512 activations),
``tiny@300`` (18x18x128) and ``tiny@128`` (8x8x128: the cheapest model
modlabel has, whose inference is under a millisecond per image, so the worst
case for the ratio). Built models are cached in ``--cache``.

    .venv/bin/python benchmarks/bench_maps.py              # vgg16@300, tiny@300, tiny@128
    .venv/bin/python benchmarks/bench_maps.py --model model.onnx --batch 32
    .venv/bin/python benchmarks/bench_maps.py --model model.onnx --perturbation 2

``--perturbation N`` adds a third table: milliseconds per image of the methods that run
the model again on masked copies (Score-CAM, RISE with ``--rise-masks``), on N images,
beside one image's share of the batch's forward pass.

Building needs TensorFlow and tf2onnx (the ``train`` extra); timing a given
ONNX file needs numpy and onnxruntime only.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modlabel import codec, maps, perturb  # noqa: E402
from modlabel.metadata import ModelInfo  # noqa: E402
from modlabel.model import OnnxModel  # noqa: E402

BUILTIN = {
    "vgg16@300": ("vgg16", (300, 300)),
    "tiny@300": ("tiny", (300, 300)),
    "tiny@128": ("tiny", (128, 128)),
}
CLASSES = [
    "abdomen_ct",
    "brain_mri",
    "cardiac_us",
    "chest_xray",
    "microscopy",
    "fundus",
    "graph",
]


def build_onnx(backbone: str, input_size: tuple[int, int], path: Path) -> Path:
    """A modlabel-shaped model (backbone -> crm_conv -> GAP -> Dense) as ONNX."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    from modlabel.train.backbones import ACTIVATION_LAYER, HEAD_LAYER, activation_shape, build_model

    keras.utils.set_random_seed(0)
    net = build_model(backbone, len(CLASSES), input_size, weights="none")
    both = keras.Model(net.input, [net.output, net.get_layer(ACTIVATION_LAYER).output])
    spec = [tf.TensorSpec((None, *input_size, 3), tf.float32, name="image")]

    @tf.function(input_signature=spec)
    def serve(image):
        logits, activations = both(image, training=False)
        return {"logits": logits, "activations": activations}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=17)
    weights, bias = (v.numpy() for v in net.get_layer(HEAD_LAYER).weights)
    info = ModelInfo(
        class_names=CLASSES,
        input_size=input_size,
        mean=(127.5,) * 3,
        std=(64.0,) * 3,
        head_weights=weights,
        head_bias=bias,
        backbone=backbone,
        cut_layer=ACTIVATION_LAYER,
        activation_shape=activation_shape(net),
    )
    entry = proto.metadata_props.add()
    entry.key, entry.value = "modlabel", info.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def best_seconds(fn, repeats: int) -> float:
    """Best of ``repeats`` timed calls after one warm-up (first-run allocations,
    lazy imports); the least disturbed by other work on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# The ratio's maps: the paper's methods and its controls, as before the registry grew; the
# second table times every closed-form method on its own.
RATIO_METHODS = ("cam", "gradcam", "crm", "crm_output", "cam_squared")


def all_maps(model: OnnxModel, logits: np.ndarray, activations: np.ndarray) -> dict:
    info = model.info
    return maps.compute_maps(
        activations,
        info.head_weights,
        bias=info.head_bias,
        logits=logits,
        pooling=info.pooling,
        methods=RATIO_METHODS,
    )


def all_terms(model: OnnxModel, logits: np.ndarray, activations: np.ndarray) -> maps.Terms:
    info = model.info
    return maps.terms(
        activations, info.head_weights, bias=info.head_bias, logits=logits, pooling=info.pooling
    )


def all_maps_and_blobs(model: OnnxModel, logits: np.ndarray, activations: np.ndarray) -> list:
    return [
        b
        for batch in all_maps(model, logits, activations).values()
        for b in codec.encode_maps(batch)
    ]


def scan_path(model: OnnxModel, activations: np.ndarray) -> list:
    info = model.info
    crm = maps.crm(activations, info.head_weights, bias=info.head_bias, pooling=info.pooling)
    return codec.encode_maps(crm)


def bench(
    path: Path,
    batch: int,
    repeats: int,
    threads: int,
    perturbation_images: int = 0,
    rise_masks: int = perturb.RISE_MASKS,
) -> dict[str, object]:
    model = OnnxModel(path, providers=["CPUExecutionProvider"], threads=threads)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(batch, *model.info.input_size, 3), dtype=np.uint8)
    x = model.preprocess(pixels)
    logits, activations = model.run(x)
    infer = best_seconds(lambda: model.run(x), repeats)
    cheap = max(repeats, 20)  # the maps take milliseconds: more tries, same rule
    only_maps = best_seconds(lambda: all_maps(model, logits, activations), cheap)
    with_codec = best_seconds(lambda: all_maps_and_blobs(model, logits, activations), cheap)
    scan = best_seconds(lambda: scan_path(model, activations), cheap)
    blobs = all_maps_and_blobs(model, logits, activations)
    terms = all_terms(model, logits, activations)
    parts = {"terms": best_seconds(lambda: all_terms(model, logits, activations), cheap)}
    for name in maps.closed_form_methods():  # Score-CAM and RISE run the model again
        method = maps.METHODS[name]
        parts[name] = best_seconds(lambda method=method: method.fn(terms), cheap)
    forward = {}
    if perturbation_images:  # the methods that run the model again, per image
        few = x[:perturbation_images]
        few_terms = all_terms(model, *model.run(few))
        for name in [m for m in maps.METHODS if maps.METHODS[m].needs == "model"]:
            options = perturb.Options(rise_masks=rise_masks)
            run = perturb.Forward(few, lambda inputs: model.run(inputs)[0], options)
            seconds = best_seconds(
                lambda name=name, run=run: maps.METHODS[name].fn(few_terms, run), 1
            )
            forward[name] = seconds / len(few)
    batches = list(all_maps(model, logits, activations).values())
    encode = best_seconds(lambda: [codec.encode_maps(b) for b in batches], cheap)
    parts["encode/map"] = encode / len(blobs)
    return {
        "model": f"{model.info.backbone}@{'x'.join(map(str, model.info.input_size))}",
        "acts": "x".join(map(str, activations.shape[1:])),
        "infer_ms": infer * 1e3,
        "maps_ms": only_maps * 1e3,
        "codec_ms": with_codec * 1e3,
        "ratio": with_codec / infer,
        "maps_ratio": only_maps / infer,
        "scan_ratio": scan / infer,
        "bytes": sum(len(b) for b in blobs) / len(blobs),
        "parts_us": {name: seconds * 1e6 for name, seconds in parts.items()},
        "infer_per_image_ms": infer * 1e3 / batch,
        "forward_ms": {name: seconds * 1e3 for name, seconds in forward.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="an exported modlabel ONNX model (repeatable)",
    )
    parser.add_argument(
        "--builtin",
        default=",".join(BUILTIN),
        help=f"models to build when no --model is given: {','.join(BUILTIN)}",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads (0: its default, all cores)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modlabel-bench",
    )
    parser.add_argument(
        "--perturbation",
        type=int,
        default=0,
        metavar="N",
        help="also time the methods that run the model again (Score-CAM, RISE) on N images",
    )
    parser.add_argument("--rise-masks", type=int, default=perturb.RISE_MASKS)
    args = parser.parse_args(argv)

    paths = list(args.model)
    if not paths:
        for name in filter(None, args.builtin.split(",")):
            backbone, size = BUILTIN[name]
            path = args.cache / f"{backbone}_{size[0]}x{size[1]}.onnx"
            paths.append(path if path.exists() else build_onnx(backbone, size, path))

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"batch {args.batch}, best of {args.repeats}, onnxruntime CPU"
    )
    print(
        f"{'model':<14} {'activations':<11} {'infer ms':>9} {'maps ms':>8} {'+codec ms':>9} "
        f"{'ratio':>6} {'maps only':>9} {'scan':>6} {'B/map':>6}  <= 2%"
    )
    results = []
    for path in paths:
        r = bench(path, args.batch, args.repeats, args.threads, args.perturbation, args.rise_masks)
        results.append(r)
        verdict = "met" if r["ratio"] <= 0.02 else "not met"
        print(
            f"{r['model']:<14} {r['acts']:<11} {r['infer_ms']:>9.1f} {r['maps_ms']:>8.2f} "
            f"{r['codec_ms']:>9.2f} {r['ratio']:>6.2%} {r['maps_ratio']:>9.2%} "
            f"{r['scan_ratio']:>6.2%} {r['bytes']:>6.0f}  {verdict}"
        )
    print(
        "# maps = cam, gradcam, crm, crm_output, cam_squared (compute_maps); +codec = maps and "
        "encode_maps of all 5N maps; ratio = +codec / infer; maps only = maps / infer; "
        "scan = (crm + encode_maps of the N CRMs) / infer"
    )
    names = list(results[0]["parts_us"]) if results else []
    print(f"{'µs per batch':<14} " + " ".join(f"{name:>11}" for name in names))
    for r in results:
        print(f"{r['model']:<14} " + " ".join(f"{us:>11.1f}" for us in r["parts_us"].values()))
    print(
        "# terms: the shared (N*H*W, K) x (K, C) product, scores and classes; each method "
        "from those terms; encode/map: encode_maps of the 5 batches, per map"
    )
    if args.perturbation and results:
        names = list(results[0]["forward_ms"])
        print(f"{'ms per image':<14} {'forward':>11} " + " ".join(f"{n:>11}" for n in names))
        for r in results:
            cells = " ".join(f"{ms:>11.1f}" for ms in r["forward_ms"].values())
            print(f"{r['model']:<14} {r['infer_per_image_ms']:>11.2f} {cells}")
        print(
            f"# forward: one image's share of the batch's run; the others run the model again "
            f"on masked copies of {args.perturbation} images (Score-CAM: one run a channel; "
            f"RISE: {args.rise_masks} masks), one try after a warm-up"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
