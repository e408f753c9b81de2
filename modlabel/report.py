"""Report: a self-contained HTML page of what a model made of an archive.

Per class: the number of images, the class-level average CRM (Eq. 8) as a
heatmap with its class-level ROI box (the area above 70% of the max, as in the
paper's Figure 9), and the most confident examples with their CRM overlaid.
Every picture is an inline PNG, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sqlalchemy.engine import Engine

from . import __version__, codec, maps, overlay, store
from .aggregate import update_class_maps
from .config import DEFAULT_DISPLAY_FRACTION, DEFAULT_ROI_FRACTION
from .decode import open_rgb
from .errors import ImageError

HEATMAP_PX = 256
EXAMPLE_PX = 180


@dataclass
class ExampleView:
    path: str
    confidence: float
    png: str | None  # base64 PNG, None when the file can no longer be read
    note: str = ""


@dataclass
class ClassView:
    name: str
    count: int
    roi_box: tuple[int, int, int, int] | None
    roi_box_pixels: tuple[int, int, int, int] | None
    map_shape: tuple[int, int]
    heatmap_png: str
    examples: list[ExampleView] = field(default_factory=list)


@dataclass
class ReportResult:
    path: Path
    classes: list[ClassView]
    total_images: int
    errors: int


def _png_b64(pixels: np.ndarray | Image.Image) -> str:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scale_box(
    box: tuple[int, int, int, int], map_shape: tuple[int, int], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A box in map cells to pixels of an image of ``size`` = (width, height)."""
    h, w = map_shape
    sx, sy = size[0] / w, size[1] / h
    x0, y0, x1, y1 = box
    return (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))


def class_heatmap_png(average: np.ndarray, roi_box: tuple[int, int, int, int] | None) -> str:
    """The average CRM as a jet heatmap with the class-level ROI box drawn in white."""
    up = maps.upsample(average, (HEATMAP_PX, HEATMAP_PX))
    img = Image.fromarray(overlay.heatmap_rgb(up))
    if roi_box is not None:
        draw = ImageDraw.Draw(img)
        x0, y0, x1, y1 = _scale_box(roi_box, average.shape, img.size)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255), width=3)
    return _png_b64(img)


def example_png(path: str, crm_map: np.ndarray) -> str:
    """An archive image, shrunk for the page, with its CRM overlaid."""
    img = open_rgb(path)
    img.thumbnail((EXAMPLE_PX, EXAMPLE_PX))
    blended = overlay.overlay(np.asarray(img), crm_map, threshold=DEFAULT_DISPLAY_FRACTION)
    return _png_b64(blended)


def build_report(
    engine: Engine,
    out_dir: Path,
    *,
    model_identity: str | None = None,
    examples_per_class: int = 4,
    refresh: bool = True,
    db_label: str = "",
) -> ReportResult:
    """Write ``out_dir/report.html`` for one model (the newest by default)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    model_row = store.pick_model(engine, model_identity)
    if refresh:
        update_class_maps(engine, model_row.id, model_row.class_names)
    counts = store.class_counts(engine, model_row.id)
    stored = {r["class_name"]: r for r in store.load_class_maps(engine, model_row.id)}
    classes: list[ClassView] = []
    for name in model_row.class_names:
        row = stored.get(name)
        if row is None:
            continue
        average = codec.decode_map(row["crm"])
        box = tuple(row["roi_box"]) if row["roi_box"] else None
        view = ClassView(
            name=name,
            count=counts.get(name, 0),
            roi_box=box,
            roi_box_pixels=_scale_box(box, average.shape, tuple(model_row.input_size[::-1]))
            if box
            else None,
            map_shape=average.shape,
            heatmap_png=class_heatmap_png(average, box),
        )
        for ex in store.example_rows(engine, model_row.id, name, examples_per_class):
            try:
                png, note = example_png(ex["path"], codec.decode_map(ex["crm"])), ""
            except ImageError as exc:
                png, note = None, exc.reason
            view.examples.append(ExampleView(ex["path"], float(ex["confidence"]), png, note))
        classes.append(view)
    errors = store.error_rows(engine, model_row.id)
    error_count = store.count_errors(engine, model_row.id)
    env = Environment(
        loader=PackageLoader("modlabel", "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    html = env.get_template("report.html.j2").render(
        model=model_row,
        classes=classes,
        errors=errors,
        error_count=error_count,
        total=sum(counts.get(n, 0) for n in model_row.class_names),
        roi_percent=round(DEFAULT_ROI_FRACTION * 100),
        display_percent=round(DEFAULT_DISPLAY_FRACTION * 100),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        db_label=db_label,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return ReportResult(path, classes, sum(v.count for v in classes), error_count)
