"""Report: what a model made of an archive, as a page and as files to take elsewhere.

``build_report`` writes into one folder, each part on request (``formats``):

* ``html``: ``report.html``, one self-contained page (every picture an inline
  PNG or SVG, no script, nothing fetched; a Content-Security-Policy forbids
  it). Per class: the count, the class-level average CRM (Eq. 8) with its ROI
  box (Figure 9), a histogram of confidence, the most and the least confident
  images with their CRM overlaid (Figure 4). For the whole run: the scans, the
  files that failed grouped by reason, the missing files.
* ``rois``: ``class_rois.csv`` and ``class_rois.json``, one row per (model,
  class): the ROI box in input pixels and as fractions of the image, its
  share, every region above the threshold, the images and threshold behind it.
* ``maps``: ``class_maps/<class>.png`` (heatmap with boxes, input size),
  ``<class>.nobox.png`` and ``<class>.npy`` (the average at the feature-map
  resolution, float32).
* ``images``: ``images.csv``, one row per image of the model, streamed from the
  database: memory stays flat for millions of rows.

The class ROI is computed on the map as it is shown (``modlabel.rois``): the
average upsampled to the model's input size, then the area above 70% of its
maximum. With ground truth (``truth``), the averages are those of the
correctly classified images (``modlabel.evaluation``) instead of the stored
ones.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps
from sqlalchemy.engine import Engine

from . import __version__, aggregate, codec, config, maps, overlay, rois, spreadsheet, store
from .decode_pool import DecodePool, DecodeRequest, image_pool
from .errors import ModlabelError
from .paths import display_path, from_db

if TYPE_CHECKING:
    from . import evaluation

HEATMAP_PX = 256  # the class heatmaps are drawn at an integer multiple of the input near this
EXAMPLE_PX = 180
HISTOGRAM_BINS = 20
MISSING_SHOWN = 20  # missing files listed on the page (all are in images.csv)
OUT_OF_SET_SHOWN = 20  # out-of-set files listed on the page (all: the out-of-set query)
ERROR_REASONS_SHOWN = 20
ERROR_EXAMPLES = 3
SCANS_SHOWN = 20

# What --format can ask for, and what each writes.
FORMATS: dict[str, str] = {
    "html": "report.html",
    "rois": "class_rois.csv, class_rois.json",
    "maps": "class_maps/<class>.png, <class>.nobox.png, <class>.npy",
    "images": "images.csv",
}
ALL_FORMATS = frozenset(FORMATS)

ROI_COLUMNS = (
    "model",
    "backbone",
    "class",
    "file_stem",
    "averaged_over",
    "images",
    "min_confidence",
    "input_height",
    "input_width",
    "x0",
    "y0",
    "x1",
    "y1",
    "fx0",
    "fy0",
    "fx1",
    "fy1",
    "roi_share",
    "roi_fraction",
    "regions",
)
IMAGE_COLUMNS = ("path", "label", "confidence", "roi_share", "error", "missing_since")

# What a class average is taken over: the stored averages (labels of at least a
# confidence), or, with ground truth, the correctly classified images.
BY_CONFIDENCE, BY_GROUND_TRUTH = "confidence", "ground_truth"


def parse_formats(text: str | Iterable[str]) -> frozenset[str]:
    """``"html,rois"`` (or an iterable of names, or ``"all"``) as a set of format names."""
    names = text.split(",") if isinstance(text, str) else list(text)
    wanted = {name.strip().lower() for name in names if name.strip()}
    if "all" in wanted:
        return ALL_FORMATS
    unknown = sorted(wanted - ALL_FORMATS)
    if unknown or not wanted:
        raise ModlabelError(
            f"unknown report format {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(FORMATS)} (comma-separated) or all"
        )
    return frozenset(wanted)


_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def class_file_stems(class_names: Sequence[str]) -> dict[str, str]:
    """A file name stem per class: [A-Za-z0-9_.-] kept, every other character (and a
    leading dot) replaced by ``_``; a stem taken already by an earlier class gets
    ``-2``, ``-3``, ... Class names come from model metadata and may hold anything."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for name in class_names:
        stem = _UNSAFE_FILE_CHARS.sub("_", name) or "_"
        if stem.startswith("."):
            stem = "_" + stem[1:]
        candidate, n = stem, 1
        while candidate.lower() in taken:  # case-insensitive file systems too
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.lower())
        stems[name] = candidate
    return stems


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
    heatmap_hw: tuple[int, int] | None  # the drawn size, a multiple of the input size
    histogram: HistogramView | None = None
    most_confident: list[ExampleView] = field(default_factory=list)
    least_confident: list[ExampleView] = field(default_factory=list)

    @property
    def roi_box(self) -> rois.Box | None:
        """The class ROI box in input pixels (x0, y0, x1, y1), x1/y1 exclusive."""
        return self.roi.box if self.roi is not None else None


