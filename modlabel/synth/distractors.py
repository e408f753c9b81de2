"""Distractors: annotations drawn over every image whatever its class.

Figures carry text, scale bars, arrows and borders in every modality. They are
drawn with the same probabilities in every class, so none of them predicts a
class, and their boxes are recorded so that a relevance map drawn to them can
be caught (``modlabel.evaluation``'s distractor share).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .draw import builtin_font, clip_box, union_box

DISTRACTOR_LABELS: tuple[str, ...] = ("text", "scale_bar", "arrow", "border")

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
    font = builtin_font(round(shortest * rng.uniform(0.05, 0.09)))
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
    return {"label": "text", "box": clip_box(list(box), width, height)}


def _draw_scale_bar(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> dict:
    shortest = min(width, height)
    length = round(width * rng.uniform(0.1, 0.25))
    thickness = max(2, round(shortest * rng.uniform(0.008, 0.018)))
    color = _pick_color(rng)
    caption = str(rng.choice(SCALE_BAR_CAPTIONS)) if rng.random() < 0.5 else ""
    font = builtin_font(round(shortest * rng.uniform(0.04, 0.06)))
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
        box = union_box(box, text_box)
    return {"label": "scale_bar", "box": clip_box(box, width, height)}


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
    return {"label": "arrow", "box": clip_box(box, width, height)}


def _draw_border(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> dict:
    thickness = int(rng.integers(2, max(3, round(0.035 * min(width, height))) + 1))
    color = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
    for k in range(thickness):
        draw.rectangle((k, k, width - 1 - k, height - 1 - k), outline=color)
    return {"label": "border", "box": [0, 0, width, height]}


def draw_distractors(image: Image.Image, rng: np.random.Generator) -> list[dict]:
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
