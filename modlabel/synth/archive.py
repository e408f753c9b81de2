"""Archive: one image through the class-blind steps, and a whole labeled archive.

``render_image`` draws a modality's scene, then applies the steps every class
goes through alike: rotation (boxes follow it), photometric jitter (gain, bias,
gamma, blur, noise) and distractors. ``render_archive`` writes ``per_class``
JPEGs per class and ``ground_truth.jsonl`` beside them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..groundtruth import GROUND_TRUTH_NAME, image_record
from .distractors import draw_distractors
from .draw import FloatImage, Scene, gaussian_blur, grain, points_box, rotate_points
from .modalities import CLASS_NAMES, MODALITIES_BY_NAME

JPEG_QUALITY = 90
MIN_SIZE = 32

# Width and height are drawn independently, so the aspect ratio varies too.
SIZE_JITTER = (0.75, 1.25)


@dataclass
class SynthImage:
    """One rendered image with its ground truth.

    image: RGB, ``width`` x ``height`` pixels.
    boxes: the class's structures, ``[{"label": "optic_disc", "box": [x0, y0, x1, y1]}]``,
        int pixel coordinates in ``image``, x1/y1 exclusive, clipped and non-empty.
    distractors: the same shape; labels from ``DISTRACTOR_LABELS``.
    """

    image: Image.Image
    class_name: str
    boxes: list[dict] = field(default_factory=list)
    distractors: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class SynthSummary:
    """What ``render_archive`` wrote: ``counts`` images per class under ``out``."""

    out: Path
    counts: dict[str, int]
    ground_truth: Path

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ---------------------------------------------------------------- class-blind steps


def _rotate_scene(scene: Scene, angle_deg: float) -> tuple[FloatImage, list[dict]]:
    """Turn the scene about its centre; returns pixels (H, W, 3) and the boxes that remain."""
    height, width = scene.pixels.shape[:2]
    cx, cy = width / 2.0, height / 2.0
    pixels = scene.pixels
    if angle_deg:
        channels = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(scene.pixels[:, :, c])).rotate(
                    angle_deg,
                    resample=Image.Resampling.BILINEAR,
                    center=(cx, cy),
                    fillcolor=float(scene.background[c]),
                ),
                np.float32,
            )
            for c in range(3)
        ]
        pixels = np.stack(channels, axis=2)
    boxes = []
    for region in scene.regions:
        points = rotate_points(region.points, angle_deg, cx, cy) if angle_deg else region.points
        box = points_box(points, width, height)
        if box is not None:
            boxes.append({"label": region.label, "box": box})
    return pixels, boxes


def _jitter_photometric(pixels: FloatImage, rng: np.random.Generator) -> FloatImage:
    """Gain, bias, gamma, occasional blur and luminance noise; (H, W, 3) float32 in [0, 1]."""
    gain = rng.uniform(0.85, 1.15)
    bias = rng.uniform(-0.05, 0.05)
    gamma = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    out = np.clip(pixels * gain + bias, 0.0, 1.0) ** gamma
    if rng.random() < 0.3:
        out = gaussian_blur(out, rng.uniform(0.3, 1.0))
    noise_sigma = rng.uniform(0.0, 0.03)
    # Same noise on all channels: grey modalities stay grey.
    out = out + grain(rng, out.shape[:2], noise_sigma)[:, :, None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- public API


def render_image(
    class_name: str, rng: np.random.Generator, size: int, *, noise: float = 0.0
) -> SynthImage:
    """Render one image of ``class_name`` with its ground-truth boxes.

    size: nominal side in pixels; width and height are each ``size`` times a factor
    drawn from ``SIZE_JITTER``. noise: the standard deviation, as a share of the full
    scale (0.1 = 25.5 grey levels), of Gaussian noise added to every pixel and channel
    last, over the distractors too: a noisier "scanner" than the archive the model
    learned on (a shifted style); 0 adds none and draws nothing, so the image is the
    same as without it. All randomness comes from ``rng``, so the same generator state
    gives the same image.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    spec = MODALITIES_BY_NAME.get(class_name)
    if spec is None:
        raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASS_NAMES)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    width = round(size * rng.uniform(*SIZE_JITTER))
    height = round(size * rng.uniform(*SIZE_JITTER))
    scene = spec.render(rng, width, height)
    angle = rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg)
    pixels, boxes = _rotate_scene(scene, angle)
    pixels = _jitter_photometric(pixels, rng)
    image = Image.fromarray(np.round(pixels * 255.0).astype(np.uint8), "RGB")
    distractors = draw_distractors(image, rng)
    if noise > 0:
        drawn = np.asarray(image, np.float32) / 255.0
        noisy = np.clip(drawn + grain(rng, drawn.shape, noise), 0.0, 1.0)
        image = Image.fromarray(np.round(noisy * 255.0).astype(np.uint8), "RGB")
    return SynthImage(image=image, class_name=class_name, boxes=boxes, distractors=distractors)


def image_seed(seed: int, class_index: int, image_index: int) -> np.random.Generator:
    """The generator for one archive image: independent of ``per_class`` and of order."""
    return np.random.default_rng([seed, class_index, image_index])


def ground_truth_record(synth: SynthImage, path: str) -> dict:
    """One ``ground_truth.jsonl`` line: path (relative, posix), class, size, boxes."""
    return image_record(
        path=path,
        class_name=synth.class_name,
        width=synth.image.width,
        height=synth.image.height,
        boxes=synth.boxes,
        distractors=synth.distractors,
    )


def render_archive(
    out: Path,
    per_class: int,
    size: int = 256,
    seed: int = 0,
    *,
    noise: float = 0.0,
    progress: bool = False,
) -> SynthSummary:
    """Write ``per_class`` JPEGs per class to ``out/<class>/<class>_<index:05d>.jpg``.

    noise: extra per-pixel Gaussian noise of every image (``render_image``).

    Also writes ``out/ground_truth.jsonl``, one ``ground_truth_record`` per image in
    class order, then index order. Images are written as they are rendered, never
    held together. The same arguments give byte-identical files.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ground_truth = out / GROUND_TRUTH_NAME
    counts: dict[str, int] = {}
    with (
        ground_truth.open("w", encoding="utf-8", newline="\n") as lines,
        tqdm(total=per_class * len(CLASS_NAMES), disable=not progress, unit="img") as bar,
    ):
        for class_index, class_name in enumerate(CLASS_NAMES):
            (out / class_name).mkdir(exist_ok=True)
            for index in range(per_class):
                rng = image_seed(seed, class_index, index)
                synth = render_image(class_name, rng, size, noise=noise)
                relative = f"{class_name}/{class_name}_{index:05d}.jpg"
                synth.image.save(out / relative, format="JPEG", quality=JPEG_QUALITY)
                lines.write(json.dumps(ground_truth_record(synth, relative)) + "\n")
                bar.update(1)
            counts[class_name] = per_class
    return SynthSummary(out=out, counts=counts, ground_truth=ground_truth)
