"""Fluorescence microscopy: glowing cells with nuclei on black; every cell is boxed."""

from __future__ import annotations

import math

import numpy as np

from ..draw import Region, Scene, ellipse, gaussian_blur, grain, grid, mask_region, smooth_noise
from ..modality import Modality


def render_fluorescence_microscopy(rng: np.random.Generator, width: int, height: int) -> Scene:
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
    regions: list[Region] = []
    for _ in range(count):
        r0 = base_radius * rng.uniform(0.7, 1.3)
        elong = rng.uniform(1.0, 1.8)
        reach = r0 * elong * 1.6
        ccx = rng.uniform(0.08, 0.92) * width
        ccy = rng.uniform(0.08, 0.92) * height
        # Work in the cell's own window: cheap and exact for its box.
        x0, x1 = max(0, int(ccx - reach)), min(width, int(ccx + reach) + 1)
        y0, y1 = max(0, int(ccy - reach)), min(height, int(ccy + reach) + 1)
        xx, yy = grid(x1 - x0, y1 - y0)
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
            smooth_noise(rng, x1 - x0, y1 - y0, max(2.0, (x1 - x0) / 6)), -1, 1
        )
        brightness = rng.uniform(0.45, 1.0)
        img[y0:y1, x0:x1] += (brightness * body * texture)[:, :, None] * stain
        nx = ccx + r0 * rng.uniform(-0.2, 0.2)
        ny = ccy + r0 * rng.uniform(-0.2, 0.2)
        nucleus = ellipse(
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
        regions.append(mask_region("cell", mask))

    glow = gaussian_blur(img, rng.uniform(0.6, 1.5) + 0.003 * width)
    img = glow + 0.35 * gaussian_blur(img, 0.02 * shortest) + rng.uniform(0.0, 0.04)
    img = img + grain(rng, img.shape, 0.012)
    return Scene(np.clip(img, 0, 1).astype(np.float32), regions, (0.0, 0.0, 0.0))


MODALITY = Modality(
    label=4,
    name="fluorescence_microscopy",
    structures=frozenset({"cell"}),
    render=render_fluorescence_microscopy,
    # Cells are placed and turned at random already; turning the frame adds nothing.
    max_rotation_deg=0.0,
)
