"""Brain MRI: an axial T1 or T2 slice; the brain and its ventricles are boxed."""

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


def render_brain_mri(rng: np.random.Generator, width: int, height: int) -> Scene:
    """Axial brain MRI: scalp and skull rings, folded cortex, butterfly ventricles (T1 or T2)."""
    xx, yy = grid(width, height)
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
    head = ellipse(xx, yy, cx, cy, head_rx, head_ry, edge_px=edge)
    ring = max(2.0, head_ry * 0.05)
    skull = ellipse(xx, yy, cx, cy, head_rx - ring, head_ry - ring, edge_px=edge)
    diploic = ellipse(xx, yy, cx, cy, head_rx - ring * 1.5, head_ry - ring * 1.5, edge_px=edge)
    inner = ellipse(xx, yy, cx, cy, head_rx - ring * 2.1, head_ry - ring * 2.1, edge_px=edge)
    brx, bry = head_rx - ring * 2.5, head_ry - ring * 2.5
    brain = ellipse(xx, yy, cx, cy, brx, bry, edge_px=edge)

    img = np.full((height, width), rng.uniform(0.0, 0.03), dtype=np.float32)
    img = blend(img, scalp, head)
    img = blend(img, 0.06, skull)  # cortical bone is dark on MRI
    img = blend(img, diploe, np.clip(diploic - inner, 0, 1))
    img = blend(img, csf, inner)

    # Cortex: grey matter near the rim, folded by the contour lines of a smooth field.
    rho = np.sqrt(((xx - cx) / brx) ** 2 + ((yy - cy) / bry) ** 2)
    cortex = np.clip((rho - 0.45) / 0.35, 0.0, 1.0)
    folds = smooth_noise(rng, width, height, 10)
    sulci = np.clip(1.0 - np.abs(np.sin(np.pi * rng.uniform(2.2, 3.0) * folds)) / 0.22, 0, 1)
    grey = np.clip(
        cortex * 0.7 + cortex * np.clip(1.0 - np.abs(np.sin(np.pi * 2.6 * folds)), 0, 1), 0, 1
    )
    tissue = blend(np.float32(wm), gm, grey)
    tissue = blend(tissue, csf, sulci * cortex * 0.85)
    tissue = tissue + 0.02 * smooth_noise(rng, width, height, 30)
    img = blend(img, tissue, brain)

    # Midline fissure from front to back.
    fissure = np.clip(1.0 - np.abs(xx - cx) / max(1.0, 0.008 * width), 0, 1) * (rho > 0.5)
    img = blend(img, csf, fissure * brain)

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
    third = ellipse(xx, yy, cx, cy + bry * 0.06, brx * 0.012 + 0.5, bry * 0.08 * size)
    ventricles = np.maximum(ventricles, third)
    img = blend(img, csf, ventricles)

    img = gaussian_blur(img, 0.4 + 0.002 * width) + grain(rng, img.shape, 0.012)
    regions = [mask_region("brain", brain), mask_region("ventricles", ventricles)]
    return Scene(gray_to_rgb(img), regions, (0.0, 0.0, 0.0))


MODALITY = Modality(
    label=1,
    name="brain_mri",
    structures=frozenset({"brain", "ventricles"}),
    render=render_brain_mri,
    max_rotation_deg=12.0,
)
