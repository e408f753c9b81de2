"""Out-of-set scores: which one flags images of none of the classes, at a fixed in-set rate.

For one run and its export, every candidate score gets a threshold set on the
run's validation split so that at most ``--rate`` of it is flagged (as
``modlabel export`` sets the model's), then the share flagged of each group is
printed:

* in-set: the run's test split, and every image of ``--incoming`` (a second
  archive of the same classes, e.g. demo/incoming);
* out-of-set: black, white and mid-gray images, uniform noise, 1x1-pixel
  images (random colours), and the natural photographs scikit-image ships
  (``skimage.data``: astronaut, coffee, chelsea, rocket, camera, ...), whole
  and as four crops each.

Every image goes through the scan's decoder (``modlabel.decode.load_pixels``
on PNG bytes) and the scan's model (``OnnxModel``). Candidates: the energy
E(x) = -T * logsumexp(logits / T) at T = 1 and at the model's fitted T; the
maximum softmax probability (as 1 - MSP) at the fitted T; and the distances
of the GAP embedding (the mean of ``activations`` over h, w) to the class
means of the training split: Mahalanobis with a shared covariance, and cosine.
The ECE (15 bins) before and after temperature scaling closes the report.

Usage (needs scikit-image, in the dev extra):
    modlabel export demo/run --out /tmp/ood/model.onnx
    python benchmarks/bench_ood.py demo/run /tmp/ood/model.onnx --incoming demo/incoming
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from modlabel import calibration as cal
from modlabel import ood
from modlabel.decode import load_pixels
from modlabel.export.calibrate import split_images
from modlabel.model import OnnxModel
from modlabel.source import ImageFilter

SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "coins", "moon",
    "page", "text", "horse", "immunohistochemistry", "hubble_deep_field", "retina",
    "brick", "grass", "gravel", "colorwheel", "logo", "motorcycle_left",
)  # fmt: skip


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_groups(rng: np.random.Generator, n: int) -> dict[str, list[bytes]]:
    sizes = rng.integers(32, 400, size=(n, 2))
    return {
        "black": [png(np.zeros((h, w, 3))) for h, w in sizes],
        "white": [png(np.full((h, w, 3), 255)) for h, w in sizes],
        "gray (constant)": [png(np.full((h, w, 3), rng.integers(30, 226))) for h, w in sizes],
        "uniform noise": [png(rng.integers(0, 256, size=(h, w, 3))) for h, w in sizes],
        "1x1 pixel": [png(rng.integers(0, 256, size=(1, 1, 3))) for _ in range(n)],
    }


def photo_group() -> tuple[list[bytes], list[str]]:
    """scikit-image's photographs, whole and as their four quarter crops."""
    import skimage.data

    images, names = [], []
    for name in SKIMAGE_PHOTOS:
        try:
            array = getattr(skimage.data, name)()
        except Exception as exc:  # a data file skimage would download, or a missing name
            print(f"  (skipped skimage.data.{name}: {type(exc).__name__})", file=sys.stderr)
            continue
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / max(np.ptp(array), 1e-12)).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[..., :3]
        h, w = array.shape[:2]
        images.append(png(array))
        names.append(name)
        for y0, x0 in ((0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)):
            images.append(png(array[y0 : y0 + h // 2, x0 : x0 + w // 2]))
    return images, names


def outputs(model: OnnxModel, sources: list) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) logits and (N, K) GAP embeddings of images given as paths or bytes."""
    logits, emb = [], []
    for start in range(0, len(sources), 32):
        pixels = [load_pixels(s, model.info.input_size)[0] for s in sources[start : start + 32]]
        lg, act = model.run(model.preprocess(np.stack(pixels)))
        logits.append(lg.astype(np.float64))
        emb.append(ood.gap_embedding(act))
    return np.concatenate(logits), np.concatenate(emb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--incoming", type=Path, help="a second archive of the same classes")
    parser.add_argument("--rate", type=float, default=ood.DEFAULT_OOD_RATE)
    parser.add_argument("--per-group", type=int, default=50, help="synthetic images per group")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run = json.loads((args.run / "run.json").read_text())
    model = OnnxModel(args.model, device="cpu")
    classes = len(model.info.class_names)
    split = {}
    for name in ("train", "val", "test"):
        paths, labels = split_images(args.run, run, name)
        split[name] = (*outputs(model, paths), np.asarray(labels))
    temperature = float(model.info.extra.get("temperature") or 0) or cal.fit_temperature(
        split["val"][0], split["val"][2]
    )
    means = ood.class_means(split["train"][1], split["train"][2], classes)
    precision = ood.shared_precision(split["train"][1], split["train"][2], means)
    candidates = {
        "energy T=1": lambda lg, e: ood.energy_score(lg, 1.0),
        f"energy T={temperature:.2f}": lambda lg, e: ood.energy_score(lg, temperature),
        f"1-MSP T={temperature:.2f}": lambda lg, e: ood.max_softmax_score(lg, temperature),
        "Mahalanobis (GAP)": lambda lg, e: ood.mahalanobis_score(e, means, precision),
        "cosine (GAP)": lambda lg, e: ood.cosine_score(e, means),
    }
    thresholds = {
        name: ood.rate_threshold(score(split["val"][0], split["val"][1]), args.rate)
        for name, score in candidates.items()
    }

    groups: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "in-set: test split": split["test"][:2],
    }
    if args.incoming:
        flt = ImageFilter()
        files = sorted(p for p in args.incoming.rglob("*") if p.is_file() and flt.is_image(str(p)))
        groups["in-set: incoming archive"] = outputs(model, files)
    rng = np.random.default_rng(args.seed)
    for name, images in synthetic_groups(rng, args.per_group).items():
        groups[f"out: {name}"] = outputs(model, images)
    photos, names = photo_group()
    groups["out: skimage photos (+crops)"] = outputs(model, photos)

    width = max(len(g) for g in groups) + 2
    head = f"{'group':<{width}}{'images':>7}" + "".join(f"{c:>20}" for c in candidates)
    print(f"model {model.identity}; thresholds flag at most {args.rate:.0%} of val "
          f"({len(split['val'][2])} images); share flagged:")  # fmt: skip
    print(head)
    for group, (lg, emb) in groups.items():
        cells = "".join(
            f"{np.mean(score(lg, emb) > thresholds[c]):>20.1%}" for c, score in candidates.items()
        )
        print(f"{group:<{width}}{len(lg):>7}{cells}")
    print(f"skimage photos: {', '.join(names)}")

    val_lg, _, val_y = split["val"]
    test_lg, _, test_y = split["test"]
    ece = cal.expected_calibration_error
    print(
        f"\ntemperature {temperature:.4f} (val NLL {cal.negative_log_likelihood(val_lg, val_y):.4f}"
        f" -> {cal.negative_log_likelihood(val_lg, val_y, temperature):.4f}); test ECE "
        f"{ece(cal.calibrated_softmax(test_lg), test_y):.4f} -> "
        f"{ece(cal.calibrated_softmax(test_lg, temperature), test_y):.4f}"
    )
    rule = model.info.extra.get("out_of_set")
    if rule:
        shown = {k: rule[k] for k in ("score", "threshold", "rate", "images", "fit_images")}
        print(f"the model's own rule: {shown}")


if __name__ == "__main__":
    main()
