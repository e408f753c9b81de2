"""Chest X-ray: a PA radiograph; both lungs and the heart shadow are boxed."""

from __future__ import annotations

import numpy as np

from ..draw import (
    Scene,
    blend,
    ellipse,
    gaussian_blur,
    grain,
    gray_to_rgb,
    grid,
    mask_region,
    smooth_noise,
)
from ..modality import Modality


def render_chest_xray(rng: np.random.Generator, width: int, height: int) -> Scene:
    """PA chest radiograph: bright thorax, two dark lungs with ribs, heart shadow to the right."""
    xx, yy = grid(width, height)
    cx = width * (0.5 + rng.uniform(-0.04, 0.04))
    cy = height * (0.5 + rng.uniform(-0.04, 0.04))
    scale = rng.uniform(0.85, 1.05)
    edge = max(1.5, 0.01 * width)
    soft_tissue = rng.uniform(0.55, 0.68)

    # Trunk: a boxy superellipse, shoulders near the top corners.
    tu = np.abs(xx - cx) / (0.56 * width * scale)
    tv = np.abs(yy - (cy + 0.3 * height)) / (0.85 * height)
    trunk = np.clip((1.0 - (tu**4 + tv**4)) * 8.0, 0.0, 1.0)
    img = blend(np.full((height, width), rng.uniform(0.04, 0.14), np.float32), soft_tissue, trunk)

    lung_rx = width * scale * rng.uniform(0.15, 0.18)
    lung_ry = height * scale * rng.uniform(0.29, 0.34)
    lung_y = cy - 0.06 * height
    heart_x = cx + width * scale * rng.uniform(0.06, 0.09)
    heart_y = lung_y + lung_ry * rng.uniform(0.5, 0.6)
    heart = ellipse(
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
        lung = ellipse(xx, yy, lx, lung_y, lung_rx, lung_ry, -side * 6, edge)
        dome = ellipse(xx, yy, lx, lung_y + lung_ry * 0.95, lung_rx * 1.4, lung_ry * 0.32, 0, edge)
        lungs[label] = np.clip(lung - dome, 0, 1)
        # Vessels fan out from the hilum: denser medially.
        hx, hy = lx - side * lung_rx * 0.6, lung_y + lung_ry * 0.05
        hilum_glow += np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.7 * lung_rx) ** 2))
    lungs["left_lung"] = np.clip(lungs["left_lung"] - heart, 0, 1)
    lung_field = np.maximum(lungs["right_lung"], lungs["left_lung"])
    air = rng.uniform(0.12, 0.2) + 0.12 * hilum_glow + 0.025 * smooth_noise(rng, width, height, 40)
    img = blend(img, air, lung_field)

    mediastinum = np.clip(1.3 - np.abs(xx - cx) / (0.055 * width * scale), 0, 1) * (yy < heart_y)
    img = np.maximum(img, (soft_tissue + 0.04) * mediastinum * trunk)
    img = blend(img, soft_tissue + 0.02, heart)

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

    img = gaussian_blur(img, 0.8 + 0.004 * width) + grain(rng, img.shape, 0.01)
    regions = [
        mask_region("right_lung", lungs["right_lung"]),
        mask_region("left_lung", lungs["left_lung"]),
        mask_region("heart", heart),
    ]
    return Scene(gray_to_rgb(img), regions, (0.0, 0.0, 0.0))


MODALITY = Modality(
    label=3,
    name="chest_xray",
    structures=frozenset({"right_lung", "left_lung", "heart"}),
    render=render_chest_xray,
    max_rotation_deg=6.0,
)
