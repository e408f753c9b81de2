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
from PIL import Image
from sqlalchemy.engine import Engine

from . import __version__, aggregate, codec, config, maps, overlay, store
from .decode import open_rgb
from .errors import ImageError, ModlabelError
from .paths import display_path, from_db
from .source import read_file

HEATMAP_PX = 256
EXAMPLE_PX = 180


@dataclass
class ExampleView:
    path: str  # for display (modlabel.paths.display_path)
    confidence: float
    png: str | None  # base64 PNG, None when the file can no longer be read
    note: str = ""


@dataclass
class ClassView:
    name: str
    count: int  # images labeled with the class
    averaged: int  # of them, those in the class-level average (Eq. 8)
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
    min_confidence: float  # the confidence an image needed to count in its class's average


def _png_b64(pixels: np.ndarray | Image.Image) -> str:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def class_heatmap_png(average: np.ndarray) -> str:
    """The average CRM as Figure 9 draws it: a heatmap with the class-level ROI box
    in white (and a black box per region where several pass)."""
    return _png_b64(overlay.class_overlay(average, (HEATMAP_PX, HEATMAP_PX)))


def example_png(path: str, crm_map: np.ndarray) -> str:
    """An archive image, shrunk for the page, with its CRM overlaid."""
    img = open_rgb(read_file(path), name=path)  # regular files only, bounded
    img.thumbnail((EXAMPLE_PX, EXAMPLE_PX))
    blended = overlay.overlay(np.asarray(img), crm_map, threshold=maps.DISPLAY_FRACTION)
    return _png_b64(blended)


def build_report(
    engine: Engine,
    out_dir: Path,
    *,
    model_identity: str | None = None,
    examples_per_class: int = 4,
    min_confidence: float | None = None,
    db_label: str = "",
) -> ReportResult:
    """Write ``out_dir/report.html`` for one model (the newest by default).

    The class-level averages are those the scans keep current, over the
    images of at least the model's threshold (``models.class_min_confidence``);
    ``min_confidence`` asks for another threshold, and the averages are then
    computed from the stored maps for the page (reading every map of the model).
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    model_row = store.pick_model(engine, model_identity)
    stored_threshold = store.model_class_min_confidence(engine, model_row.id)
    if stored_threshold is None:  # a database from before running sums: build them once
        stored_threshold = (
            min_confidence if min_confidence is not None else (config.DEFAULT_CLASS_MIN_CONFIDENCE)
        )
        aggregate.rebuild_class_maps(engine, model_row.id, model_row.class_names, stored_threshold)
    threshold = stored_threshold if min_confidence is None else min_confidence
    counts = store.class_counts(engine, model_row.id)
    averages = _class_maps(engine, model_row, threshold, stored_threshold)
    classes: list[ClassView] = []
    for name in model_row.class_names:
        class_map = averages.get(name)
        if class_map is None:
            continue
        average, box = class_map.average, class_map.roi_box
        view = ClassView(
            name=name,
            count=counts.get(name, 0),
            averaged=class_map.image_count,
            roi_box=box,
            roi_box_pixels=maps.scale_box(box, average.shape, model_row.input_size)
            if box
            else None,
            map_shape=average.shape,
            heatmap_png=class_heatmap_png(average),
        )
        for ex in store.example_rows(engine, model_row.id, name, examples_per_class):
            try:
                png, note = example_png(from_db(ex["path"]), codec.decode_map(ex["crm"])), ""
            except ImageError as exc:
                png, note = None, exc.reason
            view.examples.append(
                ExampleView(display_path(ex["path"]), float(ex["confidence"]), png, note)
            )
        classes.append(view)
    errors = [(display_path(p), e) for p, e in store.error_rows(engine, model_row.id)]
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
        roi_percent=round(maps.CLASS_ROI_FRACTION * 100),
        threshold=threshold,
        display_percent=round(maps.DISPLAY_FRACTION * 100),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        db_label=db_label,
    )
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise ModlabelError(f"{out_dir}: cannot write the report: {exc.strerror or exc}") from None
    return ReportResult(path, classes, sum(v.count for v in classes), error_count, threshold)


def _class_maps(
    engine: Engine, model_row: store.ModelRow, threshold: float, stored_threshold: float
) -> dict[str, aggregate.ClassMap]:
    """Each class's average map at ``threshold``: the stored one, or computed for the page."""
    if threshold == stored_threshold:
        result = {}
        for row in store.load_class_maps(engine, model_row.id):
            average = codec.decode_map(row["crm"])
            box = tuple(row["roi_box"]) if row["roi_box"] else None
            result[row["class_name"]] = aggregate.ClassMap(
                row["class_name"], row["image_count"], average, box
            )
        return result
    computed = {}
    for name in model_row.class_names:
        class_map = aggregate.class_average(engine, model_row.id, name, min_confidence=threshold)
        if class_map is not None:
            computed[name] = class_map
    return computed
