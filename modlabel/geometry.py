"""Geometry: maps in the model's input, the original image and the page; ROIs and boxes.

modlabel's decoder stretches the whole image to the model's input size, so a
map's cell (i, j) covers the same fraction of the input and of the original
image: ``upsample`` takes a map to either. The paper's display normalization and
20% ROI threshold (Figure 4, Table 3), and the class-level 70% ROI box
(Figure 9), with its regions when several pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive

# The paper's thresholds: heatmaps show values above 20% of the max (Figure 4,
# Table 3); the class-level ROI is the area above 70% of the max (Figure 9).
DISPLAY_FRACTION = 0.2
CLASS_ROI_FRACTION = 0.7


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centers.

    Output sample i sits at input coordinate (i + 0.5) * n_in / n_out - 0.5, the
    convention of PIL, OpenCV and tf.image.resize; the ends are clamped.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def upsample(maps: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a map (H, W) or a batch (N, H, W) to ``size_hw`` = (height, width).

    modlabel's decoder stretches the whole image to the input size (see
    ``decode.resize_rgb``), so map cell (i, j) covers the same fraction of the
    input and of the original image: ``upsample(m, model.info.input_size)`` lines
    up with the model's input and ``upsample(m, (orig_height, orig_width))`` with
    the original image. Sizes are (height, width) throughout modlabel, as numpy
    shapes are; only PIL's sizes, such as the original (width, height) that
    ``decode.load_pixels`` returns and the database stores as ``width`` and
    ``height``, are the other way round, and are named ``..._wh``.
    Returns float32 of shape (..., height, width).
    """
    arr = np.asarray(maps, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a map (H, W) or a batch (N, H, W), got shape {arr.shape}")
    height, width = int(size_hw[0]), int(size_hw[1])
    rows = _bilinear_matrix(arr.shape[-2], height).astype(np.float32)
    cols = _bilinear_matrix(arr.shape[-1], width).astype(np.float32)
    return rows @ arr @ cols.T


# --------------------------------------------------------------------------
# The paper's display normalization and ROI measure (Figure 4, Table 3).
# --------------------------------------------------------------------------


def normalize_unit(maps: np.ndarray) -> np.ndarray:
    """Each map (..., H, W) divided by its max, negatives clipped to 0: values in [0, 1].

    A map with no positive value becomes all zeros. Clipping rather than min-max
    scaling is what makes CAM and Grad-CAM ROIs "almost the same" as in Table 3:
    negative evidence never passes a threshold relative to the max.
    """
    arr = np.maximum(np.asarray(maps, dtype=np.float32), np.float32(0))
    peak = arr.max(axis=(-2, -1), keepdims=True)
    return np.divide(arr, peak, out=np.zeros_like(arr), where=peak > 0)


def normalize_255(maps: np.ndarray) -> np.ndarray:
    """The paper's display scale: ``normalize_unit`` times 255, float32 in [0, 255]."""
    return normalize_unit(maps) * np.float32(255)


def roi_mask(maps: np.ndarray, fraction: float = DISPLAY_FRACTION) -> np.ndarray:
    """Where each map (..., H, W) is above ``fraction`` of its max: bool, same shape.

    fraction=0.2 is the paper's display threshold. A map with no positive value
    has an empty ROI.
    """
    return normalize_unit(maps) > fraction


@dataclass(frozen=True)
class RoiStats:
    """Table 3's measure for one map: pixels above the threshold and their ratio (0-1)."""

    pixels: int
    ratio: float


def roi_share(map2d: np.ndarray, input_hw: Sequence[int]) -> float:
    """The share of the image where a map, upsampled to the model's input (as shown), is
    above the display threshold (20% of its max): Table 3's ratio."""
    upsampled = upsample(np.asarray(map2d, np.float32), input_hw)
    return float(roi_mask(upsampled, DISPLAY_FRACTION).mean())


def roi_stats(
    map2d: np.ndarray,
    size_hw: Sequence[int] | None = None,
    *,
    fraction: float = DISPLAY_FRACTION,
) -> RoiStats:
    """ROI pixel count and ratio of one map (H, W), upsampled to ``size_hw`` first
    when given (Table 3 counts pixels of 300x300 images)."""
    arr = np.asarray(map2d, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected one map (H, W), got shape {arr.shape}")
    if size_hw is not None:
        arr = upsample(arr, size_hw)
    mask = roi_mask(arr, fraction)
    pixels = int(mask.sum())
    return RoiStats(pixels=pixels, ratio=pixels / mask.size)


# --------------------------------------------------------------------------
# Boxes: the class-level ROI (Figure 9) and its regions.
# --------------------------------------------------------------------------


def roi_box(map2d: np.ndarray, fraction: float = CLASS_ROI_FRACTION) -> Box | None:
    """Bounding box (x0, y0, x1, y1) of the cells above ``fraction`` of the max.

    In the map's own cells, x1 and y1 exclusive; ``scale_box`` takes it to an
    image. fraction=0.7 is Figure 9's class-level ROI. None when nothing passes
    (a map with no positive value).
    """
    mask = roi_mask(np.asarray(map2d), fraction)
    if mask.ndim != 2:
        raise ValueError(f"expected one map (H, W), got shape {mask.shape}")
    if not mask.any():
        return None
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


# Neighbour offsets (dy, dx): 4-connectivity shares an edge, 8 also a corner.
_NEIGHBOURS: dict[int, tuple[tuple[int, int], ...]] = {
    4: ((-1, 0), (0, -1), (0, 1), (1, 0)),
    8: tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)),
}


