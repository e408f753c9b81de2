"""Class ROIs: the class-level region of interest (Figure 9) on the map that is shown.

The class-level average CRM (Eq. 8) lives on the feature map's coarse grid
(8x8 on the demo model, 18x18 on VGG16 at 300 px), but the report draws it
upsampled, bilinear, to the model's input size. A box taken on the coarse grid
and scaled up differs from the box of the heatmap a person sees (by up to a
third of its area on the demo model). So the ROI is computed on the map as it
is shown: the average is upsampled to the input size (``geometry.upsample``, the
decoder's stretch geometry), divided by its maximum, and the ROI is the area
above ``fraction`` (70%) of it: its bounding box, the box of each connected
region (8-connected) when several pass, and its share of the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import geometry

Box = geometry.Box


@dataclass(frozen=True)
class ClassRoi:
    """One class's ROI in input pixels; boxes are (x0, y0, x1, y1), x1 and y1 exclusive."""

    class_name: str
    image_count: int  # images in the class-level average
    min_confidence: float  # the confidence they needed
    input_hw: tuple[int, int]  # (height, width) of the model's input
    box: Box | None  # bounding box of everything above the fraction; None for an empty map
    regions: tuple[Box, ...]  # one box per connected region, strongest first
    share: float  # the ROI's pixels over the image's pixels
    fraction: float  # of the maximum: 0.7, as in Figure 9
    shown: np.ndarray  # (H, W) float32 in [0, 1]: the upsampled average, as drawn

    @property
    def box_fraction(self) -> tuple[float, float, float, float] | None:
        """The box as fractions of the image's width and height (x0, y0, x1, y1)."""
        if self.box is None:
            return None
        height, width = self.input_hw
        x0, y0, x1, y1 = self.box
        return (x0 / width, y0 / height, x1 / width, y1 / height)

    def as_row(self) -> dict[str, object]:
        """A flat record for CSV and JSON."""
        fractions = self.box_fraction or (None, None, None, None)
        box = self.box or (None, None, None, None)
        return {
            "class": self.class_name,
            "images": self.image_count,
            "min_confidence": self.min_confidence,
            "input_height": self.input_hw[0],
            "input_width": self.input_hw[1],
            "x0": box[0],
            "y0": box[1],
            "x1": box[2],
            "y1": box[3],
            "fx0": fractions[0],
            "fy0": fractions[1],
            "fx1": fractions[2],
            "fy1": fractions[3],
            "roi_share": self.share,
            "regions": [list(r) for r in self.regions],
        }


def class_roi(
    class_name: str,
    average: np.ndarray,
    input_hw: Sequence[int],
    *,
    image_count: int,
    min_confidence: float,
    fraction: float = geometry.CLASS_ROI_FRACTION,
) -> ClassRoi:
    """The ROI of a class-level average map (h, w), on its upsampling to ``input_hw``."""
    height, width = int(input_hw[0]), int(input_hw[1])
    shown = geometry.normalize_unit(
        geometry.upsample(np.asarray(average, np.float32), (height, width))
    )
    mask = geometry.roi_mask(shown, fraction)
    box = geometry.roi_box(shown, fraction)
    regions = tuple(geometry.component_boxes(shown, fraction)) if box is not None else ()
    return ClassRoi(
        class_name=class_name,
        image_count=image_count,
        min_confidence=min_confidence,
        input_hw=(height, width),
        box=box,
        regions=regions,
        share=float(mask.mean()),
        fraction=fraction,
        shown=shown.astype(np.float32),
    )
