"""Overlays: relevance maps as colored heatmaps, blended on images, with ROI boxes.

Maps are shown the paper's way (Figure 4): normalized by their max to [0, 255],
negatives clipped, and only values above 20% of the max are drawn. A picture for
people gets its colour bar (``with_colorbar``: the colormap from 0 to 1 of the
map's max, labeled "relevance"), so that a colour can be read as a value.
matplotlib supplies the colormaps only; nothing here touches pyplot or its
global backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import geometry, rois

DEFAULT_CMAP = "jet"
Color = tuple[int, int, int]


@lru_cache(maxsize=16)
def _lookup_table(cmap: str) -> np.ndarray:
    """(256, 3) uint8 RGB of a matplotlib colormap."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}") from None
    rgba = colormap(np.linspace(0.0, 1.0, 256))
    return np.rint(rgba[:, :3] * 255).astype(np.uint8)


def heatmap_rgb(map2d: np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """A map (H, W) as a colored heatmap (H, W, 3) uint8, scaled by ``geometry.normalize_255``."""
    arr = np.asarray(map2d)
    if arr.ndim != 2:
        raise ValueError(f"expected one map (H, W), got shape {arr.shape}")
    codes = np.rint(geometry.normalize_255(arr)).astype(np.uint8)
    return _lookup_table(cmap)[codes]


def overlay(
    image_rgb: np.ndarray,
    map2d: np.ndarray,
    *,
    alpha: float = 0.5,
    threshold: float | None = geometry.DISPLAY_FRACTION,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """Blend a map's heatmap on an image: (H0, W0, 3) uint8 and (h, w) -> (H0, W0, 3) uint8.

    The map is stretched (bilinear) to the image's size, the decoder's geometry,
    so it lines up with the image at any size or aspect ratio. Only values above
    ``threshold`` of the max are colored (the paper's 20%); None colors all.
    """
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    up = geometry.upsample(map2d, image.shape[:2])
    heat = heatmap_rgb(up, cmap).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    if threshold is not None:
        shown = geometry.roi_mask(up, threshold)[..., None]
        blended = np.where(shown, blended, image.astype(np.float32))
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def draw_boxes(
    image_rgb: np.ndarray,
    boxes: Iterable[geometry.Box],
    *,
    color: Color = (255, 255, 255),
    width: int = 2,
) -> np.ndarray:
    """A copy of an image (H, W, 3) uint8 with boxes (x0, y0, x1, y1), x1/y1
    exclusive, in its own pixels, outlined."""
    img = Image.fromarray(np.asarray(image_rgb, dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=width)
    return np.asarray(img)


def class_overlay(
    average: np.ndarray,
    size_hw: Sequence[int] = (300, 300),
    *,
    roi: rois.ClassRoi | None = None,
    boxes: bool = True,
    background: np.ndarray | None = None,
    fraction: float = geometry.CLASS_ROI_FRACTION,
    components: bool = True,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """A class-level map (Eq. 8) as Figure 9 draws it: the heatmap at ``size_hw``
    with the box around the area above ``fraction`` of the max (white) and, where
    several regions pass, one box per region (black).

    The boxes are those of the map as it is drawn, never of the coarse grid: the
    ROI of ``roi`` (``rois.class_roi``, computed at the model's input size) taken
    to ``size_hw``, or, without ``roi``, the ROI of the average upsampled to
    ``size_hw``. ``boxes=False`` draws the heatmap alone.

    background: an optional (H, W, 3) uint8 image (say the class's mean image),
    stretched to ``size_hw``, to blend the heatmap on. Returns (H, W, 3) uint8.
    """
    avg = np.asarray(average, dtype=np.float32)
    height, width = int(size_hw[0]), int(size_hw[1])
    if background is None:
        picture = heatmap_rgb(geometry.upsample(avg, (height, width)), cmap)
    else:
        bg = Image.fromarray(np.asarray(background, dtype=np.uint8))
        bg = np.asarray(bg.resize((width, height), Image.Resampling.BILINEAR))
        picture = overlay(bg, avg, alpha=alpha, threshold=None, cmap=cmap)
    if not boxes:
        return picture
    if roi is None:
        roi = rois.class_roi(
            "", avg, (height, width), image_count=0, min_confidence=0.0, fraction=fraction
        )
    # Thin lines on small pictures: 1 px up to 149 px, 3 px from 250 px.
    line = max(1, min(3, round(min(height, width) / 100)))
    if components and len(roi.regions) > 1:
        picture = draw_boxes(
            picture,
            [geometry.scale_box(b, roi.input_hw, (height, width)) for b in roi.regions],
            color=(0, 0, 0),
            width=max(1, line - 1),
        )
    if roi.box is not None:
        picture = draw_boxes(
            picture, [geometry.scale_box(roi.box, roi.input_hw, (height, width))], width=line
        )
    return picture


COLORBAR_LABEL = "relevance"
COLORBAR_MIN_WIDTH = 120  # px: room for "0", the label and "1" under a narrow picture
_BAR_HEIGHT = 10
_FONT_PX = 11


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: its bitmap font, one size
        return ImageFont.load_default()


def colorbar(
    width: int,
    *,
    cmap: str = DEFAULT_CMAP,
    threshold: float | None = None,
    label: str = COLORBAR_LABEL,
) -> np.ndarray:
    """A horizontal colour bar (h, width, 3) uint8 on white: the colormap from 0 (left) to
    1 (right) of a map's max, "0" and "1" under its ends and ``label`` between them.

    threshold: the share of the max below which an overlay leaves the image uncoloured
    (``overlay``'s ``threshold``); that part of the bar is drawn faded, as it is not seen.
    """
    pad = 6
    font = _font(_FONT_PX)
    text_h = _FONT_PX + 3
    height = 4 + _BAR_HEIGHT + 2 + text_h + 2
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    bar_w = max(width - 2 * pad, 2)
    codes = np.linspace(0, 255, bar_w).round().astype(np.uint8)
    row = _lookup_table(cmap)[codes].astype(np.float32)
    if threshold is not None:
        faded = np.arange(bar_w) < threshold * (bar_w - 1)
        row[faded] = 0.3 * row[faded] + 0.7 * 255
    bar = np.repeat(row[None].round().astype(np.uint8), _BAR_HEIGHT, axis=0)
    canvas.paste(Image.fromarray(bar), (pad, 4))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([pad - 1, 3, pad + bar_w, 4 + _BAR_HEIGHT], outline=(120, 120, 120))
    top = 4 + _BAR_HEIGHT + 2
    ink = (51, 51, 51)
    draw.text((pad, top), "0", fill=ink, font=font)
    right = draw.textlength("1", font=font)
    draw.text((pad + bar_w - right, top), "1", fill=ink, font=font)
    middle = draw.textlength(label, font=font)
    draw.text(((width - middle) / 2, top), label, fill=ink, font=font)
    return np.asarray(canvas)


def with_colorbar(
    picture: np.ndarray, *, cmap: str = DEFAULT_CMAP, threshold: float | None = None
) -> np.ndarray:
    """A heatmap or overlay (H, W, 3) uint8 with its ``colorbar`` below it: (H + h, W', 3)
    uint8, W' = max(W, COLORBAR_MIN_WIDTH), a narrow picture centred on white."""
    image = np.asarray(picture, dtype=np.uint8)
    height, width = image.shape[:2]
    full = max(width, COLORBAR_MIN_WIDTH)
    bar = colorbar(full, cmap=cmap, threshold=threshold)
    out = np.full((height + bar.shape[0], full, 3), 255, np.uint8)
    left = (full - width) // 2
    out[:height, left : left + width] = image
    out[height:] = bar
    return out


@lru_cache(maxsize=1)
def colorbar_height() -> int:
    """Rows ``with_colorbar`` adds below a picture."""
    return colorbar(COLORBAR_MIN_WIDTH).shape[0]