def label_components(
    mask: np.ndarray, *, connectivity: Literal[4, 8] = 8
) -> tuple[np.ndarray, int]:
    """Label the connected regions of a bool mask (H, W): (labels, count).

    Two True cells are connected when a chain of True cells joins them, each
    step to one of the 8 surrounding cells (``connectivity=8``, corners count)
    or one of the 4 sharing an edge (``connectivity=4``). labels: (H, W) int32,
    0 off the mask and 1..count on it, numbered in raster order of each region's
    first cell (as ``scipy.ndimage.label`` numbers them).

    By runs: each row's runs of True cells (found by numpy), joined with the runs
    of the row above that touch them (union-find), so the Python loop is over
    runs, not cells: a 300 x 300 map upsampled from 18 x 18 has a few hundred.
    """
    cells = np.asarray(mask, dtype=bool)
    if cells.ndim != 2:
        raise ValueError(f"expected one mask (H, W), got shape {cells.shape}")
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity must be 4 or 8, not {connectivity!r}")
    height, width = cells.shape
    labels = np.zeros((height, width), dtype=np.int32)
    if height == 0 or width == 0:
        return labels, 0
    edges = np.diff(np.pad(cells, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)  # row-major: runs in raster order
    ends = np.nonzero(edges == -1)[1]  # one past each run's last cell, in the same order
    first_run = np.searchsorted(rows, np.arange(height + 1)).tolist()
    rows, starts, ends = rows.tolist(), starts.tolist(), ends.tolist()
    parent = list(range(len(starts)))

    def root(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    reach = 1 if connectivity == 8 else 0  # a diagonal step joins runs a cell apart
    for y in range(1, height):
        above, here, after = first_run[y - 1], first_run[y], first_run[y + 1]
        for run in range(here, after):
            low, high = starts[run] - reach, ends[run] + reach
            while above < here and ends[above] <= low:  # ends before this run: and the next
                above += 1
            touching = above
            while touching < here and starts[touching] < high:
                a, b = root(run), root(touching)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                touching += 1
    numbers: dict[int, int] = {}
    for run in range(len(starts)):
        number = numbers.setdefault(root(run), len(numbers) + 1)
        labels[rows[run], starts[run] : ends[run]] = number
    return labels, len(numbers)


def component_boxes(
    map2d: np.ndarray,
    fraction: float = CLASS_ROI_FRACTION,
    *,
    connectivity: Literal[4, 8] = 8,
) -> list[Box]:
    """One box per connected region above ``fraction`` of the max, for when
    several regions pass. Regions as ``label_components`` finds them (8-connected
    by default: cells touching at a corner are one region); boxes as in
    ``roi_box``; strongest region (highest peak of ``map2d``) first, ties in
    raster order of the regions' first cells."""
    arr = np.asarray(map2d, dtype=np.float32)
    mask = roi_mask(arr, fraction)
    if mask.ndim != 2:
        raise ValueError(f"expected one map (H, W), got shape {mask.shape}")
    labels, count = label_components(mask, connectivity=connectivity)
    boxes: list[Box] = []
    peaks = []
    for label in range(1, count + 1):
        region = labels == label
        ys = np.flatnonzero(region.any(axis=1))
        xs = np.flatnonzero(region.any(axis=0))
        boxes.append((int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1))
        peaks.append(arr[region].max())
    order = np.argsort(-np.asarray(peaks, dtype=np.float32), kind="stable")
    return [boxes[i] for i in order]


def scale_box(box: Box, from_hw: Sequence[int], to_hw: Sequence[int]) -> Box:
    """A box in a (height, width) grid taken to another grid of the same image
    (the stretch geometry), rounded outward so it still covers the region."""
    sy = to_hw[0] / from_hw[0]
    sx = to_hw[1] / from_hw[1]
    x0, y0, x1, y1 = box
    return (
        int(np.floor(x0 * sx)),
        int(np.floor(y0 * sy)),
        int(np.ceil(x1 * sx)),
        int(np.ceil(y1 * sy)),
    )
