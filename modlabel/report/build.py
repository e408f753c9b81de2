"""``build_report``: read what the store knows of a model, and write the parts asked for.

The report only reads: the class-level averages are those the scans keep
(``store.class_sums``); a database whose sums were never built (written by an
older modlabel) has them computed here from the stored maps, without storing
them (``modlabel db rebuild-class-maps`` stores them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from .. import (
    codec,
    perturb,
    rois,
    store,
)
from ..accuracy import archive_accuracy
from ..decode_pool import image_pool
from ..errors import UsageError

if TYPE_CHECKING:
    from .. import evaluation

from .files import (
    ALL_FORMATS,
    BY_CONFIDENCE,
    BY_GROUND_TRUTH,
    FORMATS,
    class_file_stems,
    class_rois,
    roi_rows,
    write_class_map_files,
    write_images_csv,
    write_roi_files,
)
from .html import (
    EXAMPLE_PX,
    HISTOGRAM_BINS,
    ClassView,
    add_examples,
    class_heatmap_png,
    confidence_histogram,
    heatmap_size,
    write_html,
)


def parse_formats(text: str | Iterable[str]) -> frozenset[str]:
    """``"html,rois"`` (or an iterable of names, or ``"all"``) as a set of format names."""
    names = text.split(",") if isinstance(text, str) else list(text)
    wanted = {name.strip().lower() for name in names if name.strip()}
    if "all" in wanted:
        return ALL_FORMATS
    unknown = sorted(wanted - ALL_FORMATS)
    if unknown or not wanted:
        raise UsageError(
            f"unknown report format {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(FORMATS)} (comma-separated) or all"
        )
    return frozenset(wanted)


@dataclass
class ReportResult:
    path: Path | None  # report.html, when written
    classes: list[ClassView]
    total_images: int  # labeled in the model's classes: out of set, failed and missing left out
    errors: int
    min_confidence: float  # the confidence an image needed to count in its class's average
    files: list[Path] = field(default_factory=list)  # every file written
    averaged_over: str = BY_CONFIDENCE
    images_written: int = 0  # rows of images.csv
    out_of_set: int = 0  # present images the model flagged out of set


# -- the report -----------------------------------------------------------------------


def build_report(
    engine: Engine,
    out_dir: Path,
    *,
    model_identity: str | None = None,
    examples_per_class: int = 4,
    min_confidence: float | None = None,
    db_label: str = "",
    formats: str | Iterable[str] = ALL_FORMATS,
    truth: evaluation.Truth | None = None,
    faithfulness: int = 0,
    methods: Sequence[str] | None = None,
    perturbation: perturb.Options | None = None,
) -> ReportResult:
    """Write the report of one model (the newest by default) into ``out_dir``.

    formats: which files (``FORMATS``: html, rois, maps, images; default all).
    The class-level averages are those the scans keep current, over the images
    of at least the model's threshold (``models.class_min_confidence``);
    ``min_confidence`` asks for another threshold, and the averages are then
    computed from the stored maps (reading every map of the model). With
    ``truth`` (``modlabel.evaluation``), the ground-truth evaluation writes its
    own files and section, and its averages over the correctly classified images
    replace the stored ones on the page and in the ROI and map files.
    ``examples_per_class``: the most and, as many again, the least confident
    images shown per class. ``db_label``: the database as shown (no password).
    ``methods``, ``perturbation``: with ``truth``, the map methods it scores and how
    Score-CAM and RISE run.
    """
    wanted = parse_formats(formats)
    out_dir = Path(out_dir)
    model_row = store.pick_model(engine, model_identity)
    stored_threshold = store.model_class_min_confidence(engine, model_row.id)
    # Sums never built (an older modlabel's database): the averages are computed below
    # for the page, from the stored maps, never stored (`modlabel db rebuild-class-maps`).
    threshold = store.class_threshold(stored_threshold, min_confidence)
    truth_report = None
    averaged_over = BY_CONFIDENCE
    if truth is not None:
        from .. import evaluation  # the ground-truth evaluation is loaded only when asked for

        truth_report = evaluation.evaluate_truth(
            engine,
            model_row,
            truth,
            out_dir=out_dir,
            faithfulness=faithfulness,
            formats=wanted,
            methods=methods,
            perturbation=perturbation,
        )
        averages = dict(truth_report.class_maps)
        averaged_over = BY_GROUND_TRUTH
    else:
        averages = stored_class_maps(engine, model_row, threshold, stored_threshold)
    # Classes in the model's order; a label the model does not name (none should) last.
    averages = {
        n: averages[n] for n in [*model_row.class_names, *sorted(averages)] if n in averages
    }
    input_hw = tuple(model_row.input_size)
    # The ROIs (a flood fill at the input size per class) only for what shows them.
    class_rois_ = class_rois(averages, input_hw, threshold) if wanted - {"images"} else {}
    stems = class_file_stems(list(dict.fromkeys([*model_row.class_names, *averages])))
    counts = store.class_counts(engine, model_row.id)
    error_count = store.count_errors(engine, model_row.id)
    out_of_set_count = store.count_out_of_set(engine, model_row.id)
    files: list[Path] = []
    if "rois" in wanted:
        files += write_roi_files(out_dir, roi_rows(model_row, class_rois_, stems, averaged_over))
    if "maps" in wanted:
        files += write_class_map_files(out_dir, averages, class_rois_, stems)
    images_written = 0
    if "images" in wanted:
        images_path = out_dir / "images.csv"
        images_written = write_images_csv(engine, model_row, images_path)
        files.append(images_path)
    every_class = [
        class_view(
            name,
            counts.get(name, 0),
            averages.get(name),
            class_rois_.get(name),
            stems,
            heatmap="html" in wanted,
        )
        for name in stems
    ]
    classes = [view for view in every_class if view.count or view.averaged]
    html_path = None
    if "html" in wanted:
        # The example images are read and decoded in isolated workers, as a scan's are.
        pool = image_pool(display_px=EXAMPLE_PX) if examples_per_class > 0 else None
        histograms = store.confidence_histograms(engine, model_row.id, HISTOGRAM_BINS)
        try:
            for view in classes:
                shown_threshold = threshold if averaged_over == BY_CONFIDENCE else None
                view.histogram = confidence_histogram(
                    histograms.get(view.name, [0] * HISTOGRAM_BINS), shown_threshold
                )
                add_examples(engine, model_row.id, view, examples_per_class, pool)
        finally:
            if pool is not None:
                pool.close()
        html_path = write_html(
            out_dir,
            model=model_row,
            classes=classes,
            every_class=every_class,
            counts=counts,
            error_count=error_count,
            out_of_set_count=out_of_set_count,
            threshold=threshold,
            averaged_over=averaged_over,
            truth=truth_report,
            files=[f.relative_to(out_dir).as_posix() for f in files],
            db_label=db_label or store.safe_url(engine.url),
            engine=engine,
            reviews=archive_accuracy(engine, model_row),  # None without reviews
        )
        files.insert(0, html_path)
    return ReportResult(
        html_path,
        classes,
        sum(v.count for v in classes),
        error_count,
        threshold,
        files=files,
        averaged_over=averaged_over,
        images_written=images_written,
        out_of_set=out_of_set_count,
    )


def class_view(
    name: str,
    count: int,
    class_map: store.ClassMap | None,
    roi: rois.ClassRoi | None,
    stems: dict[str, str],
    *,
    heatmap: bool,
) -> ClassView:
    view = ClassView(
        name=name,
        stem=stems[name],
        count=count,
        averaged=class_map.image_count if class_map is not None else 0,
        roi=roi,
        map_shape=tuple(class_map.average.shape) if class_map is not None else None,
        heatmap_png=None,
        heatmap_hw=None,
    )
    if heatmap and class_map is not None and roi is not None:
        view.heatmap_png = class_heatmap_png(class_map.average, roi)
        view.heatmap_hw = heatmap_size(roi.input_hw)
    return view


def stored_class_maps(
    engine: Engine, model_row: store.ModelRow, threshold: float, stored_threshold: float | None
) -> dict[str, store.ClassMap]:
    """Each class's average map at ``threshold``: the stored one, or computed for the page
    (read, never stored)."""
    if stored_threshold is not None and threshold == stored_threshold:
        result = {}
        for row in store.load_class_maps(engine, model_row.id):
            average = codec.decode_map(row["crm"])
            box = tuple(row["roi_box"]) if row["roi_box"] else None
            result[row["class_name"]] = store.ClassMap(
                row["class_name"], row["image_count"], average, box
            )
        return result
    computed = {}
    for name in model_row.class_names:
        class_map = store.class_average(engine, model_row.id, name, min_confidence=threshold)
        if class_map is not None:
            computed[name] = class_map
    return computed
