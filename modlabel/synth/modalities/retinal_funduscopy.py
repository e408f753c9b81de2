"""Retinal funduscopy: a colour fundus photo; the fundus, optic disc and macula are boxed."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ..draw import (
    FloatImage,
    Scene,
    blend,
    ellipse,
    gaussian_blur,
    grain,
    grid,
    mask_region,
    smooth_noise,
)
from ..modality import Modality


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
    return gaussian_blur(np.asarray(canvas, np.float32) / 255.0, 0.5)


def render_retinal_funduscopy(rng: np.random.Generator, width: int, height: int) -> Scene:
    """Colour fundus photo: orange-red disc, yellow optic disc left or right, vessels, macula."""
    xx, yy = grid(width, height)
    shortest = min(width, height)
    fcx = width * (0.5 + rng.uniform(-0.03, 0.03))
    fcy = height * (0.5 + rng.uniform(-0.03, 0.03))
    # Sometimes the camera's field of view is cut at the top and bottom.
    fr = shortest * (rng.uniform(0.40, 0.48) if rng.random() < 0.7 else rng.uniform(0.5, 0.56))
    fr = min(fr, width * 0.48)
    fundus = ellipse(xx, yy, fcx, fcy, fr, fr, edge_px=max(1.0, 0.006 * shortest))

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
    texture = 1.0 + 0.05 * smooth_noise(rng, width, height, 24)
    base = np.array(
        [rng.uniform(0.78, 0.95), rng.uniform(0.28, 0.42), rng.uniform(0.06, 0.14)], np.float32
    )
    img = (vignette * texture)[:, :, None] * base

    macula_soft = np.exp(-(((xx - mcx) ** 2 + (yy - mcy) ** 2) / (2 * (macula_r * 0.8) ** 2)))
    img = img * (1.0 - 0.45 * macula_soft)[:, :, None]

    disc = ellipse(
        xx, yy, dcx, dcy, disc_r, disc_r * rng.uniform(1.0, 1.15), 0, max(1.5, disc_r * 0.25)
    )
    cup = ellipse(xx, yy, dcx, dcy, disc_r * 0.45, disc_r * 0.5, 0, max(1.0, disc_r * 0.2))
    disc_color = np.array((1.0, rng.uniform(0.8, 0.92), rng.uniform(0.45, 0.65)), np.float32)
    img = blend(img, disc_color, disc[:, :, None])
    img = blend(img, np.array((1.0, 0.97, 0.85), np.float32), cup[:, :, None])

    vessels = _vessel_tree(rng, width, height, (dcx, dcy, disc_r), (fcx, fcy, fr), -side)
    vessel_color = np.array((0.5, 0.08, 0.05), np.float32) * rng.uniform(0.8, 1.1)
    img = blend(img, vessel_color, (0.85 * vessels)[:, :, None])

    img = img * fundus[:, :, None]
    img = gaussian_blur(img, 0.3 + 0.002 * width) + grain(rng, (height, width, 1), 0.01)
    macula = ellipse(xx, yy, mcx, mcy, macula_r, macula_r)
    regions = [
        mask_region("fundus", fundus),
        mask_region("optic_disc", disc),
        mask_region("macula", macula),
    ]
    return Scene(np.clip(img, 0, 1).astype(np.float32), regions, (0.0, 0.0, 0.0))


MODALITY = Modality(
    label=5,
    name="retinal_funduscopy",
    structures=frozenset({"fundus", "optic_disc", "macula"}),
    render=render_retinal_funduscopy,
    max_rotation_deg=15.0,
)
