"""Synth: render a labeled archive of caricatured medical images.

No public modality data set can be downloaded here, so modlabel draws its own:
the seven modalities of the paper (Kim, Rajaraman, Antani 2019, section 2.1),
each with its discriminative structure (the optic disc of a fundus, the fan of
an ultrasound, the axes of a graph, ...) recorded as a ground-truth box, so a
relevance map (CAM, Grad-CAM, CRM) can be scored against where the class
evidence really is.

Every image is drawn by one small renderer per class and then passes through
the same class-blind steps: rotation (boxes follow it), photometric jitter
(gain, bias, gamma, blur, noise) and distractors (text, scale bars, arrows,
borders) drawn with the same probabilities in every class, so they carry no
class information but keep the task from being trivial.

Coordinates are pixels of the saved image: x to the right, y down, a box is
``[x0, y0, x1, y1]`` with ``x1`` and ``y1`` exclusive. Anatomical sides follow
the radiological convention: the patient's left is on the image's right.

Only numpy and Pillow are used; TensorFlow stays in ``train/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

CLASS_NAMES: tuple[str, ...] = (
    "abdominal_ct",
    "brain_mri",
    "ultrasound",
    "chest_xray",
    "fluorescence_microscopy",
    "retinal_funduscopy",
    "statistical_graph",
)
"""The paper's seven modality classes; also the archive's folder names, in label order."""

STRUCTURE_LABELS: dict[str, frozenset[str]] = {
    "abdominal_ct": frozenset({"body", "spine", "liver", "right_kidney", "left_kidney"}),
    "brain_mri": frozenset({"brain", "ventricles"}),
    "ultrasound": frozenset({"sector", "chamber"}),
    "chest_xray": frozenset({"right_lung", "left_lung", "heart"}),
    "fluorescence_microscopy": frozenset({"cell"}),
    "retinal_funduscopy": frozenset({"fundus", "optic_disc", "macula"}),
    "statistical_graph": frozenset({"axes", "plot_area"}),
}
"""Box labels every image of a class carries (a graph may add ``legend``)."""

DISTRACTOR_LABELS: tuple[str, ...] = ("text", "scale_bar", "arrow", "border")

GROUND_TRUTH_NAME = "ground_truth.jsonl"
JPEG_QUALITY = 90
MIN_SIZE = 32

# Width and height are drawn independently, so the aspect ratio varies too.
SIZE_JITTER = (0.75, 1.25)

# Distractor probabilities, identical for every class so that none of them
# predicts a class.
P_TEXT = 0.5
P_SCALE_BAR = 0.3
P_ARROW = 0.3
P_BORDER = 0.2
DISTRACTOR_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (0, 0, 0),
    (255, 230, 0),
    (230, 30, 30),
)
DISTRACTOR_COLOR_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
CAPTIONS = ("L", "R", "A", "P", "Fig. 3", "(a)", "(b)", "C", "*", "T2", "2 cm", "n=12")
SCALE_BAR_CAPTIONS = ("1 cm", "5 mm", "50 um", "10 um", "100 nm")

FloatImage = np.ndarray
"""(H, W) or (H, W, 3) float32 intensities in [0, 1]."""


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


@dataclass(frozen=True)
class _Region:
    """A labeled structure as the pixel centres it covers: points (N, 2) float x, y."""

    label: str
    points: np.ndarray


@dataclass(frozen=True)
class _Scene:
    """A class renderer's output before the class-blind steps.

    pixels: (H, W, 3) float32 in [0, 1]. background: RGB in [0, 1] that fills the
    corners uncovered by rotation.
    """

    pixels: FloatImage
    regions: list[_Region]
    background: tuple[float, float, float]


Renderer = Callable[[np.random.Generator, int, int], _Scene]


# ---------------------------------------------------------------- geometry


def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, broadcastable: xx (1, W), yy (H, 1) float32."""
    xx = np.arange(width, dtype=np.float32)[None, :] + 0.5
    yy = np.arange(height, dtype=np.float32)[:, None] + 0.5
    return xx, yy


def _ellipse(
    xx: np.ndarray,
    yy: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    angle_deg: float = 0.0,
    edge_px: float = 1.0,
) -> FloatImage:
    """Soft ellipse mask (H, W) float32: 1 inside, 0 outside, an ``edge_px`` ramp.

    ``angle_deg`` turns the x radius clockwise on screen (y points down).
    """
    t = math.radians(angle_deg)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    # (1 - rho) * min radius approximates the distance to the rim in pixels.
    return np.clip((1.0 - rho) * min(rx, ry) / edge_px + 0.5, 0.0, 1.0).astype(np.float32)


def _mask_region(label: str, mask: np.ndarray) -> _Region:
    """Region from a soft or boolean (H, W) mask, covering pixels above one half."""
    rows, cols = np.nonzero(mask > 0.5)
    points = np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64)
    return _Region(label, points)


def _rect_region(label: str, x0: float, y0: float, x1: float, y1: float) -> _Region:
    """Region of the pixels in the rectangle [x0, x1) x [y0, y1)."""
    xs = (x0 + 0.5, x1 - 0.5)
    ys = (y0 + 0.5, y1 - 0.5)
    points = np.array([(x, y) for x in xs for y in ys], dtype=np.float64)
    return _Region(label, points)


def _rotate_points(points: np.ndarray, angle_deg: float, cx: float, cy: float) -> np.ndarray:
    """Rotate (N, 2) x, y points as ``PIL.Image.rotate(angle_deg, center=(cx, cy))`` does.

    Positive angles turn counter-clockwise on screen.
    """
    t = math.radians(angle_deg)
    dx, dy = points[:, 0] - cx, points[:, 1] - cy
    x = cx + math.cos(t) * dx + math.sin(t) * dy
    y = cy - math.sin(t) * dx + math.cos(t) * dy
    return np.stack([x, y], axis=1)


def _points_box(points: np.ndarray, width: int, height: int) -> list[int] | None:
    """Smallest [x0, y0, x1, y1) box of the pixels holding ``points``, clipped; None if empty."""
    if len(points) == 0:
        return None
    x0 = max(0, math.floor(points[:, 0].min()))
    y0 = max(0, math.floor(points[:, 1].min()))
    x1 = min(width, math.floor(points[:, 0].max()) + 1)
    y1 = min(height, math.floor(points[:, 1].max()) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    return [int(x0), int(y0), int(x1), int(y1)]


# ---------------------------------------------------------------- raster helpers


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: float) -> FloatImage:
    """Band-limited noise (H, W) float32, about unit variance, ``cells`` blobs across."""
    longest = max(width, height)
    gw = max(2, round(cells * width / longest)) + 2
    gh = max(2, round(cells * height / longest)) + 2
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = np.asarray(smooth, dtype=np.float32)
    return noise / max(float(noise.std()), 1e-6)