@dataclass
class ReportResult:
    path: Path | None  # report.html, when written
    classes: list[ClassView]
    total_images: int
    errors: int
    min_confidence: float  # the confidence an image needed to count in its class's average
    files: list[Path] = field(default_factory=list)  # every file written
    averaged_over: str = BY_CONFIDENCE
    images_written: int = 0  # rows of images.csv


# -- pictures ---------------------------------------------------------------------


def _png_bytes(pixels: np.ndarray | Image.Image) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # optimize=True: 3% smaller, 8 times slower
    return buf.getvalue()


def _png_b64(pixels: np.ndarray | Image.Image) -> str:
    return base64.b64encode(_png_bytes(pixels)).decode("ascii")


def heatmap_size(input_hw: Sequence[int]) -> tuple[int, int]:
    """The page's size for a class heatmap: the input size times the integer nearest to
    HEATMAP_PX / its longer side (at least 1), so input pixels map to whole pixels and
    the boxes of the input-size ROI are drawn exactly."""
    height, width = int(input_hw[0]), int(input_hw[1])
    factor = max(1, round(HEATMAP_PX / max(height, width)))
    return height * factor, width * factor


def class_heatmap_png(average: np.ndarray, roi: rois.ClassRoi) -> str:
    """The average CRM as Figure 9 draws it, with the ROI of the map as shown (white box;
    a black box per region where several pass), at ``heatmap_size``; base64 PNG."""
    return _png_b64(overlay.class_overlay(average, heatmap_size(roi.input_hw), roi=roi))


def example_png(display: np.ndarray, crm_map: np.ndarray) -> str:
    """An archive image (as a decode worker shrank it, ``decode_pool.image_pool``), fit to
    the page's thumbnail box, with its CRM overlaid."""
    img = Image.fromarray(display)
    # Fit to the thumbnail box, small images enlarged too, so that examples line up.
    img = ImageOps.contain(img, (EXAMPLE_PX, EXAMPLE_PX), Image.Resampling.BILINEAR)
    blended = overlay.overlay(np.asarray(img), crm_map, threshold=maps.DISPLAY_FRACTION)
    return _png_b64(blended)


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


# -- ROI and map files ----------------------------------------------------------------


def class_rois(
    averages: dict[str, aggregate.ClassMap],
    input_hw: Sequence[int],
    min_confidence: float,
) -> dict[str, rois.ClassRoi]:
    """The ROI of each class average on its upsampling to the input size (``rois``)."""
    return {
        name: rois.class_roi(
            name,
            class_map.average,
            input_hw,
            image_count=class_map.image_count,
            min_confidence=min_confidence,
        )
        for name, class_map in averages.items()
    }


