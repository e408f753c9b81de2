"""The report's page: one self-contained HTML file, every picture inline, no script."""

from __future__ import annotations

import base64
import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from sqlalchemy.engine import Engine

from .. import (
    __version__,
    codec,
    geometry,
    overlay,
    rois,
    store,
)
from ..accuracy import FIGURES, ArchiveAccuracy
from ..decode_pool import DecodePool, DecodeRequest
from ..paths import display_path, from_db
from .files import BY_GROUND_TRUTH, png_bytes, write_atomic

HEATMAP_PX = 256  # the class heatmaps are drawn at an integer multiple of the input near this
EXAMPLE_PX = 180
HISTOGRAM_BINS = 20
MISSING_SHOWN = 20  # missing files listed on the page (all are in images.csv)
OUT_OF_SET_SHOWN = 20  # out-of-set files listed on the page (all: the out-of-set query)
ERROR_REASONS_SHOWN = 20
ERROR_EXAMPLES = 3
SCANS_SHOWN = 20


# -- views for the page ---------------------------------------------------------


@dataclass
class ExampleView:
    path: str  # for display (modlabel.paths.display_path)
    confidence: float
    png: str | None  # base64 PNG, None when the file can no longer be read
    note: str = ""


@dataclass
class HistogramView:
    """A class's confidence histogram as SVG geometry (user units, y down)."""

    bars: list[dict[str, float]]  # x, y, w, h, count, lo, hi
    width: int
    height: int
    plot_height: int
    total: int
    peak: int
    threshold_x: float | None  # the class-average threshold, where it applies


@dataclass
class ClassView:
    name: str
    stem: str  # file name stem and page anchor (class_file_stems)
    count: int  # images labeled with the class
    averaged: int  # of them, those in the class-level average (Eq. 8)
    roi: rois.ClassRoi | None  # None: no image in the average
    map_shape: tuple[int, int] | None
    heatmap_png: str | None
    heatmap_hw: tuple[int, int] | None  # the picture: the map (input size x k) over its bar
    histogram: HistogramView | None = None
    most_confident: list[ExampleView] = field(default_factory=list)
    least_confident: list[ExampleView] = field(default_factory=list)

    @property
    def roi_box(self) -> rois.Box | None:
        """The class ROI box in input pixels (x0, y0, x1, y1), x1/y1 exclusive."""
        return self.roi.box if self.roi is not None else None


# -- pictures ---------------------------------------------------------------------


def _png_b64(pixels: np.ndarray | Image.Image) -> str:
    return base64.b64encode(png_bytes(pixels)).decode("ascii")


def map_size(input_hw: Sequence[int]) -> tuple[int, int]:
    """The drawn size of a class heatmap: the input size times the integer nearest to
    HEATMAP_PX / its longer side (at least 1), so input pixels map to whole pixels and
    the boxes of the input-size ROI are drawn exactly."""
    height, width = int(input_hw[0]), int(input_hw[1])
    factor = max(1, round(HEATMAP_PX / max(height, width)))
    return height * factor, width * factor


def heatmap_size(input_hw: Sequence[int]) -> tuple[int, int]:
    """The page's size (height, width) of a class heatmap's picture: ``map_size`` and
    the colour bar below it (``overlay.with_colorbar``)."""
    height, width = map_size(input_hw)
    return height + overlay.colorbar_height(), max(width, overlay.COLORBAR_MIN_WIDTH)


def class_heatmap_png(average: np.ndarray, roi: rois.ClassRoi) -> str:
    """The average CRM as Figure 9 draws it, with the ROI of the map as shown (white box;
    a black box per region where several pass), at ``map_size``, over its colour bar (a
    colour is read as a share of the max); base64 PNG of ``heatmap_size``."""
    picture = overlay.class_overlay(average, map_size(roi.input_hw), roi=roi)
    return _png_b64(overlay.with_colorbar(picture))


def example_png(display: np.ndarray, crm_map: np.ndarray) -> str:
    """An archive image (as a decode worker shrank it, ``decode_pool.image_pool``), fit to
    the page's thumbnail box, with its CRM overlaid above ``geometry.DISPLAY_FRACTION`` of
    its max, over its colour bar (faded where the overlay leaves the image uncoloured)."""
    img = Image.fromarray(display)
    # Fit to the thumbnail box, small images enlarged too, so that examples line up.
    img = ImageOps.contain(img, (EXAMPLE_PX, EXAMPLE_PX), Image.Resampling.BILINEAR)
    threshold = geometry.DISPLAY_FRACTION
    blended = overlay.overlay(np.asarray(img), crm_map, threshold=threshold)
    return _png_b64(overlay.with_colorbar(blended, threshold=threshold))