def _gaussian_blur(pixels: FloatImage, sigma_px: float) -> FloatImage:
    """Separable Gaussian blur of (H, W) or (H, W, C) float32; edges repeat."""
    if sigma_px <= 0.05:
        return pixels
    radius = max(1, int(3.0 * sigma_px + 0.5))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma_px) ** 2)
    kernel /= kernel.sum()
    out = pixels.astype(np.float32, copy=False)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        window = [slice(None)] * out.ndim
        acc = np.zeros_like(out)
        for i, weight in enumerate(kernel):
            window[axis] = slice(i, i + out.shape[axis])
            acc += weight * padded[tuple(window)]
        out = acc
    return out


def _grain(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise of ``shape``, float32, standard deviation ``sigma``."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _gray_to_rgb(gray: FloatImage) -> FloatImage:
    """(H, W) -> (H, W, 3) float32, clipped to [0, 1]."""
    return np.repeat(np.clip(gray, 0.0, 1.0)[:, :, None], 3, axis=2).astype(np.float32)


def _blend(base: FloatImage, value: float | FloatImage, weight: FloatImage) -> FloatImage:
    """base * (1 - weight) + value * weight: paint ``value`` through a soft mask."""
    return base * (1.0 - weight) + value * weight


@lru_cache(maxsize=64)
def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size_px`` (the bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=max(6, size_px))
    except (ImportError, OSError):
        return ImageFont.load_default()


# ---------------------------------------------------------------- class renderers


def _render_abdominal_ct(rng: np.random.Generator, width: int, height: int) -> _Scene:
    """Axial abdominal CT: elliptical body on black, bright spine posterior, liver, kidneys."""
    xx, yy = _grid(width, height)
    cx = width * (0.5 + rng.uniform(-0.05, 0.05))
    cy = height * (0.5 + rng.uniform(-0.05, 0.05))
    rx = width * rng.uniform(0.36, 0.46)
    ry = min(rx * rng.uniform(0.62, 0.80), height * 0.42)
    edge = max(1.0, 0.004 * width)

    body = _ellipse(xx, yy, cx, cy, rx, ry, edge_px=edge)
    wall = _ellipse(xx, yy, cx, cy, rx * 0.91, ry * 0.88, edge_px=edge)
    cavity = _ellipse(xx, yy, cx, cy, rx * 0.84, ry * 0.79, edge_px=edge)
    mottle = _smooth_noise(rng, width, height, 24)

    img = np.full((height, width), rng.uniform(0.0, 0.03), dtype=np.float32)
    if rng.random() < 0.6:
        # The scanner table: a bright curved band under the patient.
        table = _ellipse(xx, yy, cx, cy + ry * 1.9, rx * 1.5, ry * 0.85, edge_px=edge)
        table_inner = _ellipse(xx, yy, cx, cy + ry * 1.9, rx * 1.47, ry * 0.8, edge_px=edge)
        img = _blend(img, 0.45, np.clip(table - table_inner, 0, 1))
    img = _blend(img, 0.27, body)  # subcutaneous fat
    img = _blend(img, 0.48, wall)  # abdominal wall muscle
    img = _blend(img, 0.40 + 0.03 * mottle, cavity)  # bowel and mesentery

    # Bowel gas: black pockets in the anterior half.
    for _ in range(rng.integers(2, 7)):
        gx = cx + rx * rng.uniform(-0.35, 0.55)
        gy = cy - ry * rng.uniform(0.05, 0.6)
        gr = rx * rng.uniform(0.03, 0.08)
        img = _blend(img, 0.02, _ellipse(xx, yy, gx, gy, gr, gr * rng.uniform(0.7, 1.2)) * cavity)

    liver = _ellipse(
        xx,
        yy,
        cx - rx * rng.uniform(0.38, 0.46),
        cy - ry * rng.uniform(0.05, 0.2),
        rx * rng.uniform(0.34, 0.42),
        ry * rng.uniform(0.48, 0.58),
        rng.uniform(-20, 20),
        edge,
    ) * (cavity > 0.5)
    img = _blend(img, 0.60 + 0.03 * mottle, liver)
    spleen = _ellipse(xx, yy, cx + rx * 0.62, cy - ry * 0.05, rx * 0.14, ry * 0.3, 25, edge) * (
        cavity > 0.5
    )
    img = _blend(img, 0.56, spleen)

    # Spine: vertebral body, canal, spinous and transverse processes.
    rv = rx * rng.uniform(0.08, 0.10)
    vy = cy + ry * rng.uniform(0.38, 0.44)
    vertebra = _ellipse(xx, yy, cx, vy, rv, rv * 0.9, edge_px=edge)
    marrow = _ellipse(xx, yy, cx, vy, rv * 0.75, rv * 0.68, edge_px=edge)
    arch = _ellipse(xx, yy, cx, vy + rv * 1.35, rv * 0.62, rv * 0.55, edge_px=edge)
    canal = _ellipse(xx, yy, cx, vy + rv * 1.3, rv * 0.38, rv * 0.32, edge_px=edge)
    spinous = _ellipse(xx, yy, cx, vy + rv * 2.1, rv * 0.22, rv * 0.6, edge_px=edge)
    transverse = np.maximum(
        _ellipse(xx, yy, cx - rv * 1.2, vy + rv * 0.9, rv * 0.65, rv * 0.22, 20, edge),
        _ellipse(xx, yy, cx + rv * 1.2, vy + rv * 0.9, rv * 0.65, rv * 0.22, -20, edge),
    )
    for side in (-1, 1):
        paraspinal = _ellipse(xx, yy, cx + side * rv * 1.9, vy + rv * 1.7, rv * 1.1, rv * 0.9)
        img = _blend(img, 0.50, paraspinal * (body > 0.5))
    bone = np.maximum.reduce([vertebra, arch, spinous, transverse])
    img = _blend(img, 0.95, bone)
    img = _blend(img, 0.72, marrow)
    img = _blend(img, 0.35, canal)

    # Aorta (patient's left, image right) and IVC in front of the spine.
    img = _blend(img, 0.75, _ellipse(xx, yy, cx + rv * 0.7, vy - rv * 1.6, rv * 0.45, rv * 0.45))
    img = _blend(img, 0.62, _ellipse(xx, yy, cx - rv * 1.3, vy - rv * 1.5, rv * 0.5, rv * 0.38))

    regions = [_mask_region("body", body), _mask_region("spine", bone)]
    regions.append(_mask_region("liver", liver))
    kidney_y = cy + ry * rng.uniform(0.15, 0.28)
    for side, label in ((-1, "right_kidney"), (1, "left_kidney")):
        kx = cx + side * rx * rng.uniform(0.33, 0.40)
        krx, kry = rx * rng.uniform(0.10, 0.13), ry * rng.uniform(0.17, 0.22)
        angle = side * rng.uniform(-35, -15)
        kidney = _ellipse(xx, yy, kx, kidney_y, krx, kry, angle, edge)
        hilum = _ellipse(xx, yy, kx - side * krx * 0.45, kidney_y, krx * 0.45, kry * 0.35, angle)
        img = _blend(img, 0.74, kidney)
        img = _blend(img, 0.45, hilum * kidney)
        regions.append(_mask_region(label, kidney))

    img = _gaussian_blur(img, 0.4 + 0.002 * width) + _grain(rng, img.shape, 0.015)
    return _Scene(_gray_to_rgb(img), regions, (0.0, 0.0, 0.0))


def _render_brain_mri(rng: np.random.Generator, width: int, height: int) -> _Scene:
    """Axial brain MRI: scalp and skull rings, folded cortex, butterfly ventricles (T1 or T2)."""
    xx, yy = _grid(width, height)
    t1 = rng.random() < 0.5
    # Tissue intensities: T1 shows CSF dark, white matter bright; T2 the reverse.
    wm, gm, csf, scalp, diploe = (
        (0.72, 0.50, 0.08, 0.85, 0.6) if t1 else (0.40, 0.58, 0.95, 0.62, 0.45)
    )
    cx = width * (0.5 + rng.uniform(-0.05, 0.05))
    cy = height * (0.5 + rng.uniform(-0.04, 0.04))
    head_ry = height * rng.uniform(0.38, 0.46)
    head_rx = min(head_ry * rng.uniform(0.74, 0.9), width * 0.45)
    edge = max(1.0, 0.004 * width)
    head = _ellipse(xx, yy, cx, cy, head_rx, head_ry, edge_px=edge)
    ring = max(2.0, head_ry * 0.05)
    skull = _ellipse(xx, yy, cx, cy, head_rx - ring, head_ry - ring, edge_px=edge)
    diploic = _ellipse(xx, yy, cx, cy, head_rx - ring * 1.5, head_ry - ring * 1.5, edge_px=edge)
    inner = _ellipse(xx, yy, cx, cy, head_rx - ring * 2.1, head_ry - ring * 2.1, edge_px=edge)
    brx, bry = head_rx - ring * 2.5, head_ry - ring * 2.5
    brain = _ellipse(xx, yy, cx, cy, brx, bry, edge_px=edge)

    img = np.full((height, width), rng.uniform(0.0, 0.03), dtype=np.float32)
    img = _blend(img, scalp, head)
    img = _blend(img, 0.06, skull)  # cortical bone is dark on MRI
    img = _blend(img, diploe, np.clip(diploic - inner, 0, 1))
    img = _blend(img, csf, inner)

    # Cortex: grey matter near the rim, folded by the contour lines of a smooth field.
    rho = np.sqrt(((xx - cx) / brx) ** 2 + ((yy - cy) / bry) ** 2)
    cortex = np.clip((rho - 0.45) / 0.35, 0.0, 1.0)
    folds = _smooth_noise(rng, width, height, 10)
    sulci = np.clip(1.0 - np.abs(np.sin(np.pi * rng.uniform(2.2, 3.0) * folds)) / 0.22, 0, 1)
    grey = np.clip(
        cortex * 0.7 + cortex * np.clip(1.0 - np.abs(np.sin(np.pi * 2.6 * folds)), 0, 1), 0, 1
    )
    tissue = _blend(np.float32(wm), gm, grey)
    tissue = _blend(tissue, csf, sulci * cortex * 0.85)
    tissue = tissue + 0.02 * _smooth_noise(rng, width, height, 30)
    img = _blend(img, tissue, brain)

    # Midline fissure from front to back.
    fissure = np.clip(1.0 - np.abs(xx - cx) / max(1.0, 0.008 * width), 0, 1) * (rho > 0.5)
    img = _blend(img, csf, fissure * brain)

    # Lateral ventricles: two bananas bowed outward, frontal horns flaring (a butterfly).
    size = rng.uniform(0.75, 1.3)
    vrx, vry = brx * 0.065 * size, bry * 0.26 * size
    bend = brx * 0.05 * size
    ventricles = np.zeros_like(img)
    for side in (-1, 1):
        vx = cx + side * brx * 0.07 * size
        vy = cy - bry * 0.03
        v = (yy - vy) / vry
        u = (xx - vx) - side * bend * (v**2 + 0.8 * np.clip(-v, 0, None) ** 3)
        shape = np.clip((1.0 - np.sqrt((u / vrx) ** 2 + v**2)) * vrx / edge + 0.5, 0, 1)
        ventricles = np.maximum(ventricles, shape)
    third = _ellipse(xx, yy, cx, cy + bry * 0.06, brx * 0.012 + 0.5, bry * 0.08 * size)
    ventricles = np.maximum(ventricles, third)
    img = _blend(img, csf, ventricles)

    img = _gaussian_blur(img, 0.4 + 0.002 * width) + _grain(rng, img.shape, 0.012)
    regions = [_mask_region("brain", brain), _mask_region("ventricles", ventricles)]
    return _Scene(_gray_to_rgb(img), regions, (0.0, 0.0, 0.0))


def _render_ultrasound(rng: np.random.Generator, width: int, height: int) -> _Scene:
    """Sector ultrasound: a speckled fan with its apex at the top, anechoic chambers inside."""
    xx, yy = _grid(width, height)
    ax = width * (0.5 + rng.uniform(-0.04, 0.04))
    ay = height * rng.uniform(-0.02, 0.08)
    depth = (height - ay) * rng.uniform(0.82, 0.95)
    half_angle = math.radians(rng.uniform(30, 46))
    # Keep the fan inside the frame on both sides.
    half_angle = min(half_angle, math.asin(min(1.0, 0.49 * width / depth)))
    near = depth * rng.uniform(0.03, 0.09)

    dx, dy = xx - ax, yy - ay
    radius = np.sqrt(dx**2 + dy**2)
    angle = np.arctan2(dx, dy)  # 0 straight down
    edge = max(1.0, 0.004 * width)
    sector = (
        np.clip((depth - radius) / edge + 0.5, 0, 1)
        * np.clip((radius - near) / edge + 0.5, 0, 1)
        * np.clip((half_angle - np.abs(angle)) * radius / edge + 0.5, 0, 1)
    ).astype(np.float32)

    # Speckle: Rayleigh amplitude, correlated laterally like a real beam.
    coarse = rng.rayleigh(1.0, (height, max(2, width // 2))).astype(np.float32)
    speckle = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    speckle = _gaussian_blur(speckle, 0.5)
    echo = np.clip(0.45 + 0.18 * _smooth_noise(rng, width, height, 6), 0.1, 1.0)
    # Bright tissue interfaces: a few arcs across the fan.
    for _ in range(rng.integers(1, 4)):
        r0 = depth * rng.uniform(0.2, 0.95)
        echo = echo + 0.35 * np.clip(1.0 - np.abs(radius - r0) / (depth * 0.02), 0, 1)
    attenuation = np.exp(-rng.uniform(0.3, 1.0) * radius / depth)
    img = 0.55 * speckle * echo * attenuation * sector

    regions = [_mask_region("sector", sector)]
    placed: list[tuple[float, float, float]] = []
    for _ in range(rng.integers(1, 4)):
        for _attempt in range(10):
            rc = depth * rng.uniform(0.35, 0.72)
            ac = half_angle * rng.uniform(-0.55, 0.55)
            crx = depth * rng.uniform(0.07, 0.14)
            cry = crx * rng.uniform(0.6, 1.3)
            ccx, ccy = ax + rc * math.sin(ac), ay + rc * math.cos(ac)
            if all(math.hypot(ccx - px, ccy - py) > crx + pr for px, py, pr in placed):
                break
        else:
            continue
        placed.append((ccx, ccy, max(crx, cry)))
        tilt = rng.uniform(-40, 40)
        chamber = _ellipse(xx, yy, ccx, ccy, crx, cry, tilt, edge) * sector
        wall = _ellipse(xx, yy, ccx, ccy, crx * 1.15, cry * 1.15, tilt, edge) * sector
        img = img + 0.25 * (wall - chamber) * speckle
        img = _blend(img, 0.02 * speckle, chamber)
        regions.append(_mask_region("chamber", chamber))

    # Depth markers: small dots down the right edge of the fan.
    for k in range(1, 6):
        r = depth * k / 6
        mx = ax + r * math.sin(half_angle) + 0.02 * width
        my = ay + r * math.cos(half_angle)
        img = np.maximum(img, 0.7 * _ellipse(xx, yy, mx, my, 1.2, 1.2))

    return _Scene(_gray_to_rgb(img), regions, (0.0, 0.0, 0.0))


def _render_chest_xray(rng: np.random.Generator, width: int, height: int) -> _Scene:
    """PA chest radiograph: bright thorax, two dark lungs with ribs, heart shadow to the right."""
    xx, yy = _grid(width, height)
    cx = width * (0.5 + rng.uniform(-0.04, 0.04))
    cy = height * (0.5 + rng.uniform(-0.04, 0.04))
    scale = rng.uniform(0.85, 1.05)
    edge = max(1.5, 0.01 * width)
    soft_tissue = rng.uniform(0.55, 0.68)

    # Trunk: a boxy superellipse, shoulders near the top corners.
    tu = np.abs(xx - cx) / (0.56 * width * scale)
    tv = np.abs(yy - (cy + 0.3 * height)) / (0.85 * height)
    trunk = np.clip((1.0 - (tu**4 + tv**4)) * 8.0, 0.0, 1.0)
    img = _blend(np.full((height, width), rng.uniform(0.04, 0.14), np.float32), soft_tissue, trunk)

    lung_rx = width * scale * rng.uniform(0.15, 0.18)
    lung_ry = height * scale * rng.uniform(0.29, 0.34)
    lung_y = cy - 0.06 * height
    heart_x = cx + width * scale * rng.uniform(0.06, 0.09)
    heart_y = lung_y + lung_ry * rng.uniform(0.5, 0.6)
    heart = _ellipse(
        xx,
        yy,
        heart_x,
        heart_y,
        width * scale * rng.uniform(0.16, 0.19),
        height * scale * rng.uniform(0.11, 0.13),
        rng.uniform(10, 25),
        edge,
    )
    lungs = {}
    hilum_glow = np.zeros_like(img)
    for side, label in ((-1, "right_lung"), (1, "left_lung")):
        lx = cx + side * width * scale * rng.uniform(0.18, 0.21)
        # Tilted so the apices lean toward the midline.
        lung = _ellipse(xx, yy, lx, lung_y, lung_rx, lung_ry, -side * 6, edge)
        dome = _ellipse(xx, yy, lx, lung_y + lung_ry * 0.95, lung_rx * 1.4, lung_ry * 0.32, 0, edge)
        lungs[label] = np.clip(lung - dome, 0, 1)
        # Vessels fan out from the hilum: denser medially.
        hx, hy = lx - side * lung_rx * 0.6, lung_y + lung_ry * 0.05
        hilum_glow += np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.7 * lung_rx) ** 2))
    lungs["left_lung"] = np.clip(lungs["left_lung"] - heart, 0, 1)
    lung_field = np.maximum(lungs["right_lung"], lungs["left_lung"])
    air = rng.uniform(0.12, 0.2) + 0.12 * hilum_glow + 0.025 * _smooth_noise(rng, width, height, 40)
    img = _blend(img, air, lung_field)

    mediastinum = np.clip(1.3 - np.abs(xx - cx) / (0.055 * width * scale), 0, 1) * (yy < heart_y)
    img = np.maximum(img, (soft_tissue + 0.04) * mediastinum * trunk)
    img = _blend(img, soft_tissue + 0.02, heart)

    # Posterior ribs: arcs sagging laterally, shown over the lungs and faintly outside.
    spacing = lung_ry * rng.uniform(0.19, 0.23)
    thickness = max(1.0, spacing * 0.22)
    ribs = np.zeros_like(img)
    reach = np.abs(xx - cx) / (lung_rx * 2.4)
    for k in range(10):
        y0 = lung_y - lung_ry * 1.0 + k * spacing
        curve = y0 + lung_ry * 0.9 * (reach - 0.3) ** 2
        ribs = np.maximum(ribs, np.clip(1.0 - np.abs(yy - curve) / thickness, 0, 1))
    ribs = ribs * (reach > 0.08) * (reach < 1.15)
    img = img + 0.1 * ribs * np.clip(lung_field + 0.3 * trunk, 0, 1)
    for side in (-1, 1):
        # Clavicles: from the sternal notch outward and slightly up.
        x0, x1 = cx + side * 0.04 * width, cx + side * 0.33 * width * scale
        y0, y1 = lung_y - lung_ry * 0.92, lung_y - lung_ry * 1.08
        along = (xx - x0) / (x1 - x0)
        clavicle = np.clip(1.0 - np.abs(yy - (y0 + (y1 - y0) * along)) / (thickness * 1.5), 0, 1)
        img = img + 0.15 * clavicle * ((along >= 0) & (along <= 1))

    img = _gaussian_blur(img, 0.8 + 0.004 * width) + _grain(rng, img.shape, 0.01)
    regions = [
        _mask_region("right_lung", lungs["right_lung"]),
        _mask_region("left_lung", lungs["left_lung"]),
        _mask_region("heart", heart),
    ]
    return _Scene(_gray_to_rgb(img), regions, (0.0, 0.0, 0.0))


def _render_fluorescence_microscopy(rng: np.random.Generator, width: int, height: int) -> _Scene:
    """Fluorescence micrograph: glowing irregular cells with nuclei on black, random count."""
    shortest = min(width, height)
    stain_colors = np.array(
        [(0.15, 1.0, 0.25), (1.0, 0.2, 0.15), (1.0, 0.85, 0.1), (0.85, 0.25, 1.0)], np.float32
    )
    stain = stain_colors[rng.integers(len(stain_colors))]
    nucleus_color = np.array((0.25, 0.4, 1.0), np.float32) if rng.random() < 0.75 else stain * 1.0
    count = int(rng.integers(2, 15))
    base_radius = shortest * rng.uniform(0.05, 0.1) * (1.8 if count <= 3 else 1.0)

    img = np.zeros((height, width, 3), np.float32)
    regions: list[_Region] = []
    for _ in range(count):
        r0 = base_radius * rng.uniform(0.7, 1.3)
        elong = rng.uniform(1.0, 1.8)
        reach = r0 * elong * 1.6
        ccx = rng.uniform(0.08, 0.92) * width
        ccy = rng.uniform(0.08, 0.92) * height
        # Work in the cell's own window: cheap and exact for its box.
        x0, x1 = max(0, int(ccx - reach)), min(width, int(ccx + reach) + 1)
        y0, y1 = max(0, int(ccy - reach)), min(height, int(ccy + reach) + 1)
        xx, yy = _grid(x1 - x0, y1 - y0)
        dx, dy = xx + x0 - ccx, yy + y0 - ccy
        turn = rng.uniform(0, math.pi)
        u = (dx * math.cos(turn) + dy * math.sin(turn)) / elong
        v = -dx * math.sin(turn) + dy * math.cos(turn)
        rr, theta = np.sqrt(u**2 + v**2), np.arctan2(v, u)
        outline = np.ones_like(theta)
        for k in range(2, 6):
            outline = outline + rng.uniform(0, 0.3) / k * np.cos(k * theta + rng.uniform(0, 6.3))
        rel = rr / (r0 * outline)
        body = np.clip(1.0 - rel**2, 0, 1) ** 0.5
        texture = 0.6 + 0.4 * np.clip(
            _smooth_noise(rng, x1 - x0, y1 - y0, max(2.0, (x1 - x0) / 6)), -1, 1
        )
        brightness = rng.uniform(0.45, 1.0)
        img[y0:y1, x0:x1] += (brightness * body * texture)[:, :, None] * stain
        nx = ccx + r0 * rng.uniform(-0.2, 0.2)
        ny = ccy + r0 * rng.uniform(-0.2, 0.2)
        nucleus = _ellipse(
            xx + x0,
            yy + y0,
            nx,
            ny,
            r0 * rng.uniform(0.3, 0.45),
            r0 * rng.uniform(0.3, 0.45),
            rng.uniform(0, 180),
            2.0,
        ) * (body > 0.2)
        img[y0:y1, x0:x1] += (0.9 * nucleus)[:, :, None] * nucleus_color
        mask = np.zeros((height, width), bool)
        mask[y0:y1, x0:x1] = (rel < 1.0) | (nucleus > 0.5)
        regions.append(_mask_region("cell", mask))

    glow = _gaussian_blur(img, rng.uniform(0.6, 1.5) + 0.003 * width)
    img = glow + 0.35 * _gaussian_blur(img, 0.02 * shortest) + rng.uniform(0.0, 0.04)
    img = img + _grain(rng, img.shape, 0.012)
    return _Scene(np.clip(img, 0, 1).astype(np.float32), regions, (0.0, 0.0, 0.0))


def _vessel_tree(
    rng: np.random.Generator,
    width: int,
    height: int,
    disc: tuple[float, float, float],
    fundus: tuple[float, float, float],
    temporal: int,
) -> FloatImage:
    """Retinal vessels as a soft (H, W) mask: four arcades leaving the optic disc, branching.

    disc and fundus: (cx, cy, radius) in pixels; temporal: +1 when the macula lies to the
    disc's right, -1 to its left (the temporal arcades bow around it).
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    dcx, dcy, dr = disc
    fcx, fcy, fr = fundus
    step = fr * 0.035
    base_width = max(1.0, fr * 0.024)
    # (heading, curvature per step): heading in radians, x right, y down.
    stack = []
    for vertical in (-1, 1):
        heading = math.atan2(vertical, temporal * rng.uniform(0.3, 0.6))
        stack.append((dcx, dcy, heading, -temporal * vertical * rng.uniform(0.045, 0.06), 1.0, 0))
        heading = math.atan2(vertical * 0.7, -temporal)
        stack.append((dcx, dcy, heading, temporal * vertical * 0.01, 0.8, 0))
    while stack:
        x, y, heading, curvature, scale, depth = stack.pop()
        line_width = base_width * scale
        for _ in range(60):
            nx, ny = x + step * math.cos(heading), y + step * math.sin(heading)
            if math.hypot(nx - fcx, ny - fcy) > fr * 0.98:
                break
            draw.line([(x, y), (nx, ny)], fill=255, width=max(1, round(line_width)))
            x, y = nx, ny
            heading += curvature + rng.normal(0, 0.08)
            line_width *= 0.985
            if depth < 2 and line_width > 1.0 and rng.random() < 0.09:
                fork = rng.choice((-1, 1)) * rng.uniform(0.4, 0.9)
                stack.append((x, y, heading + fork, rng.normal(0, 0.02), scale * 0.6, depth + 1))
    return _gaussian_blur(np.asarray(canvas, np.float32) / 255.0, 0.5)


def _render_retinal_funduscopy(rng: np.random.Generator, width: int, height: int) -> _Scene:
    """Colour fundus photo: orange-red disc, yellow optic disc left or right, vessels, macula."""
    xx, yy = _grid(width, height)
    shortest = min(width, height)
    fcx = width * (0.5 + rng.uniform(-0.03, 0.03))
    fcy = height * (0.5 + rng.uniform(-0.03, 0.03))
    # Sometimes the camera's field of view is cut at the top and bottom.
    fr = shortest * (rng.uniform(0.40, 0.48) if rng.random() < 0.7 else rng.uniform(0.5, 0.56))
    fr = min(fr, width * 0.48)
    fundus = _ellipse(xx, yy, fcx, fcy, fr, fr, edge_px=max(1.0, 0.006 * shortest))

    # The optic disc is nasal, so it sits left or right depending on the eye.
    side = 1 if rng.random() < 0.5 else -1
    disc_r = fr * rng.uniform(0.10, 0.14)
    dcx = fcx + side * fr * rng.uniform(0.48, 0.62)
    dcy = fcy + fr * rng.uniform(-0.1, 0.1)
    mcx = fcx - side * fr * rng.uniform(0.0, 0.12)
    mcy = dcy + fr * rng.uniform(0.02, 0.1)
    macula_r = fr * rng.uniform(0.10, 0.14)

    rho2 = ((xx - fcx) ** 2 + (yy - fcy) ** 2) / fr**2
    vignette = 1.0 - rng.uniform(0.3, 0.55) * rho2
    texture = 1.0 + 0.05 * _smooth_noise(rng, width, height, 24)
    base = np.array(
        [rng.uniform(0.78, 0.95), rng.uniform(0.28, 0.42), rng.uniform(0.06, 0.14)], np.float32
    )
    img = (vignette * texture)[:, :, None] * base

    macula_soft = np.exp(-(((xx - mcx) ** 2 + (yy - mcy) ** 2) / (2 * (macula_r * 0.8) ** 2)))
    img = img * (1.0 - 0.45 * macula_soft)[:, :, None]

    disc = _ellipse(
        xx, yy, dcx, dcy, disc_r, disc_r * rng.uniform(1.0, 1.15), 0, max(1.5, disc_r * 0.25)
    )
    cup = _ellipse(xx, yy, dcx, dcy, disc_r * 0.45, disc_r * 0.5, 0, max(1.0, disc_r * 0.2))
    disc_color = np.array((1.0, rng.uniform(0.8, 0.92), rng.uniform(0.45, 0.65)), np.float32)
    img = _blend(img, disc_color, disc[:, :, None])
    img = _blend(img, np.array((1.0, 0.97, 0.85), np.float32), cup[:, :, None])

    vessels = _vessel_tree(rng, width, height, (dcx, dcy, disc_r), (fcx, fcy, fr), -side)
    vessel_color = np.array((0.5, 0.08, 0.05), np.float32) * rng.uniform(0.8, 1.1)
    img = _blend(img, vessel_color, (0.85 * vessels)[:, :, None])

    img = img * fundus[:, :, None]
    img = _gaussian_blur(img, 0.3 + 0.002 * width) + _grain(rng, (height, width, 1), 0.01)
    macula = _ellipse(xx, yy, mcx, mcy, macula_r, macula_r)
    regions = [
        _mask_region("fundus", fundus),
        _mask_region("optic_disc", disc),
        _mask_region("macula", macula),
    ]
    return _Scene(np.clip(img, 0, 1).astype(np.float32), regions, (0.0, 0.0, 0.0))


PLOT_COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (60, 60, 60),
    (150, 150, 150),
)


def _render_statistical_graph(rng: np.random.Generator, width: int, height: int) -> _Scene:
    """Chart: black X and Y axes with ticks and numbers, bars, lines or scatter, maybe a legend."""
    shortest = min(width, height)
    paper = 255 if rng.random() < 0.65 else int(rng.integers(228, 250))
    image = Image.new("RGB", (width, height), (paper, paper, paper))
    draw = ImageDraw.Draw(image)
    left = round(width * rng.uniform(0.12, 0.2))
    right = round(width * rng.uniform(0.86, 0.96))
    top = round(height * rng.uniform(0.06, 0.15))
    bottom = round(height * rng.uniform(0.78, 0.88))
    axis_width = max(1, round(shortest * rng.uniform(0.005, 0.012)))
    tick = max(2, round(shortest * 0.018))
    font = _font(max(7, round(shortest * rng.uniform(0.035, 0.05))))
    ink = tuple(int(c) for c in rng.integers(0, 50, 3))

    if rng.random() < 0.35:
        for k in range(1, 5):
            gy = bottom - (bottom - top) * k / 5
            draw.line([(left, gy), (right, gy)], fill=(205, 205, 205), width=1)

    palette = [PLOT_COLORS[i] for i in rng.permutation(len(PLOT_COLORS))]
    series = int(rng.integers(1, 4))
    span_x, span_y = right - left, bottom - top
    kind = rng.choice(("bars", "lines", "scatter"))
    marks: list[tuple[float, float, float, float]] = []
    if kind == "bars":
        series = min(series, 2)
        groups = int(rng.integers(3, 9))
        slot = span_x / groups
        bar_w = slot * rng.uniform(0.5, 0.8) / series
        for g in range(groups):
            for s in range(series):
                bx0 = round(left + g * slot + (slot - bar_w * series) / 2 + s * bar_w)
                bar_top = round(bottom - span_y * rng.uniform(0.15, 0.92))
                # PIL's rectangle includes its far corner, hence the - 1.
                box = (bx0, bar_top, max(bx0, round(bx0 + bar_w) - 1), bottom)
                draw.rectangle(box, fill=palette[s], outline=ink if rng.random() < 0.3 else None)
                marks.append(box)
    elif kind == "lines":
        points = int(rng.integers(5, 16))
        radius = rng.uniform(1.5, 3.5) * shortest / 256 if rng.random() < 0.6 else 0
        for s in range(series):
            walk = np.cumsum(rng.normal(0, 1, points))
            walk = (walk - walk.min()) / max(float(np.ptp(walk)), 1e-6)
            xs = left + span_x * (0.05 + 0.9 * np.arange(points) / (points - 1))
            ys = bottom - span_y * (0.08 + 0.84 * walk * rng.uniform(0.5, 1.0))
            line = list(zip(xs.tolist(), ys.tolist(), strict=True))
            draw.line(line, fill=palette[s], width=max(1, round(shortest / 150)))
            for px, py in line:
                if radius:
                    draw.ellipse(
                        (px - radius, py - radius, px + radius, py + radius), fill=palette[s]
                    )
                marks.append((px - radius, py - radius, px + radius, py + radius))
    else:
        radius = max(1.0, rng.uniform(1.2, 2.8) * shortest / 256)
        for s in range(series):
            n = int(rng.integers(15, 50))
            slope = rng.uniform(-1, 1)
            xs = rng.uniform(0.05, 0.95, n)
            ys = np.clip(0.5 + slope * (xs - 0.5) + rng.normal(0, 0.15, n), 0.04, 0.96)
            for px, py in zip(left + span_x * xs, bottom - span_y * ys, strict=True):
                draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=palette[s])
                marks.append((px - radius, py - radius, px + radius, py + radius))

    # Axes, drawn over the data as plotting libraries do.
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=ink, width=axis_width)
    axes_box = [left - axis_width, top, right + 1, bottom + axis_width + 1]
    x_ticks = int(rng.integers(4, 8))
    for k in range(x_ticks + 1):
        tx = left + round(span_x * k / x_ticks)
        draw.line([(tx, bottom), (tx, bottom + tick)], fill=ink, width=axis_width)
        text_box = draw.textbbox((tx, bottom + tick + 1), str(k * 10), font=font, anchor="mt")
        draw.text((tx, bottom + tick + 1), str(k * 10), fill=ink, font=font, anchor="mt")
        axes_box = _union_box(axes_box, text_box)
    y_ticks = int(rng.integers(3, 7))
    y_step = int(rng.choice((1, 2, 5, 10, 20, 50)))
    for k in range(y_ticks + 1):
        ty = bottom - round(span_y * k / y_ticks)
        draw.line([(left - tick, ty), (left, ty)], fill=ink, width=axis_width)
        text_box = draw.textbbox((left - tick - 2, ty), str(k * y_step), font=font, anchor="rm")
        draw.text((left - tick - 2, ty), str(k * y_step), fill=ink, font=font, anchor="rm")
        axes_box = _union_box(axes_box, text_box)

    regions = [_rect_region("axes", *_clip_box(axes_box, width, height))]
    marks_box = [
        min(m[0] for m in marks),
        min(m[1] for m in marks),
        max(m[2] for m in marks) + 1,
        max(m[3] for m in marks) + 1,
    ]
    regions.append(_rect_region("plot_area", *_clip_box(marks_box, width, height)))

    if rng.random() < 0.5:
        # Legend in the upper right of the plot, one swatch per series.
        entry_h = max(font.getbbox("Ag")[3], 6) + 2
        legend_w = round(font.getlength("Group A")) + entry_h + 8
        lx1, ly0 = right - 4, top + 4
        lx0, ly1 = lx1 - legend_w, ly0 + entry_h * series + 4
        draw.rectangle((lx0, ly0, lx1, ly1), fill=(paper, paper, paper), outline=ink)
        for s in range(series):
            ey = ly0 + 2 + s * entry_h
            draw.rectangle((lx0 + 3, ey + 2, lx0 + entry_h - 1, ey + entry_h - 2), fill=palette[s])
            draw.text((lx0 + entry_h + 2, ey), f"Group {'ABC'[s]}", fill=ink, font=font)
        regions.append(
            _rect_region("legend", *_clip_box([lx0, ly0, lx1 + 1, ly1 + 1], width, height))
        )

    pixels = np.asarray(image, np.float32) / 255.0
    background = (paper / 255.0,) * 3
    return _Scene(pixels, regions, background)


def _union_box(box: list[float], other: tuple[float, ...] | list[float]) -> list[float]:
    """Smallest box holding both [x0, y0, x1, y1] boxes."""
    return [
        min(box[0], other[0]),
        min(box[1], other[1]),
        max(box[2], other[2]),
        max(box[3], other[3]),
    ]


def _clip_box(box: list[float], width: int, height: int) -> list[int]:
    """Round a [x0, y0, x1, y1) box outward to ints and clip it to the image."""
    return [
        max(0, math.floor(box[0])),
        max(0, math.floor(box[1])),
        min(width, math.ceil(box[2])),
        min(height, math.ceil(box[3])),
    ]


@dataclass(frozen=True)
class _ClassSpec:
    """How one class is drawn: its renderer and the largest tilt it tolerates (degrees)."""

    render: Renderer
    max_rotation_deg: float


_CLASS_SPECS: dict[str, _ClassSpec] = {
    "abdominal_ct": _ClassSpec(_render_abdominal_ct, 12.0),
    "brain_mri": _ClassSpec(_render_brain_mri, 12.0),
    "ultrasound": _ClassSpec(_render_ultrasound, 6.0),
    "chest_xray": _ClassSpec(_render_chest_xray, 6.0),
    # Cells are placed and turned at random already; turning the frame adds nothing.
    "fluorescence_microscopy": _ClassSpec(_render_fluorescence_microscopy, 0.0),
    "retinal_funduscopy": _ClassSpec(_render_retinal_funduscopy, 15.0),
    "statistical_graph": _ClassSpec(_render_statistical_graph, 2.0),
}


# ---------------------------------------------------------------- class-blind steps


def _rotate_scene(scene: _Scene, angle_deg: float) -> tuple[FloatImage, list[dict]]:
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
        points = _rotate_points(region.points, angle_deg, cx, cy) if angle_deg else region.points
        box = _points_box(points, width, height)
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
        out = _gaussian_blur(out, rng.uniform(0.3, 1.0))
    noise_sigma = rng.uniform(0.0, 0.03)
    # Same noise on all channels: grey modalities stay grey.
    out = out + _grain(rng, out.shape[:2], noise_sigma)[:, :, None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _pick_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return DISTRACTOR_COLORS[rng.choice(len(DISTRACTOR_COLORS), p=DISTRACTOR_COLOR_WEIGHTS)]


def _outline_for(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black around light ink, white around dark ink, so text reads on any background."""
    return (0, 0, 0) if sum(color) > 300 else (255, 255, 255)


def _place(rng: np.random.Generator, w: int, h: int, width: int, height: int) -> tuple[int, int]:
    """Top-left corner for a w x h item: mostly in a corner, as figure annotations are."""
    margin = max(1, round(0.02 * min(width, height)))
    max_x, max_y = max(0, width - w - margin), max(0, height - h - margin)
    if rng.random() < 0.7:
        x = margin if rng.random() < 0.5 else max_x
        y = margin if rng.random() < 0.5 else max_y
        return int(min(x, max_x)), int(min(y, max_y))
    return int(rng.integers(0, max_x + 1)), int(rng.integers(0, max_y + 1))


def _caption(rng: np.random.Generator) -> str:
    if rng.random() < 0.7:
        return str(rng.choice(CAPTIONS))
    letters = "ABCDEFGHKLMNPRSTUVXYZ0123456789"
    return "".join(rng.choice(list(letters), int(rng.integers(1, 6))))


def _draw_text(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> dict:
    shortest = min(width, height)
    font = _font(round(shortest * rng.uniform(0.05, 0.09)))
    text = _caption(rng)
    color = _pick_color(rng)
    stroke = 1 if rng.random() < 0.5 else 0
    bx0, by0, bx1, by1 = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    x, y = _place(rng, bx1 - bx0, by1 - by0, width, height)
    x, y = x - bx0, y - by0
    draw.text(
        (x, y), text, fill=color, font=font, stroke_width=stroke, stroke_fill=_outline_for(color)
    )
    box = draw.textbbox((x, y), text, font=font, stroke_width=stroke)
    return {"label": "text", "box": _clip_box(list(box), width, height)}


def _draw_scale_bar(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> dict:
    shortest = min(width, height)
    length = round(width * rng.uniform(0.1, 0.25))
    thickness = max(2, round(shortest * rng.uniform(0.008, 0.018)))
    color = _pick_color(rng)
    caption = str(rng.choice(SCALE_BAR_CAPTIONS)) if rng.random() < 0.5 else ""
    font = _font(round(shortest * rng.uniform(0.04, 0.06)))
    label_h = 0
    if caption:
        cb = draw.textbbox((0, 0), caption, font=font)
        label_h = cb[3] - cb[1] + 2
        length = max(length, cb[2] - cb[0])
    x, y = _place(rng, length, thickness + label_h, width, height)
    draw.rectangle((x, y + label_h, x + length - 1, y + label_h + thickness - 1), fill=color)
    box = [x, y + label_h, x + length, y + label_h + thickness]
    if caption:
        text_box = draw.textbbox((x + length / 2, y + label_h - 2), caption, font=font, anchor="mb")
        draw.text((x + length / 2, y + label_h - 2), caption, fill=color, font=font, anchor="mb")
        box = _union_box(box, text_box)
    return {"label": "scale_bar", "box": _clip_box(box, width, height)}


def _draw_arrow(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> dict:
    shortest = min(width, height)
    length = shortest * rng.uniform(0.08, 0.16)
    line_width = max(1, round(shortest * rng.uniform(0.008, 0.015)))
    heading = rng.uniform(0, 2 * math.pi)
    tx = rng.uniform(0.1, 0.9) * width
    ty = rng.uniform(0.1, 0.9) * height
    sx, sy = tx - length * math.cos(heading), ty - length * math.sin(heading)
    head = length * 0.35
    wing = math.radians(25)
    left = (tx - head * math.cos(heading - wing), ty - head * math.sin(heading - wing))
    right = (tx - head * math.cos(heading + wing), ty - head * math.sin(heading + wing))
    color = _pick_color(rng)
    draw.line([(sx, sy), (tx, ty)], fill=color, width=line_width)
    draw.polygon([(tx, ty), left, right], fill=color)
    xs = (sx, tx, left[0], right[0])
    ys = (sy, ty, left[1], right[1])
    pad = line_width / 2
    box = [min(xs) - pad, min(ys) - pad, max(xs) + pad + 1, max(ys) + pad + 1]
    return {"label": "arrow", "box": _clip_box(box, width, height)}


def _draw_border(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> dict:
    thickness = int(rng.integers(2, max(3, round(0.035 * min(width, height))) + 1))
    color = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
    for k in range(thickness):
        draw.rectangle((k, k, width - 1 - k, height - 1 - k), outline=color)
    return {"label": "border", "box": [0, 0, width, height]}


def _draw_distractors(image: Image.Image, rng: np.random.Generator) -> list[dict]:
    """Draw class-blind annotations onto ``image`` in place; returns their boxes."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    found: list[dict] = []
    # The frame goes first so text and arrows may sit on it.
    if rng.random() < P_BORDER:
        found.append(_draw_border(draw, rng, width, height))
    if rng.random() < P_TEXT:
        for _ in range(rng.integers(1, 4)):
            found.append(_draw_text(draw, rng, width, height))
    if rng.random() < P_SCALE_BAR:
        found.append(_draw_scale_bar(draw, rng, width, height))
    if rng.random() < P_ARROW:
        for _ in range(rng.integers(1, 3)):
            found.append(_draw_arrow(draw, rng, width, height))
    return [d for d in found if d["box"][2] > d["box"][0] and d["box"][3] > d["box"][1]]


# ---------------------------------------------------------------- public API


def render_image(class_name: str, rng: np.random.Generator, size: int) -> SynthImage:
    """Render one image of ``class_name`` with its ground-truth boxes.

    size: nominal side in pixels; width and height are each ``size`` times a factor
    drawn from ``SIZE_JITTER``. All randomness comes from ``rng``, so the same
    generator state gives the same image.
    """
    spec = _CLASS_SPECS.get(class_name)
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
    distractors = _draw_distractors(image, rng)
    return SynthImage(image=image, class_name=class_name, boxes=boxes, distractors=distractors)


def image_seed(seed: int, class_index: int, image_index: int) -> np.random.Generator:
    """The generator for one archive image: independent of ``per_class`` and of order."""
    return np.random.default_rng([seed, class_index, image_index])


def ground_truth_record(synth: SynthImage, path: str) -> dict:
    """One ``ground_truth.jsonl`` line: path (relative, posix), class, size, boxes."""
    return {
        "path": path,
        "class": synth.class_name,
        "width": synth.image.width,
        "height": synth.image.height,
        "boxes": synth.boxes,
        "distractors": synth.distractors,
    }


def render_archive(
    out: Path,
    per_class: int,
    size: int = 256,
    seed: int = 0,
    *,
    progress: bool = False,
) -> SynthSummary:
    """Write ``per_class`` JPEGs per class to ``out/<class>/<class>_<index:05d>.jpg``.

    Also writes ``out/ground_truth.jsonl``, one ``ground_truth_record`` per image in
    class order, then index order. Images are written as they are rendered, never
    held together. The same arguments give byte-identical files.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
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
                synth = render_image(class_name, image_seed(seed, class_index, index), size)
                relative = f"{class_name}/{class_name}_{index:05d}.jpg"
                synth.image.save(out / relative, format="JPEG", quality=JPEG_QUALITY)
                lines.write(json.dumps(ground_truth_record(synth, relative)) + "\n")
                bar.update(1)
            counts[class_name] = per_class
    return SynthSummary(out=out, counts=counts, ground_truth=ground_truth)


def read_ground_truth(path: Path) -> list[dict]:
    """Parse a ``ground_truth.jsonl`` into its records, in file order."""
    with Path(path).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]
