"""Ultrasound: a speckled sector scan; the fan and its anechoic chambers are boxed."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..draw import (
    Scene,
    blend,
    ellipse,
    gaussian_blur,
    gray_to_rgb,
    grid,
    mask_region,
    smooth_noise,
)
from ..modality import Modality


def render_ultrasound(rng: np.random.Generator, width: int, height: int) -> Scene:
    """Sector ultrasound: a speckled fan with its apex at the top, anechoic chambers inside."""
    xx, yy = grid(width, height)
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
    speckle = gaussian_blur(speckle, 0.5)
    echo = np.clip(0.45 + 0.18 * smooth_noise(rng, width, height, 6), 0.1, 1.0)
    # Bright tissue interfaces: a few arcs across the fan.
    for _ in range(rng.integers(1, 4)):
        r0 = depth * rng.uniform(0.2, 0.95)
        echo = echo + 0.35 * np.clip(1.0 - np.abs(radius - r0) / (depth * 0.02), 0, 1)
    attenuation = np.exp(-rng.uniform(0.3, 1.0) * radius / depth)
    img = 0.55 * speckle * echo * attenuation * sector

    regions = [mask_region("sector", sector)]
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
        chamber = ellipse(xx, yy, ccx, ccy, crx, cry, tilt, edge) * sector
        wall = ellipse(xx, yy, ccx, ccy, crx * 1.15, cry * 1.15, tilt, edge) * sector
        img = img + 0.25 * (wall - chamber) * speckle
        img = blend(img, 0.02 * speckle, chamber)
        regions.append(mask_region("chamber", chamber))

    # Depth markers: small dots down the right edge of the fan.
    for k in range(1, 6):
        r = depth * k / 6
        mx = ax + r * math.sin(half_angle) + 0.02 * width
        my = ay + r * math.cos(half_angle)
        img = np.maximum(img, 0.7 * ellipse(xx, yy, mx, my, 1.2, 1.2))

    return Scene(gray_to_rgb(img), regions, (0.0, 0.0, 0.0))


MODALITY = Modality(
    label=2,
    name="ultrasound",
    structures=frozenset({"sector", "chamber"}),
    render=render_ultrasound,
    max_rotation_deg=6.0,
)
