"""Drawing primitives the modality renderers share: soft shapes, noise, blur, boxes.

A renderer draws a ``Scene``: float pixels and a labeled ``Region`` per
structure, kept as the pixel centres it covers so that its box can follow a
rotation (``rotate_points``) and be measured afterwards (``points_box``).

Coordinates are pixels: x to the right, y down; a box is ``[x0, y0, x1, y1]``
with ``x1`` and ``y1`` exclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFont

FloatImage = np.ndarray
"""(H, W) or (H, W, 3) float32 intensities in [0, 1]."""


@dataclass(frozen=True)
class Region:
    """A labeled structure as the pixel centres it covers: points (N, 2) float x, y."""

    label: str
    points: np.ndarray


@dataclass(frozen=True)
class Scene:
    """A class renderer's output before the class-blind steps.

    pixels: (H, W, 3) float32 in [0, 1]. background: RGB in [0, 1] that fills the
    corners uncovered by rotation.
    """

    pixels: FloatImage
    regions: list[Region]
    background: tuple[float, float, float]


# ---------------------------------------------------------------- geometry


def grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, broadcastable: xx (1, W), yy (H, 1) float32."""
    xx = np.arange(width, dtype=np.float32)[None, :] + 0.5
    yy = np.arange(height, dtype=np.float32)[:, None] + 0.5
    return xx, yy


def ellipse(
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


def mask_region(label: str, mask: np.ndarray) -> Region:
    """Region from a soft or boolean (H, W) mask, covering pixels above one half."""
    rows, cols = np.nonzero(mask > 0.5)
    points = np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64)
    return Region(label, points)


def rect_region(label: str, x0: float, y0: float, x1: float, y1: float) -> Region:
    """Region of the pixels in the rectangle [x0, x1) x [y0, y1)."""
    xs = (x0 + 0.5, x1 - 0.5)
    ys = (y0 + 0.5, y1 - 0.5)
    points = np.array([(x, y) for x in xs for y in ys], dtype=np.float64)
    return Region(label, points)


def rotate_points(points: np.ndarray, angle_deg: float, cx: float, cy: float) -> np.ndarray:
    """Rotate (N, 2) x, y points as ``PIL.Image.rotate(angle_deg, center=(cx, cy))`` does.

    Positive angles turn counter-clockwise on screen.
    """
    t = math.radians(angle_deg)
    dx, dy = points[:, 0] - cx, points[:, 1] - cy
    x = cx + math.cos(t) * dx + math.sin(t) * dy
    y = cy - math.sin(t) * dx + math.cos(t) * dy
    return np.stack([x, y], axis=1)


def points_box(points: np.ndarray, width: int, height: int) -> list[int] | None:
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


# ---------------------------------------------------------------- boxes


def union_box(box: list[float], other: tuple[float, ...] | list[float]) -> list[float]:
    """Smallest box holding both [x0, y0, x1, y1] boxes."""
    return [
        min(box[0], other[0]),
        min(box[1], other[1]),
        max(box[2], other[2]),
        max(box[3], other[3]),
    ]


def clip_box(box: list[float], width: int, height: int) -> list[int]:
    """Round a [x0, y0, x1, y1) box outward to ints and clip it to the image."""
    return [
        max(0, math.floor(box[0])),
        max(0, math.floor(box[1])),
        min(width, math.ceil(box[2])),
        min(height, math.ceil(box[3])),
    ]


# ---------------------------------------------------------------- raster helpers


def smooth_noise(rng: np.random.Generator, width: int, height: int, cells: float) -> FloatImage:
    """Band-limited noise (H, W) float32, about unit variance, ``cells`` blobs across."""
    longest = max(width, height)
    gw = max(2, round(cells * width / longest)) + 2
    gh = max(2, round(cells * height / longest)) + 2
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = np.asarray(smooth, dtype=np.float32)
    return noise / max(float(noise.std()), 1e-6)


def gaussian_blur(pixels: FloatImage, sigma_px: float) -> FloatImage:
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


def grain(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise of ``shape``, float32, standard deviation ``sigma``."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def gray_to_rgb(gray: FloatImage) -> FloatImage:
    """(H, W) -> (H, W, 3) float32, clipped to [0, 1]."""
    return np.repeat(np.clip(gray, 0.0, 1.0)[:, :, None], 3, axis=2).astype(np.float32)


def blend(base: FloatImage, value: float | FloatImage, weight: FloatImage) -> FloatImage:
    """base * (1 - weight) + value * weight: paint ``value`` through a soft mask."""
    return base * (1.0 - weight) + value * weight


@lru_cache(maxsize=64)
def builtin_font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size_px`` (the bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=max(6, size_px))
    except (ImportError, OSError):
        return ImageFont.load_default()