def roi_rows(
    model_row: store.ModelRow,
    class_rois_: dict[str, rois.ClassRoi],
    stems: dict[str, str],
    averaged_over: str,
) -> list[dict[str, Any]]:
    """One record per class (in the model's class order), with ROI_COLUMNS."""
    rows = []
    for name in model_row.class_names:
        roi = class_rois_.get(name)
        if roi is None:
            continue
        row = roi.as_row()
        row.update(
            model=model_row.identity,
            backbone=model_row.backbone,
            file_stem=stems[name],
            averaged_over=averaged_over,
            roi_fraction=roi.fraction,
        )
        if averaged_over == BY_GROUND_TRUTH:
            row["min_confidence"] = None  # correctly classified, whatever the confidence
        rows.append({key: row[key] for key in ROI_COLUMNS})
    return rows


def _write_atomic(path: Path, write: Callable[[IO[Any]], None], *, binary: bool = False) -> Path:
    """Write ``path`` through a temporary file beside it, so that a file that is there is
    whole; an OSError becomes a ModlabelError naming the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if binary:
            with tmp.open("wb") as f:
                write(f)
        else:
            with tmp.open("w", encoding="utf-8", newline="") as f:
                write(f)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ModlabelError(f"{path}: cannot write the report: {exc.strerror or exc}") from None
    return path


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    data = _png_bytes(pixels)
    return _write_atomic(path, lambda f: f.write(data), binary=True)


def _write_npy(path: Path, array: np.ndarray) -> Path:
    return _write_atomic(path, lambda f: np.save(f, array, allow_pickle=False), binary=True)


def write_roi_files(out_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """class_rois.csv (regions as a JSON list in one column) and class_rois.json (a list)."""

    def write_csv(f: IO[str]) -> None:
        writer = spreadsheet.writer(f)
        writer.writerow(ROI_COLUMNS)
        for row in rows:
            writer.writerow([json.dumps(row[k]) if k == "regions" else row[k] for k in ROI_COLUMNS])

    def write_json(f: IO[str]) -> None:
        json.dump(rows, f, indent=2)
        f.write("\n")

    return [
        _write_atomic(out_dir / "class_rois.csv", write_csv),
        _write_atomic(out_dir / "class_rois.json", write_json),
    ]


def write_class_map_files(
    out_dir: Path,
    averages: dict[str, aggregate.ClassMap],
    class_rois_: dict[str, rois.ClassRoi],
    stems: dict[str, str],
) -> list[Path]:
    """class_maps/<stem>.png (input size, boxes), .nobox.png and .npy (feature-map grid)."""
    folder = out_dir / "class_maps"
    written = []
    for name, class_map in averages.items():
        roi = class_rois_[name]
        boxed = overlay.class_overlay(class_map.average, roi.input_hw, roi=roi)
        plain = overlay.heatmap_rgb(roi.shown)
        average = np.ascontiguousarray(class_map.average, dtype=np.float32)
        stem = stems[name]
        written += [
            _write_png(folder / f"{stem}.png", boxed),
            _write_png(folder / f"{stem}.nobox.png", plain),
            _write_npy(folder / f"{stem}.npy", average),
        ]
    return written


# -- images.csv -----------------------------------------------------------------------


def image_roi_shares(blobs: Sequence[bytes | None], input_hw: Sequence[int]) -> list[float | None]:
    """Each stored CRM's ROI share: the fraction of the image where the map, upsampled to
    the input size (as shown), is above 20% of its own maximum (Table 3's ratio,
    ``maps.roi_mask``). None for a row without a map (an error) or an unreadable one."""
    decoded: list[np.ndarray | None] = []
    for blob in blobs:
        try:
            decoded.append(codec.decode_map(blob) if blob is not None else None)
        except codec.MapCodecError:
            decoded.append(None)
    # One map at a time: a (H, h) x (h, w) x (w, W) product is a BLAS call, three times
    # faster than numpy's loop over a batch, and only one map at the input size is held.
    return [
        float(maps.roi_mask(maps.upsample(m, input_hw), maps.DISPLAY_FRACTION).mean())
        if m is not None
        else None
        for m in decoded
    ]


def write_images_csv(
    engine: Engine, model_row: store.ModelRow, path: Path, *, chunk: int = 1000, batch: int = 32
) -> int:
    """images.csv: one row per image of the model (IMAGE_COLUMNS), in path order, read
    ``chunk`` rows at a time from the database and written ``batch`` rows at a time;
    returns the number of rows. Missing and failed files are rows too."""
    written = 0
    input_hw = tuple(model_row.input_size)

    def write(f: IO[str]) -> None:
        nonlocal written
        writer = spreadsheet.writer(f)
        writer.writerow(IMAGE_COLUMNS)
        rows = store.iter_image_rows(engine, model_row.id, chunk=chunk)
        with contextlib.closing(rows):
            while group := list(itertools.islice(rows, batch)):
                shares = image_roi_shares([r[3] for r in group], input_hw)
                writer.writerows(
                    (
                        display_path(p),
                        label,
                        confidence,
                        share,
                        error,
                        missing.isoformat() if missing is not None else None,
                    )
                    for (p, label, confidence, _, error, missing), share in zip(
                        group, shares, strict=True
                    )
                )
                written += len(group)

    _write_atomic(path, write)
    return written


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
    """
    wanted = parse_formats(formats)
    out_dir = Path(out_dir)
    model_row = store.pick_model(engine, model_identity)
    stored_threshold = store.model_class_min_confidence(engine, model_row.id)
    if stored_threshold is None:  # a database from before running sums: build them once
        stored_threshold = (
            min_confidence if min_confidence is not None else (config.DEFAULT_CLASS_MIN_CONFIDENCE)
        )
        aggregate.rebuild_class_maps(engine, model_row.id, model_row.class_names, stored_threshold)
    threshold = stored_threshold if min_confidence is None else min_confidence
    truth_report = None
    averaged_over = BY_CONFIDENCE
    if truth is not None:
        from . import evaluation  # the ground-truth evaluation is loaded only when asked for

        truth_report = evaluation.evaluate_truth(
            engine,
            model_row,
            truth,
            out_dir=out_dir,
            faithfulness=faithfulness,
            formats=wanted,
        )
        averages = dict(truth_report.class_maps)
        averaged_over = BY_GROUND_TRUTH
    else:
        averages = _class_maps(engine, model_row, threshold, stored_threshold)
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
        _class_view(
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
                _add_examples(engine, model_row.id, view, examples_per_class, pool)
        finally:
            if pool is not None:
                pool.close()
        html_path = _write_html(
            out_dir,
            model=model_row,
            classes=classes,
            every_class=every_class,
            counts=counts,
            error_count=error_count,
            threshold=threshold,
            averaged_over=averaged_over,
            truth=truth_report,
            files=[f.relative_to(out_dir).as_posix() for f in files],
            db_label=db_label or store.safe_url(engine.url),
            engine=engine,
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
    )


def _class_view(
    name: str,
    count: int,
    class_map: aggregate.ClassMap | None,
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


def _add_examples(
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


def _write_html(
    out_dir: Path,
    *,
    model: store.ModelRow,
    classes: list[ClassView],
    every_class: list[ClassView],
    counts: dict[str, int],
    error_count: int,
    threshold: float,
    averaged_over: str,
    truth: object,
    files: list[str],
    db_label: str,
    engine: Engine,
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
    out_of_set_count = store.count_out_of_set(engine, model.id)
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
        roi_percent=round(maps.CLASS_ROI_FRACTION * 100),
        threshold=threshold,
        by_ground_truth=averaged_over == BY_GROUND_TRUTH,
        display_percent=round(maps.DISPLAY_FRACTION * 100),
        histogram_bins=HISTOGRAM_BINS,
        truth=truth,
        files=files,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        db_label=db_label,
    )
    path = out_dir / "report.html"
    return _write_atomic(path, lambda f: f.write(html))


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
