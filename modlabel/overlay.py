"""Overlays: relevance maps as colored heatmaps, blended on images, with ROI boxes.

Maps are shown the paper's way (Figure 4): normalized by their max to [0, 255],
negatives clipped, and only values above 20% of the max are drawn. matplotlib
supplies the colormaps only; nothing here touches pyplot or its global backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

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