def confidence_histogram(
    counts: Sequence[int], threshold: float | None, *, width: int = 256, plot_height: int = 64
) -> HistogramView:
    """SVG geometry of a histogram of confidence over [0, 1] in ``len(counts)`` bins."""
    bins = len(counts)
    peak = max(counts) if counts else 0
    step = width / max(bins, 1)
    bars = []
    for i, n in enumerate(counts):
        h = plot_height * n / peak if peak else 0.0
        bars.append(
            {
                "x": round(i * step + 0.5, 2),
                "y": round(plot_height - h, 2),
                "w": round(step - 1, 2),
                "h": round(h, 2),
                "count": int(n),
                "lo": i / bins,
                "hi": (i + 1) / bins,
            }
        )
    return HistogramView(
        bars=bars,
        width=width,
        height=plot_height + 16,
        plot_height=plot_height,
        total=int(sum(counts)),
        peak=int(peak),
        threshold_x=round(threshold * width, 2) if threshold is not None else None,
    )


def add_examples(
    engine: Engine, model_id: int, view: ClassView, limit: int, pool: DecodePool | None
) -> None:
    if limit <= 0 or pool is None:
        return
    most = store.example_rows(engine, model_id, view.name, limit)
    shown = {ex["path"] for ex in most}
    least = [
        ex
        for ex in store.example_rows(engine, model_id, view.name, limit, least_confident=True)
        if ex["path"] not in shown  # a small class: its least confident are among the most
    ]
    views = list(_example_views(most + least, pool))
    view.most_confident = views[: len(most)]
    view.least_confident = views[len(most) :]


def _example_views(rows: list[dict[str, Any]], pool: DecodePool) -> Iterator[ExampleView]:
    decoded = pool.map(rows, lambda ex: DecodeRequest(from_db(ex["path"])))
    for ex, image in decoded:
        png, note = None, image.error or ("decoding stopped" if image.cancelled else "")
        if not note:
            try:
                png = example_png(image.display, codec.decode_map(ex["crm"]))
            except codec.MapCodecError as exc:
                note = str(exc)
        yield ExampleView(display_path(ex["path"]), float(ex["confidence"]), png, note)


def _utc(moment: datetime | None) -> str:
    if moment is None:
        return ""
    if moment.tzinfo is None:  # SQLite hands timestamps back without their zone; UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_html(
    out_dir: Path,
    *,
    model: store.ModelRow,
    classes: list[ClassView],
    every_class: list[ClassView],
    counts: dict[str, int],
    error_count: int,
    out_of_set_count: int,
    threshold: float,
    averaged_over: str,
    truth: object,
    files: list[str],
    db_label: str,
    engine: Engine,
    reviews: ArchiveAccuracy | None = None,
) -> Path:
    from jinja2 import Environment, PackageLoader, select_autoescape

    scans = store.list_scans(engine, model.id, limit=SCANS_SHOWN)
    error_groups = store.error_groups(
        engine, model.id, reasons=ERROR_REASONS_SHOWN, examples=ERROR_EXAMPLES
    )
    missing_count = store.count_missing(engine, model.id)
    missing_rows = store.iter_missing(engine, model.id, chunk=MISSING_SHOWN)
    with contextlib.closing(missing_rows):
        missing = [
            (display_path(p), _utc(since))
            for p, since in itertools.islice(missing_rows, MISSING_SHOWN)
        ]
    out_of_set = [
        (display_path(p), label, confidence, score)
        for p, label, confidence, score in store.out_of_set_rows(
            engine, model.id, limit=OUT_OF_SET_SHOWN
        )
    ]
    env = Environment(
        loader=PackageLoader("modlabel", "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    env.filters["display_path"] = display_path
    env.filters["utc"] = _utc
    html = env.get_template("report.html.j2").render(
        model=model,
        classes=classes,
        every_class=every_class,
        error_count=error_count,
        error_groups=error_groups,
        errors_grouped=sum(g.count for g in error_groups),
        missing=missing,
        missing_count=missing_count,
        out_of_set=out_of_set,
        out_of_set_count=out_of_set_count,
        scans=scans,
        scans_limit=SCANS_SHOWN,
        total=sum(counts.get(v.name, 0) for v in classes),
        roi_percent=round(geometry.CLASS_ROI_FRACTION * 100),
        threshold=threshold,
        by_ground_truth=averaged_over == BY_GROUND_TRUTH,
        display_percent=round(geometry.DISPLAY_FRACTION * 100),
        histogram_bins=HISTOGRAM_BINS,
        truth=truth,
        reviews=reviews,
        figures=FIGURES,
        files=files,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        db_label=db_label,
    )
    path = out_dir / "report.html"
    return write_atomic(path, lambda f: f.write(html))
