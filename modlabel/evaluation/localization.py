"""Localize: how well each relevance map finds the class evidence, against ground truth.

The paper measures localization by the size of the highlighted region alone
(Table 3: the mean number and ratio of pixels of 300x300 images above 20% of
the map's max). A synthetic archive (``modlabel synth``) also records where the
class evidence really is: every image's structure boxes (the optic disc, the
lungs, the axes of a graph, ...) and its distractors (text, scale bars,
arrows). ``evaluate_localization`` reports both, per class and per method;
``localize_images`` is the same over any list of images with their records
(``modlabel.evaluation`` scores a database's images with it).

Definitions, for one image, one method and the map upsampled (bilinear, the
decoder's plain stretch, ``geometry.upsample``) to ``size`` = (H, W) pixels:

* ROI: the pixels whose value is above ``fraction`` (0.2) of the map's max,
  negatives clipped (``geometry.roi_mask``, the same set ``geometry.roi_stats`` counts);
  empty when the map has no positive value.
* S: the union of the image's structure boxes, D: the union of its distractor
  boxes other than ``border`` (whose box is the whole image). Boxes are given in
  original-image pixels, ``[x0, y0, x1, y1]`` with x1, y1 exclusive, and are
  stretched to (H, W) like the image (x by W / width, y by H / height), rounded
  outward (``geometry.scale_box``) and clipped to the grid.
* ``roi_pixels`` = |ROI|, ``roi_ratio`` = 100 |ROI| / (H W) (percent): Table 3.
* ``pointing``: 1 when the map's maximum lies in S (the pointing game, strict:
  no tolerance margin; the first maximum in row-major order on ties), else 0;
  a map with no positive value scores 0.
* ``roi_precision`` = |ROI & S| / |ROI|: the share of the ROI on the structures;
  undefined (left out) when the ROI is empty.
* ``roi_recall`` = |ROI & S| / |S|: the share of the structures the ROI covers.
* ``roi_iou`` = |ROI & S| / |ROI | S|: the overlap of the ROI with the structures.
* ``energy``: the energy-based pointing game (Wang et al., Score-CAM, 2020): the
  share of the map's positive mass (negatives clipped) that lies in S;
  undefined when the map has no positive value.
* ``distractor_share`` = |ROI & D| / |ROI|: the share of the ROI on distractors;
  defined only for images with a distractor and a non-empty ROI.

Chance levels, per class: ``structure_area`` = |S| / (H W) is the pointing
hit rate, the energy share and the ROI precision of a point, a flat map or a
region placed at random;
``distractor_area`` = |D| / (H W) (over images with distractors) is the
distractor share of a random ROI.

The paper compares maps on correctly classified images, so every map
statistic is the mean over the images whose predicted class is their
ground-truth class (the map is drawn for that class); images a model gets
wrong count only in the accuracy. A row of several classes (``overall``)
weighs every image the same.

Every mean comes with its 95% percentile bootstrap interval over those images
(per class and over all), and every two methods are compared on each measure
of ``TESTED_METRICS`` over all classes, on the same images: McNemar's exact
test for the pointing game, the paired bootstrap for the others, Holm-adjusted
over the pairs of each measure (``evaluation.significance``, ``modlabel.stats``).
``pool_localization`` pools the reports of several independently trained
models over one archive: the mean over models of each model's figure, its
interval and the method pairs' tests from a two-stage bootstrap (models, then
images within each), and each two models compared method by method.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import geometry, maps, perturb, stopping
from ..decode_pool import DecodeRequest, image_pool
from ..errors import ModlabelError
from ..groundtruth import GROUND_TRUTH_NAME
from ..infer import LayerMaps, describe, label_pixels
from ..model import OnnxModel
from .significance import (
    ALL,
    Comparison,
    FigureInterval,
    StatisticsSettings,
    image_statistics,
    model_comparisons,
    pooled_statistics,
)

TABLE3_SIZE = (300, 300)  # the paper counts pixels of 300x300 images
IGNORED_DISTRACTORS = frozenset({"border"})  # a frame's box is the whole image
OVERALL = ALL

Box = geometry.Box


# --------------------------------------------------------------------------
# Ground truth: boxes in original pixels, rasterized at the evaluation size.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundTruth:
    """One ``ground_truth.jsonl`` record: boxes in original-image pixels."""

    path: str
    class_name: str
    width: int | None
    height: int | None
    boxes: tuple[Box, ...]
    distractors: tuple[Box, ...]  # without the ignored labels (``border``)


def scale_gt_box(box: Sequence[int], original_wh: Sequence[int], size_hw: Sequence[int]) -> Box:
    """A box [x0, y0, x1, y1] of an original image (width, height) in the pixels of
    the image stretched to ``size_hw`` = (height, width), rounded outward and
    clipped to the grid."""
    width, height = int(original_wh[0]), int(original_wh[1])
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    x0, y0, x1, y1 = geometry.scale_box(tuple(box), (height, width), (out_h, out_w))
    return (
        min(max(x0, 0), out_w),
        min(max(y0, 0), out_h),
        min(max(x1, 0), out_w),
        min(max(y1, 0), out_h),
    )


def box_mask(
    boxes: Sequence[Sequence[int]], original_wh: Sequence[int], size_hw: Sequence[int]
) -> np.ndarray:
    """The union of ``boxes`` (original-image pixels) at ``size_hw``: (H, W) bool."""
    mask = np.zeros((int(size_hw[0]), int(size_hw[1])), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = scale_gt_box(box, original_wh, size_hw)
        mask[y0:y1, x0:x1] = True
    return mask


def _box(values: Sequence[Any]) -> Box:
    x0, y0, x1, y1 = (int(v) for v in values)  # ValueError unless four numbers
    return (x0, y0, x1, y1)


def _parse_record(doc: Any, where: str) -> GroundTruth:
    try:
        width, height = doc.get("width"), doc.get("height")
        return GroundTruth(
            path=str(doc["path"]),
            class_name=str(doc["class"]),
            width=None if width is None else int(width),
            height=None if height is None else int(height),
            boxes=tuple(_box(b["box"]) for b in doc["boxes"]),
            distractors=tuple(
                _box(b["box"])
                for b in doc.get("distractors", [])
                if b.get("label") not in IGNORED_DISTRACTORS
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModlabelError(f"{where}: not a ground-truth record ({exc!r})") from None


def read_records(path: Path, limit: int | None = None) -> Iterator[GroundTruth]:
    """Stream the records of a ``ground_truth.jsonl``, at most ``limit`` of them."""
    if limit is not None and limit <= 0:
        return
    count = 0
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ModlabelError(f"{where}: invalid JSON ({exc.msg})") from None
            yield _parse_record(doc, where)
            count += 1
            if limit is not None and count >= limit:
                return


# --------------------------------------------------------------------------
# The metrics, per image, on maps already at the evaluation size.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageScores:
    """Per-image metrics of a batch of maps (see the module docstring); each (N,).

    Undefined values are NaN: precision and distractor share of an empty ROI,
    recall, IoU, pointing and energy of an image without structure boxes,
    energy of a map without a positive value, distractor share of an image
    without distractors.
    """

    roi_pixels: np.ndarray  # int
    roi_ratio: np.ndarray  # percent
    pointing: np.ndarray  # 0.0 or 1.0
    roi_precision: np.ndarray
    roi_recall: np.ndarray
    roi_iou: np.ndarray
    energy: np.ndarray
    distractor_share: np.ndarray


def localization_scores(
    maps_at_size: np.ndarray,
    structures: np.ndarray,
    distractors: np.ndarray,
    *,
    fraction: float = geometry.DISPLAY_FRACTION,
) -> ImageScores:
    """Score maps against box masks, all at the evaluation size.

    maps_at_size: (N, H, W) float, already upsampled; structures, distractors:
    (N, H, W) bool masks (``box_mask``).
    """
    values = np.asarray(maps_at_size, dtype=np.float32)
    if values.ndim != 3:
        raise ValueError(f"expected maps (N, H, W), got shape {values.shape}")
    if structures.shape != values.shape or distractors.shape != values.shape:
        raise ValueError(
            f"masks {structures.shape} and {distractors.shape} differ from maps {values.shape}"
        )
    n = values.shape[0]
    roi = geometry.roi_mask(values, fraction).reshape(n, -1)
    s = structures.reshape(n, -1)
    d = distractors.reshape(n, -1)
    roi_pixels = roi.sum(axis=1)
    s_pixels = s.sum(axis=1)
    d_pixels = d.sum(axis=1)
    on_s = (roi & s).sum(axis=1)
    on_d = (roi & d).sum(axis=1)

    flat = values.reshape(n, -1)
    peak_at = flat.argmax(axis=1)
    peak = flat[np.arange(n), peak_at]
    hit = (peak > 0) & s[np.arange(n), peak_at]

    positive = np.maximum(flat, np.float32(0))
    mass = positive.sum(axis=1, dtype=np.float64)
    mass_on_s = np.where(s, positive, np.float32(0)).sum(axis=1, dtype=np.float64)
    union = (roi | s).sum(axis=1)

    nan = np.float64(np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(roi_pixels > 0, on_s / roi_pixels, nan)
        recall = np.where(s_pixels > 0, on_s / s_pixels, nan)
        iou = np.where(s_pixels > 0, on_s / union, nan)
        energy = np.where((s_pixels > 0) & (mass > 0), mass_on_s / mass, nan)
        share = np.where((roi_pixels > 0) & (d_pixels > 0), on_d / roi_pixels, nan)
    return ImageScores(
        roi_pixels=roi_pixels,
        roi_ratio=100.0 * roi_pixels / roi.shape[1],
        pointing=np.where(s_pixels > 0, hit.astype(np.float64), nan),
        roi_precision=precision,
        roi_recall=recall,
        roi_iou=iou,
        energy=energy,
        distractor_share=share,
    )


# --------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------

METRICS = (
    "roi_pixels",
    "roi_ratio",
    "pointing",
    "roi_precision",
    "roi_recall",
    "roi_iou",
    "energy",
    "distractor_share",
)


# The measures whose method pairs are tested (``roi_pixels`` is ``roi_ratio`` scaled).
TESTED_METRICS = (
    "pointing",
    "energy",
    "roi_iou",
    "roi_precision",
    "roi_recall",
    "distractor_share",
    "roi_ratio",
)


@dataclass
class PerImage:
    """The measures of each correctly classified image, what the intervals resample.

    positions: (n,) each image's place in the stream of images read (the same
    archive and limit give the same places for every model); paths, classes:
    its record's path and class; values: method -> (n, len(METRICS)) float64 in
    ``METRICS`` order, NaN where undefined.
    """

    positions: np.ndarray
    paths: list[str]
    classes: list[str]
    values: dict[str, np.ndarray]


@dataclass(frozen=True)
class MethodRow:
    """One method on one class (or ``"all"``): means over correctly classified images.

    images: how many images the row averages over; distractor_images: those of
    them with a distractor and a non-empty ROI (the distractor share's count).
    A mean over no image is None.
    """

    class_name: str
    method: str
    images: int
    roi_pixels: float | None
    roi_ratio: float | None  # percent
    pointing: float | None  # [0, 1]
    roi_precision: float | None  # [0, 1]
    roi_recall: float | None  # [0, 1]
    roi_iou: float | None  # [0, 1]
    energy: float | None  # [0, 1]
    distractor_share: float | None  # [0, 1]
    distractor_images: int


@dataclass(frozen=True)
class ClassSummary:
    """A class's accuracy and its chance levels (over its correctly classified images)."""

    class_name: str
    images: int  # read and labeled (unreadable files are left out)
    correct: int
    accuracy: float | None
    structure_area: float | None  # mean |S| / (H W)
    distractor_area: float | None  # mean |D| / (H W), over images with distractors


@dataclass
class LocalizationReport:
    """Per class and per method localization, with the overall means (``OVERALL``)."""

    archive: str
    model: str
    size: tuple[int, int]  # (height, width) the maps were scored at
    fraction: float
    methods: tuple[str, ...]
    classes: list[ClassSummary]
    rows: list[MethodRow]  # class-major, methods in ``methods`` order
    overall: list[MethodRow]  # one per method, every correct image weighing the same
    totals: ClassSummary  # all classes together (``"all"``)
    unreadable: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    # Per image, what ``infer`` said of it: the same label, calibrated confidence and
    # out-of-set flag a scan stores (``path``, ``truth``, ``correct`` beside them).
    labeled: list[dict[str, Any]] = field(default_factory=list)
    # Every row's figures with their bootstrap intervals (per class and "all"), and the
    # method pairs' tests over all classes; None settings: no statistics drawn.
    settings: StatisticsSettings | None = None
    intervals: list[FigureInterval] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    per_image: PerImage | None = None  # not in the JSON

    def interval(self, class_name: str, method: str, metric: str) -> FigureInterval | None:
        """The interval of one row's measure, if drawn."""
        for i in self.intervals:
            if i.group == class_name and i.method == method and i.metric == metric:
                return i
        return None

    @property
    def images(self) -> int:
        return self.totals.images

    @property
    def correct(self) -> int:
        return self.totals.correct

    @property
    def accuracy(self) -> float | None:
        return self.totals.accuracy

    def row(self, class_name: str, method: str) -> MethodRow:
        """The row of one class (or ``"all"``) and method."""
        for r in self.overall if class_name == OVERALL else self.rows:
            if r.class_name == class_name and r.method == method:
                return r
        raise KeyError((class_name, method))

    def to_dict(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "model": self.model,
            "size": list(self.size),
            "fraction": self.fraction,
            "methods": list(self.methods),
            "maps_over": "correctly classified images",
            "images": self.images,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "classes": [asdict(c) for c in self.classes],
            "totals": asdict(self.totals),
            "rows": [asdict(r) for r in self.rows],
            "overall": [asdict(r) for r in self.overall],
            "unreadable": list(self.unreadable),
            "labeled": list(self.labeled),
            "statistics": statistics_dict(self.settings, "images"),
            "intervals": [asdict(i) for i in self.intervals],
            "comparisons": [asdict(c) for c in self.comparisons],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def statistics_dict(settings: StatisticsSettings | None, over: str) -> dict[str, Any] | None:
    """How the intervals and tests were drawn, as the JSON states it."""
    if settings is None:
        return None
    tests = (
        "McNemar's exact test for the pointing game, paired bootstrap otherwise"
        if over == "images"
        else "two-stage paired bootstrap (models, then images within each)"
    )
    return {
        **asdict(settings),
        "intervals": f"percentile bootstrap over {over}",
        "tests": tests,
        "significant": f"Holm-adjusted p < {settings.alpha}",
    }


class _Sums:
    """Running sums of one (class, method): NaN (undefined) values are left out."""

    def __init__(self) -> None:
        self.sum = dict.fromkeys(METRICS, 0.0)
        self.count = dict.fromkeys(METRICS, 0)

    def add(self, scores: ImageScores) -> None:
        for name in METRICS:
            values = np.asarray(getattr(scores, name), dtype=np.float64)
            defined = ~np.isnan(values)
            self.sum[name] += float(values[defined].sum())
            self.count[name] += int(defined.sum())

    def merge(self, other: _Sums) -> None:
        for name in METRICS:
            self.sum[name] += other.sum[name]
            self.count[name] += other.count[name]

    def row(self, class_name: str, method: str) -> MethodRow:
        means = {
            name: (self.sum[name] / self.count[name] if self.count[name] else None)
            for name in METRICS
        }
        return MethodRow(
            class_name=class_name,
            method=method,
            images=self.count["roi_pixels"],
            distractor_images=self.count["distractor_share"],
            **means,
        )


@dataclass
class _ClassSums:
    images: int = 0
    correct: int = 0
    structure_area: float = 0.0
    with_structures: int = 0
    distractor_area: float = 0.0
    with_distractors: int = 0

    def merge(self, other: _ClassSums) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    def summary(self, name: str) -> ClassSummary:
        return ClassSummary(
            class_name=name,
            images=self.images,
            correct=self.correct,
            accuracy=self.correct / self.images if self.images else None,
            structure_area=(
                self.structure_area / self.with_structures if self.with_structures else None
            ),
            distractor_area=(
                self.distractor_area / self.with_distractors if self.with_distractors else None
            ),
        )


def evaluate_localization(
    archive: Path,
    model: OnnxModel,
    *,
    methods: Sequence[str] | None = None,
    fraction: float = geometry.DISPLAY_FRACTION,
    batch_size: int = 32,
    size: tuple[int, int] = TABLE3_SIZE,
    limit: int | None = None,
    perturbation: perturb.Options | None = None,
    settings: StatisticsSettings | None = StatisticsSettings(),
    layer_maps: LayerMaps | None = None,
) -> LocalizationReport:
    """Label the images of ``archive/ground_truth.jsonl`` and score every method's map
    (``methods``; None: every closed-form one, ``maps.closed_form_methods``).

    The records are streamed in batches of ``batch_size`` (at most ``limit`` of
    them, in file order); each batch is labeled once and its maps computed once
    (``maps.compute_maps``), upsampled to ``size`` = (height, width) and scored
    against the boxes (see the module docstring for every definition). Files
    that cannot be decoded are listed in ``unreadable`` and left out.
    Raises ModlabelError when the archive has no ground truth or names a class
    the model does not know.
    """
    archive = Path(archive)
    gt_path = archive / GROUND_TRUTH_NAME
    if not gt_path.is_file():
        raise ModlabelError(
            f"{gt_path}: no ground truth; localization needs an archive with boxes, "
            "as `modlabel synth` writes"
        )

    def images() -> Iterator[tuple[GroundTruth, str]]:
        for record in read_records(gt_path, limit):
            if record.class_name not in model.info.class_names:
                raise ModlabelError(
                    f"{gt_path}: class {record.class_name!r} of {record.path} is not one of "
                    f"the model's classes {model.info.class_names}"
                )
            yield record, str(archive / record.path)

    return localize_images(
        images(),
        model,
        source=str(archive),
        methods=methods,
        fraction=fraction,
        batch_size=batch_size,
        size=size,
        perturbation=perturbation,
        settings=settings,
        layer_maps=layer_maps,
    )


@dataclass(frozen=True)
class ScoredBatch:
    """The correctly classified images of one batch of ``localize_images``, as scored.

    records, files: the images, in batch order; maps_at_size: method -> (n, H, W)
    float32, each image's map for its class, upsampled to the evaluation size;
    scores: method -> the images' ``ImageScores``.
    """

    records: list[GroundTruth]
    files: list[str]
    maps_at_size: dict[str, np.ndarray]
    scores: dict[str, ImageScores]


def localize_images(
    images: Iterable[tuple[GroundTruth, str]],
    model: OnnxModel,
    *,
    source: str,
    methods: Sequence[str] | None = None,
    fraction: float = geometry.DISPLAY_FRACTION,
    batch_size: int = 32,
    size: tuple[int, int] = TABLE3_SIZE,
    on_batch: Callable[[ScoredBatch], None] | None = None,
    perturbation: perturb.Options | None = None,
    settings: StatisticsSettings | None = StatisticsSettings(),
    layer_maps: LayerMaps | None = None,
) -> LocalizationReport:
    """Label images and score every method's map against their records' boxes.

    images: (record, file to read) pairs, streamed in batches of ``batch_size``;
    a record without boxes still counts in the accuracy and Table 3 (its
    box metrics are undefined and left out of the means). source: what the
    report names as its archive. ``on_batch`` is called with each batch's
    correctly classified images and their maps (``ScoredBatch``), for measures
    of one's own over the same maps. ``perturbation``: how Score-CAM and RISE run, when
    ``methods`` names them. settings: how the bootstrap intervals and the method
    pairs' tests are drawn (None: none). ``layer_maps``: maps scored after the methods'
    (``layer_crm.LayerCrm``: CRM at a layer); a layer-wise-only model scores only those
    unless ``methods`` are named. Otherwise as ``evaluate_localization``.
    """
    if methods is None and model.info.layer_wise_only:
        methods = ()  # no closed-form head: its maps are the layer's
    else:
        methods = maps.closed_form_methods() if methods is None else maps.parse_methods(methods)
    if layer_maps is not None:
        methods = (*methods, *layer_maps.names)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    size_hw = (int(size[0]), int(size[1]))
    if min(size_hw) < 1:
        raise ValueError(f"size must be positive, got {size}")

    info = model.info
    index_of = {name: i for i, name in enumerate(info.class_names)}
    per_class: dict[str, _ClassSums] = {}
    sums: dict[tuple[str, str], _Sums] = {}
    unreadable: list[dict[str, str]] = []
    labeled: list[dict[str, Any]] = []
    per_image = _PerImageLists(methods)

    batch: list[tuple[GroundTruth, np.ndarray, tuple[int, int], str]] = []
    positions: list[int] = []  # each batch item's place in the stream read

    def flush() -> None:
        if batch:
            scored = _score_batch(
                batch, model, methods, fraction, size_hw, index_of, per_class, sums, labeled,
                perturbation, per_image=per_image, positions=positions, layer_maps=layer_maps,
            )  # fmt: skip
            if scored is not None and on_batch is not None:
                on_batch(scored)
            batch.clear()
            positions.clear()

    def checked(items: Iterable[tuple[GroundTruth, str]]) -> Iterator[tuple[GroundTruth, str]]:
        for record, image_path in items:
            if record.class_name not in index_of:
                raise ModlabelError(
                    f"{source}: class {record.class_name!r} of {record.path} is not one of "
                    f"the model's classes {info.class_names}"
                )
            yield record, image_path

    # Read and decoded in isolated workers, exactly as a scan decodes them.
    with image_pool(info.input_size) as pool:
        for position, ((record, image_path), image) in enumerate(
            pool.map(checked(images), lambda item: DecodeRequest(item[1]), window=2 * batch_size)
        ):
            if image.cancelled:
                stopping.check()
            if image.error is not None or image.cancelled:
                reason = image.error or "decoding stopped"
                unreadable.append({"path": record.path, "reason": reason})
                continue
            batch.append((record, image.pixels, image.original_wh, image_path))
            positions.append(position)
            if len(batch) >= batch_size:
                flush()
        flush()

    class_order = [name for name in info.class_names if name in per_class]
    rows = []
    overall = {m: _Sums() for m in methods}
    totals = _ClassSums()
    for name in class_order:
        totals.merge(per_class[name])
        for method in methods:
            s = sums.get((name, method), _Sums())
            rows.append(s.row(name, method))
            overall[method].merge(s)
    table = per_image.table()
    intervals: list[FigureInterval] = []
    comparisons: list[Comparison] = []
    if settings is not None:
        groups = {
            name: np.flatnonzero(np.array(table.classes, dtype=object) == name)
            for name in class_order
        }
        groups[OVERALL] = np.arange(len(table.paths))
        intervals, comparisons = image_statistics(
            table.values, METRICS, groups, tested=TESTED_METRICS, settings=settings
        )
    return LocalizationReport(
        archive=source,
        model=model.identity,
        size=size_hw,
        fraction=float(fraction),
        methods=tuple(methods),
        classes=[per_class[name].summary(name) for name in class_order],
        rows=rows,
        overall=[overall[m].row(OVERALL, m) for m in methods],
        totals=totals.summary(OVERALL),
        unreadable=unreadable,
        labeled=labeled,
        settings=settings,
        intervals=intervals,
        comparisons=comparisons,
        per_image=table,
    )


class _PerImageLists:
    """``PerImage`` as it grows, batch by batch."""

    def __init__(self, methods: Sequence[str]) -> None:
        self.positions: list[int] = []
        self.paths: list[str] = []
        self.classes: list[str] = []
        self.values: dict[str, list[np.ndarray]] = {m: [] for m in methods}

    def add(
        self,
        records: Sequence[GroundTruth],
        positions: Sequence[int],
        scores: dict[str, ImageScores],
    ) -> None:
        self.positions.extend(positions)
        self.paths.extend(r.path for r in records)
        self.classes.extend(r.class_name for r in records)
        for method, s in scores.items():
            self.values.setdefault(method, []).append(
                np.column_stack([np.asarray(getattr(s, k), dtype=np.float64) for k in METRICS])
            )

    def table(self) -> PerImage:
        width = len(METRICS)
        return PerImage(
            positions=np.asarray(self.positions, dtype=np.int64),
            paths=list(self.paths),
            classes=list(self.classes),
            values={
                m: np.concatenate(v) if v else np.empty((0, width)) for m, v in self.values.items()
            },
        )


def _score_batch(
    batch: list[tuple[GroundTruth, np.ndarray, tuple[int, int], str]],
    model: OnnxModel,
    methods: Sequence[str],
    fraction: float,
    size_hw: tuple[int, int],
    index_of: dict[str, int],
    per_class: dict[str, _ClassSums],
    sums: dict[tuple[str, str], _Sums],
    labeled: list[dict[str, Any]],
    perturbation: perturb.Options | None = None,
    *,
    per_image: _PerImageLists | None = None,
    positions: Sequence[int] = (),
    layer_maps: LayerMaps | None = None,
) -> ScoredBatch | None:
    labels = label_pixels(model, np.stack([p for _, p, _, _ in batch]))
    truth = np.array([index_of[r.class_name] for r, _, _, _ in batch])
    correct = labels.top == truth
    for row, ((record, _, _, image_path), ok) in enumerate(zip(batch, correct, strict=True)):
        counts = per_class.setdefault(record.class_name, _ClassSums())
        counts.images += 1
        counts.correct += int(ok)
        labeled.append(
            {"path": image_path, "truth": record.class_name, "correct": bool(ok),
             **describe(labels[row])}
        )  # fmt: skip
    if not correct.any():
        return None

    kept = [item for item, ok in zip(batch, correct, strict=True) if ok]
    area = size_hw[0] * size_hw[1]
    structures, distractors = [], []
    for record, _, decoded_wh, _ in kept:
        # Boxes are in the pixels of the recorded size (the decoded one if absent).
        original_wh = (record.width or decoded_wh[0], record.height or decoded_wh[1])
        structures.append(box_mask(record.boxes, original_wh, size_hw))
        distractors.append(box_mask(record.distractors, original_wh, size_hw))
        counts = per_class[record.class_name]
        if record.boxes:
            counts.structure_area += structures[-1].sum() / area
            counts.with_structures += 1
        if record.distractors:
            counts.distractor_area += distractors[-1].sum() / area
            counts.with_distractors += 1
    s_masks, d_masks = np.stack(structures), np.stack(distractors)

    # The maps of the correctly classified images, for their class (= the predicted one).
    maps_by_method = labels.rows(correct).maps(
        methods, perturbation=perturbation, layer_maps=layer_maps
    )
    names = [record.class_name for record, _, _, _ in kept]
    scored = ScoredBatch(
        records=[record for record, _, _, _ in kept],
        files=[image_path for _, _, _, image_path in kept],
        maps_at_size={},
        scores={},
    )
    for method, method_maps in maps_by_method.items():
        at_size = geometry.upsample(method_maps, size_hw)
        scores = localization_scores(at_size, s_masks, d_masks, fraction=fraction)
        scored.maps_at_size[method] = at_size
        scored.scores[method] = scores
        for name in set(names):
            rows = np.array([n == name for n in names])
            picked = ImageScores(**{k: getattr(scores, k)[rows] for k in METRICS})
            sums.setdefault((name, method), _Sums()).add(picked)
    if per_image is not None:
        kept_at = [at for at, ok in zip(positions, correct, strict=True) if ok]
        per_image.add(scored.records, kept_at, scored.scores)
    return scored


# --------------------------------------------------------------------------
# Several models over one archive.
# --------------------------------------------------------------------------


@dataclass
class PooledLocalization:
    """Localization pooled over independently trained models on one archive.

    models: a label per report (``reports``, in the order given); intervals:
    per method and measure, the mean over models of each model's all-classes
    figure, with a two-stage bootstrap interval (models, then images within
    each); comparisons: the method pairs on each tested measure, from the same
    two-stage bootstrap; model_comparisons: every two models, method by
    method, over the images both classified correctly.
    """

    archive: str
    models: list[str]
    methods: tuple[str, ...]
    settings: StatisticsSettings
    reports: list[LocalizationReport]
    intervals: list[FigureInterval]
    comparisons: list[Comparison]
    model_comparisons: list[Comparison]

    def interval(self, method: str, metric: str) -> FigureInterval | None:
        for i in self.intervals:
            if i.method == method and i.metric == metric:
                return i
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "models": [
                {"label": label, **report.to_dict()}
                for label, report in zip(self.models, self.reports, strict=True)
            ],
            "pooled": {
                "models": list(self.models),
                "methods": list(self.methods),
                "figure": "mean over models of each model's mean over its correctly "
                "classified images",
                "statistics": statistics_dict(self.settings, "models, then images within each"),
                "intervals": [asdict(i) for i in self.intervals],
                "comparisons": [asdict(c) for c in self.comparisons],
                "model_comparisons": [asdict(c) for c in self.model_comparisons],
            },
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def pool_localization(
    reports: Sequence[LocalizationReport],
    models: Sequence[str],
    *,
    settings: StatisticsSettings = StatisticsSettings(),
) -> PooledLocalization:
    """Pool the reports of several models over one archive (``PooledLocalization``).

    reports: from ``localize_images`` or ``evaluate_localization`` of the same
    archive with the same methods, each with its per-image measures
    (``per_image``); models: a label for each. Raises ModlabelError otherwise.
    """
    if not reports or len(reports) != len(models):
        raise ModlabelError("pooling needs at least one report and one label per report")
    methods = reports[0].methods
    tables = []
    for report in reports:
        if report.methods != methods or report.per_image is None:
            raise ModlabelError(
                "the reports to pool must score the same methods and keep their per-image measures"
            )
        if report.archive != reports[0].archive:
            raise ModlabelError(
                f"the reports to pool are of different archives: {reports[0].archive}, "
                f"{report.archive}"
            )
        tables.append(report.per_image)
    values = [t.values for t in tables]
    intervals, comparisons = pooled_statistics(
        values, METRICS, tested=TESTED_METRICS, settings=settings
    )
    between = model_comparisons(
        list(models),
        [t.positions for t in tables],
        values,
        METRICS,
        tested=TESTED_METRICS,
        settings=settings,
    )
    return PooledLocalization(
        archive=reports[0].archive,
        models=list(models),
        methods=tuple(methods),
        settings=settings,
        reports=list(reports),
        intervals=intervals,
        comparisons=comparisons,
        model_comparisons=between,
    )
