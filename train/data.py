"""Source and decode for training: the archive's splits and a streaming tf.data pipeline.

Layouts of ``DATA``:

* ``DATA/train/<class>/...``, ``DATA/val/<class>/...``, ``DATA/test/<class>/...``
  as in the paper's Table 1. A missing ``val`` or ``test`` is carved out of
  ``train`` as below.
* ``DATA/<class>/...``: a seeded stratified split, per class, in the paper's
  proportions 5000/500/500: 1/12 of each class to validation, 1/12 to test
  (at least one image each), the rest to training.

Images are found recursively under each class folder by suffix, DICOM files
also by content (``modlabel.source.is_image_file``), in sorted order; class names are the
sorted folder names. The split is written to the run as ``split.csv`` so that
evaluation and resume see exactly the same files.

Pixels come from ``modlabel.decode.load_pixels`` (bilinear resize to the input
size) and ``(pixels - mean) / std``, the same code the runtime uses; files are
decoded as they stream, never all held in memory.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modlabel import spreadsheet
from modlabel.decode import load_pixels
from modlabel.errors import ImageError
from modlabel.source import is_image_file

from .errors import DataError

SPLITS = ("train", "val", "test")
HOLDOUT_FRACTION = 1 / 12  # the paper's 500 of 6000 images per class, for val and for test
STATS_MAX_IMAGES = 2000


@dataclass
class Split:
    """The files of an archive, split three ways.

    files[split]: list of (path relative to root, class index).
    source[split]: "folder" or how it was made.
    """

    root: Path
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class name: number of images}}."""
        out = {}
        for split in SPLITS:
            tally = Counter(label for _, label in self.files.get(split, []))
            out[split] = {name: tally.get(i, 0) for i, name in enumerate(self.class_names)}
        return out

    def paths_labels(self, split: str) -> tuple[list[str], np.ndarray]:
        """Absolute paths and (N,) int32 labels of one split."""
        rows = self.files[split]
        return (
            [str(self.root / rel) for rel, _ in rows],
            np.array([label for _, label in rows], dtype=np.int32),
        )


def discover_split(data_dir: str | Path, *, seed: int = 0, sparse: bool = False) -> Split:
    """Find the class folders and the train/val/test files of ``data_dir``.

    sparse: for fine-tuning a model that knows its classes already (``train_run``'s
    ``resume_from``), a class may have few images or none: a class with fewer than 3
    gives all it has to training (nothing to validation or test), and an empty class
    folder is allowed. Each split still needs an image.
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    if (root / "train").is_dir():
        class_names = _class_folders(root / "train")
        split = Split(root, class_names)
        split.files["train"] = _list_images(root, root / "train", class_names)
        split.source["train"] = "folder"
        rng = np.random.default_rng(seed)
        for name in ("val", "test"):
            folder = root / name
            if folder.is_dir():
                extra = set(_class_folders(folder, allow_empty=True)) - set(class_names)
                if extra:
                    raise DataError(f"{folder}: classes {sorted(extra)} are not in train/")
                split.files[name] = _list_images(root, folder, class_names)
                split.source[name] = "folder"
            else:
                kept, carved = _carve(split.files["train"], len(class_names), rng, sparse=sparse)
                split.files["train"], split.files[name] = kept, carved
                split.source[name] = f"1/12 of each class carved from train (seed {seed})"
    else:
        class_names = _class_folders(root)
        everything = _list_images(root, root, class_names)
        rng = np.random.default_rng(seed)
        rest, test = _carve(everything, len(class_names), rng, sparse=sparse)
        train, val = _carve(
            rest,
            len(class_names),
            rng,
            totals=Counter(label for _, label in everything),
            sparse=sparse,
        )
        split = Split(root, class_names, {"train": train, "val": val, "test": test})
        split.source = {
            s: f"seeded stratified split 10/1/1 per class (seed {seed})" for s in SPLITS
        }
    for name in SPLITS:
        if not split.files[name]:
            raise DataError(f"{root}: the {name} split has no images")
    empty = [c for c, n in split.counts()["train"].items() if n == 0]
    if empty and not sparse:
        raise DataError(f"{root}: no training images for classes {empty}")
    return split


def _class_folders(folder: Path, *, allow_empty: bool = False) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names and not allow_empty:
        raise DataError(
            f"{folder}: no class folders. Expected DATA/<class>/<images> or "
            "DATA/train/<class>/..., DATA/val/<class>/..., DATA/test/<class>/..."
        )
    if 0 < len(names) < 2 and not allow_empty:
        raise DataError(f"{folder}: found one class folder ({names[0]}); need at least 2")
    return names


def _list_images(root: Path, folder: Path, class_names: list[str]) -> list[tuple[str, int]]:
    rows = []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and not path.name.startswith(".") and is_image_file(path):
                rows.append((path.relative_to(root).as_posix(), label))
    return rows


def _carve(
    rows: list[tuple[str, int]],
    num_classes: int,
    rng: np.random.Generator,
    *,
    totals: Counter | None = None,
    sparse: bool = False,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Move HOLDOUT_FRACTION of each class (of ``totals`` when given) to a new split;
    ``sparse``: a class of fewer than 3 images (of ``totals``) keeps them all."""
    kept, carved = [], []
    for label in range(num_classes):
        mine = [r for r in rows if r[1] == label]
        base = totals[label] if totals else len(mine)
        if sparse and base < 3:
            kept += mine
            continue
        take = max(1, round(base * HOLDOUT_FRACTION))
        if len(mine) - take < 1:
            raise DataError(
                f"class {label} has {len(mine)} images left to split; each class needs at "
                "least 3 images (train, val and test)"
            )
        order = rng.permutation(len(mine))
        carved += [mine[i] for i in sorted(order[:take])]
        kept += [mine[i] for i in sorted(order[take:])]
    return kept, carved


