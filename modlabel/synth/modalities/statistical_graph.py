"""Statistical graph: a chart; its axes and plot area (and any legend) are boxed."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..draw import Scene, builtin_font, clip_box, rect_region, union_box
from ..modality import Modality

PLOT_COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (60, 60, 60),
    (150, 150, 150),
)


def render_statistical_graph(rng: np.random.Generator, width: int, height: int) -> Scene:
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
    font = builtin_font(max(7, round(shortest * rng.uniform(0.035, 0.05))))
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
        axes_box = union_box(axes_box, text_box)
    y_ticks = int(rng.integers(3, 7))
    y_step = int(rng.choice((1, 2, 5, 10, 20, 50)))
    for k in range(y_ticks + 1):
        ty = bottom - round(span_y * k / y_ticks)
        draw.line([(left - tick, ty), (left, ty)], fill=ink, width=axis_width)
        text_box = draw.textbbox((left - tick - 2, ty), str(k * y_step), font=font, anchor="rm")
        draw.text((left - tick - 2, ty), str(k * y_step), fill=ink, font=font, anchor="rm")
        axes_box = union_box(axes_box, text_box)

    regions = [rect_region("axes", *clip_box(axes_box, width, height))]
    marks_box = [
        min(m[0] for m in marks),
        min(m[1] for m in marks),
        max(m[2] for m in marks) + 1,
        max(m[3] for m in marks) + 1,
    ]
    regions.append(rect_region("plot_area", *clip_box(marks_box, width, height)))

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
            rect_region("legend", *clip_box([lx0, ly0, lx1 + 1, ly1 + 1], width, height))
        )

    pixels = np.asarray(image, np.float32) / 255.0
    background = (paper / 255.0,) * 3
    return Scene(pixels, regions, background)


MODALITY = Modality(
    label=6,
    name="statistical_graph",
    structures=frozenset({"axes", "plot_area"}),
    render=render_statistical_graph,
    max_rotation_deg=2.0,
)
