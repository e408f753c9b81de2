"""Abdominal CT: an axial slice; the body, spine, liver and both kidneys are boxed."""

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


def render_abdominal_ct(rng: np.random.Generator, width: int, height: int) -> Scene:
    """Axial abdominal CT: elliptical body on black, bright spine posterior, liver, kidneys."""
    xx, yy = grid(width, height)
    cx = width * (0.5 + rng.uniform(-0.05, 0.05))
    cy = height * (0.5 + rng.uniform(-0.05, 0.05))
    rx = width * rng.uniform(0.36, 0.46)
    ry = min(rx * rng.uniform(0.62, 0.80), height * 0.42)
    edge = max(1.0, 0.004 * width)

    body = ellipse(xx, yy, cx, cy, rx, ry, edge_px=edge)
    wall = ellipse(xx, yy, cx, cy, rx * 0.91, ry * 0.88, edge_px=edge)
    cavity = ellipse(xx, yy, cx, cy, rx * 0.84, ry * 0.79, edge_px=edge)
    mottle = smooth_noise(rng, width, height, 24)

    img = np.full((height, width), rng.uniform(0.0, 0.03), dtype=np.float32)
    if rng.random() < 0.6:
        # The scanner table: a bright curved band under the patient.
        table = ellipse(xx, yy, cx, cy + ry * 1.9, rx * 1.5, ry * 0.85, edge_px=edge)
        table_inner = ellipse(xx, yy, cx, cy + ry * 1.9, rx * 1.47, ry * 0.8, edge_px=edge)
        img = blend(img, 0.45, np.clip(table - table_inner, 0, 1))
    img = blend(img, 0.27, body)  # subcutaneous fat
    img = blend(img, 0.48, wall)  # abdominal wall muscle
    img = blend(img, 0.40 + 0.03 * mottle, cavity)  # bowel and mesentery

    # Bowel gas: black pockets in the anterior half.
    for _ in range(rng.integers(2, 7)):
        gx = cx + rx * rng.uniform(-0.35, 0.55)
        gy = cy - ry * rng.uniform(0.05, 0.6)
        gr = rx * rng.uniform(0.03, 0.08)
        img = blend(img, 0.02, ellipse(xx, yy, gx, gy, gr, gr * rng.uniform(0.7, 1.2)) * cavity)

    liver = ellipse(
        xx,
        yy,
        cx - rx * rng.uniform(0.38, 0.46),
        cy - ry * rng.uniform(0.05, 0.2),
        rx * rng.uniform(0.34, 0.42),
        ry * rng.uniform(0.48, 0.58),
        rng.uniform(-20, 20),
        edge,
    ) * (cavity > 0.5)
    img = blend(img, 0.60 + 0.03 * mottle, liver)
    spleen = ellipse(xx, yy, cx + rx * 0.62, cy - ry * 0.05, rx * 0.14, ry * 0.3, 25, edge) * (
        cavity > 0.5
    )
    img = blend(img, 0.56, spleen)

    # Spine: vertebral body, canal, spinous and transverse processes.
    rv = rx * rng.uniform(0.08, 0.10)
    vy = cy + ry * rng.uniform(0.38, 0.44)
    vertebra = ellipse(xx, yy, cx, vy, rv, rv * 0.9, edge_px=edge)
    marrow = ellipse(xx, yy, cx, vy, rv * 0.75, rv * 0.68, edge_px=edge)
    arch = ellipse(xx, yy, cx, vy + rv * 1.35, rv * 0.62, rv * 0.55, edge_px=edge)
    canal = ellipse(xx, yy, cx, vy + rv * 1.3, rv * 0.38, rv * 0.32, edge_px=edge)
    spinous = ellipse(xx, yy, cx, vy + rv * 2.1, rv * 0.22, rv * 0.6, edge_px=edge)
    transverse = np.maximum(
        ellipse(xx, yy, cx - rv * 1.2, vy + rv * 0.9, rv * 0.65, rv * 0.22, 20, edge),
        ellipse(xx, yy, cx + rv * 1.2, vy + rv * 0.9, rv * 0.65, rv * 0.22, -20, edge),
    )
    for side in (-1, 1):
        paraspinal = ellipse(xx, yy, cx + side * rv * 1.9, vy + rv * 1.7, rv * 1.1, rv * 0.9)
        img = blend(img, 0.50, paraspinal * (body > 0.5))
    bone = np.maximum.reduce([vertebra, arch, spinous, transverse])
    img = blend(img, 0.95, bone)
    img = blend(img, 0.72, marrow)
    img = blend(img, 0.35, canal)

    # Aorta (patient's left, image right) and IVC in front of the spine.
    img = blend(img, 0.75, ellipse(xx, yy, cx + rv * 0.7, vy - rv * 1.6, rv * 0.45, rv * 0.45))
    img = blend(img, 0.62, ellipse(xx, yy, cx - rv * 1.3, vy - rv * 1.5, rv * 0.5, rv * 0.38))

    regions = [mask_region("body", body), mask_region("spine", bone)]
    regions.append(mask_region("liver", liver))
    kidney_y = cy + ry * rng.uniform(0.15, 0.28)
    for side, label in ((-1, "right_kidney"), (1, "left_kidney")):
        kx = cx + side * rx * rng.uniform(0.33, 0.40)
        krx, kry = rx * rng.uniform(0.10, 0.13), ry * rng.uniform(0.17, 0.22)
        angle = side * rng.uniform(-35, -15)
        kidney = ellipse(xx, yy, kx, kidney_y, krx, kry, angle, edge)
        hilum = ellipse(xx, yy, kx - side * krx * 0.45, kidney_y, krx * 0.45, kry * 0.35, angle)
        img = blend(img, 0.74, kidney)
        img = blend(img, 0.45, hilum * kidney)
        regions.append(mask_region(label, kidney))

    img = gaussian_blur(img, 0.4 + 0.002 * width) + grain(rng, img.shape, 0.015)
    return Scene(gray_to_rgb(img), regions, (0.0, 0.0, 0.0))


MODALITY = Modality(
    label=0,
    name="abdominal_ct",
    structures=frozenset({"body", "spine", "liver", "right_kidney", "left_kidney"}),
    render=render_abdominal_ct,
    max_rotation_deg=12.0,
)