def write_split_csv(split: Split, path: Path) -> None:
    """split.csv: one row per image: split, class, path relative to the data dir."""
    with path.open("w", newline="") as f:
        writer = spreadsheet.writer(f)  # file names are the archive's: no formulas run
        writer.writerow(["split", "class", "path"])
        for name in SPLITS:
            for rel, label in split.files[name]:
                writer.writerow([name, split.class_names[label], rel])


def read_split_csv(path: Path, root: str | Path, class_names: list[str]) -> Split:
    index = {name: i for i, name in enumerate(class_names)}
    split = Split(Path(root), list(class_names), {s: [] for s in SPLITS})
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            path_text, label = spreadsheet.restore(row["path"]), spreadsheet.restore(row["class"])
            split.files[row["split"]].append((path_text, index[label]))
    split.source = {s: f"from {path.name}" for s in SPLITS}
    return split


def channel_stats(
    paths: list[str],
    input_size: tuple[int, int],
    *,
    seed: int = 0,
    max_images: int = STATS_MAX_IMAGES,
) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of RGB pixels, after resampling
    to ``input_size``, over ``paths`` (a seeded sample of ``max_images`` of them
    when there are more). Returns ([r, g, b] mean, [r, g, b] std)."""
    if len(paths) > max_images:
        picked = np.random.default_rng(seed).choice(len(paths), max_images, replace=False)
        paths = [paths[i] for i in sorted(picked)]
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for path in paths:
        try:
            pixels, _ = load_pixels(path, input_size)
        except ImageError as exc:
            print(f"warning: skipped {exc}", file=sys.stderr)
            continue
        flat = pixels.reshape(-1, 3).astype(np.float64)
        total += flat.sum(axis=0)
        total_sq += (flat**2).sum(axis=0)
        count += flat.shape[0]
    if count == 0:
        raise DataError("no readable training image to measure the mean on")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std < 1.0, 1.0, std)  # a flat channel must not blow up the input
    return [float(v) for v in mean], [float(v) for v in std]


def make_dataset(
    paths: list[str],
    labels: np.ndarray,
    *,
    input_size: tuple[int, int],
    mean: list[float],
    std: list[float],
    batch_size: int,
    class_weights: list[float] | None = None,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
):
    """A tf.data pipeline of (x, y, w) batches: normalized (B, H, W, 3) float32
    pixels, (B,) int32 labels, (B,) float32 sample weights.

    Files are decoded by ``load_pixels`` in parallel as the pipeline runs. The
    weight of an image is ``class_weights[label]`` (1 without them), and 0 for a
    file that cannot be decoded (a warning goes to stderr), so one bad file
    neither stops training nor counts, and the number of batches stays known.
    ``shuffle`` reshuffles every epoch from ``seed``; ``augment`` applies
    ``train.augment.build_augmenter`` to the pixels before normalization.
    """
    import tensorflow as tf

    from .augment import build_augmenter

    height, width = int(input_size[0]), int(input_size[1])
    num_classes = int(np.max(labels)) + 1 if len(labels) else 1
    weights_t = tf.constant(
        class_weights if class_weights is not None else [1.0] * num_classes, tf.float32
    )

    def load(path: bytes) -> tuple[np.ndarray, np.float32]:
        try:
            pixels, _ = load_pixels(path.decode(), (height, width))
            return pixels, np.float32(1.0)
        except ImageError as exc:
            print(f"warning: skipped {exc}", file=sys.stderr)
            return np.zeros((height, width, 3), np.uint8), np.float32(0.0)

    def decode(path, label):
        pixels, ok = tf.numpy_function(load, [path], [tf.uint8, tf.float32], stateful=False)
        pixels.set_shape((height, width, 3))
        ok.set_shape(())
        return tf.cast(pixels, tf.float32), label, ok * tf.gather(weights_t, label)

    ds = tf.data.Dataset.from_tensor_slices(
        (np.asarray(paths, dtype=str), np.asarray(labels, dtype=np.int32))
    )
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if augment:
        augmenter = build_augmenter((height, width), seed=seed)
        # Sequential (not parallel) so the random draws follow the batch order.
        ds = ds.map(lambda x, y, w: (augmenter(x, training=True), y, w))
    mean_t = tf.constant(mean, tf.float32)
    std_t = tf.constant(std, tf.float32)
    ds = ds.map(lambda x, y, w: ((x - mean_t) / std_t, y, w))
    return ds.prefetch(tf.data.AUTOTUNE)
