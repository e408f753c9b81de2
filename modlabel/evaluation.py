"""Evaluation: a scanned archive against ground truth, the way the paper evaluates.

``modlabel report --truth FILE`` (or ``--truth-from-folders``) adds it to the
report; from Python::

    truth = load_truth("archive/ground_truth.jsonl")
    result = evaluate_truth(engine, store.pick_model(engine), truth, out_dir=Path("report"))

The truth is a ``ground_truth.jsonl`` as ``modlabel synth`` writes (paths
relative to the file's folder, classes and boxes), a CSV with the columns
``path,label`` (paths absolute or relative to the CSV's folder), or the name of
each image's parent folder (``from_folders``). It is joined to the model's
stored rows (files found missing left out) by absolute path: a stored path
that is relative is taken relative to the current folder.

What is computed, on the stored rows that have truth:

* Table 2 from the stored probabilities: accuracy, macro AUC (one-vs-rest),
  macro precision, recall and F1, MCC (``modlabel.metrics``, scikit-learn), a
  confusion matrix and one ROC curve per class (one-vs-rest).
* Eq. 8 as the paper defines it: per class, the average of the stored CRMs of
  the correctly classified images, each divided by its own max
  (``maps.ClassAverage``), with its 70% ROI box (Figure 9).
* The localization of ``modlabel.localize`` (one implementation: the images go
  through ``localize.localize_images``) for CAM, Grad-CAM, CRM and the CAM²
  control, re-running the model the rows were scanned with: Table 3's ROI
  pixels and ratio at 300x300, and, where the truth has boxes, the pointing
  game, the energy-based pointing game, the IoU of the 20% ROI with the boxes,
  the ROI's precision and recall and its share on distractors. Over the
  correctly classified images (of the re-run, the same model), as the paper.
* Figure 6: per class and method, the distribution of the normalized map
  scores: every pixel of each correctly classified image's map at 300x300,
  divided by the map's max (negatives clipped), pooled over the class's images.
  The paper draws the normal curves of their mean and standard deviation; the
  figure draws those and the histograms they summarize.
* Faithfulness (``faithfulness`` = N > 0): deletion and insertion curves (RISE,
  Petsiuk et al. 2018) on a seeded sample of N correctly classified images.
  Each map is upsampled (bilinear) to the model's input and its pixels ranked
  most relevant first (ties in a seeded random order). Deletion replaces the
  ranked pixels, 1/``steps`` of the image per step, by the mean pixel (the
  normalization's zero); insertion starts from a blurred copy (Gaussian,
  sigma = 5/224 of the input's shorter side, RISE's blur at its scale) and puts
  the ranked pixels back. Each step is re-run through onnxruntime and the
  probability of the predicted class recorded; the area under each curve
  (trapezoids over the fraction of pixels, in [0, 1]) is the score: lower for
  deletion and higher for insertion is more faithful. A random order is the
  baseline.

Files, in ``out_dir/evaluation/`` (tables as CSV and JSON, JSON a list of row
objects; figures as PNG): ``evaluation.json`` (everything), ``matching``,
``table2``, ``per_class``, ``confusion_matrix`` (+ ``.png``), ``roc.png``,
``class_maps`` (+ ``.png``), ``localization``, ``localization_classes``,
``map_scores`` (+ ``.png``), and with N > 0 ``faithfulness`` (+ ``.png``) and
``faithfulness_curves``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa
from PIL import Image, ImageFilter
from sqlalchemy.engine import Engine

from . import codec, maps, spreadsheet, store
from .aggregate import ClassMap, class_map_from_sum
from .decode_pool import DecodeRequest, image_pool
from .errors import ModelError, ModlabelError
from .localize import (
    TABLE3_SIZE,
    GroundTruth,
    LocalizationReport,
    ScoredBatch,
    localize_images,
    read_records,
)
from .model import OnnxModel, softmax
from .paths import display_path, from_db

EVAL_METHODS: tuple[str, ...] = ("cam", "gradcam", "crm", "cam_squared")
RANDOM = "random"  # the faithfulness baseline: pixels in a random order
FORMATS = ("csv", "json")
EVALUATION_DIR = "evaluation"
SCORE_BINS = 50  # Figure 6's histograms over [0, 1]
FAITHFULNESS_STEPS = 16
BLUR_SIGMA_AT_224 = 5.0  # RISE's insertion canvas: a Gaussian blur, sigma 5 at 224 px
EXAMPLES = 10  # paths listed of the truth records without a row
# The localization measures against boxes, as the page shows them:
# (``localize.MethodRow`` field, heading, ``localize.ClassSummary`` field of its chance level).
BOX_METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("pointing", "pointing game: hit rate (the map's maximum in a box)", "structure_area"),
    (
        "energy",
        "energy-based pointing game: share of the map's positive mass in the boxes",
        "structure_area",
    ),
    ("roi_iou", "IoU of the ROI with the boxes", None),
    ("roi_precision", "ROI precision: share of the ROI in the boxes", "structure_area"),
    ("roi_recall", "ROI recall: share of the boxes in the ROI", None),
    ("distractor_share", "share of the ROI on text, scale bars, arrows", "distractor_area"),
)

TruthKind = Literal["jsonl", "csv", "folders"]


# --------------------------------------------------------------------------
# The truth.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TruthRecord:
    """One image's truth: its class, and its boxes when the truth file has them."""

    class_name: str
    boxes: GroundTruth | None = None


@dataclass(frozen=True)
class Truth:
    """Ground truth keyed by the absolute path of each file (``file_key``).

    kind "folders" holds no records: an image's class is its parent folder's name.
    """

    source: str
    kind: TruthKind
    records: dict[str, TruthRecord] = field(default_factory=dict)

    @property
    def has_boxes(self) -> bool:
        return self.kind == "jsonl"

    def class_of(self, key: str) -> str | None:
        """The true class of the file ``key`` (``file_key``), None when unknown."""
        if self.kind == "folders":
            return os.path.basename(os.path.dirname(key)) or None
        record = self.records.get(key)
        return record.class_name if record is not None else None


def file_key(path: str | os.PathLike[str]) -> str:
    """How truth and stored rows are joined: the absolute, normalized path."""
    return os.path.abspath(os.fspath(path))


def load_truth(path: str | Path | None, *, from_folders: bool = False) -> Truth:
    """Read ground truth: a ``ground_truth.jsonl``, a CSV ``path,label``, or folder names.

    path: a ``.jsonl`` (records as ``modlabel synth`` writes them, paths relative
    to the file's folder) or a ``.csv`` with a header row naming the columns
    ``path`` and ``label`` (other columns ignored; paths absolute or relative to
    the CSV's folder). Another suffix is read as JSON lines when its first line
    starts with ``{``, else as CSV. from_folders=True: no file (``path`` None);
    an image's class is the name of its parent folder. Raises ModlabelError
    naming the file (and line) when the input is not usable.
    """
    if from_folders:
        if path is not None:
            raise ModlabelError(
                f"{path}: give either a truth file or from_folders (folder names), not both"
            )
        return Truth(source="the name of each image's parent folder", kind="folders")
    if path is None:
        raise ModlabelError(
            "no ground truth: give a ground_truth.jsonl or a CSV with columns path,label, "
            "or take the classes from the folder names"
        )
    path = Path(path)
    if not path.is_file():
        raise ModlabelError(f"{path}: no such truth file")
    try:
        if _is_jsonl(path):
            records = _jsonl_records(path)
            kind: TruthKind = "jsonl"
        else:
            records = _csv_records(path)
            kind = "csv"
    except UnicodeDecodeError:
        raise ModlabelError(f"{path}: not a text file (UTF-8)") from None
    except OSError as exc:
        raise ModlabelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not records:
        raise ModlabelError(f"{path}: holds no truth records")
    return Truth(source=str(path), kind=kind, records=records)


def _is_jsonl(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return True
    if suffix in (".csv", ".txt"):
        return False
    with path.open(encoding="utf-8-sig") as lines:
        for line in lines:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def _add(records: dict[str, TruthRecord], key: str, record: TruthRecord, where: str) -> None:
    known = records.get(key)
    if known is not None and known.class_name != record.class_name:
        raise ModlabelError(
            f"{where}: {key} is given twice, as {known.class_name!r} and {record.class_name!r}"
        )
    records[key] = record


def _jsonl_records(path: Path) -> dict[str, TruthRecord]:
    archive = path.parent
    records: dict[str, TruthRecord] = {}
    for gt in read_records(path):  # ModlabelError with the line number
        _add(records, file_key(archive / gt.path), TruthRecord(gt.class_name, gt), str(path))
    return records


def _csv_records(path: Path) -> dict[str, TruthRecord]:
    base = path.parent
    records: dict[str, TruthRecord] = {}
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        names = [h.strip().lower() for h in header or []]
        if "path" not in names or "label" not in names:
            found = ",".join(header or []) or "nothing"
            raise ModlabelError(
                f"{path}: a truth CSV needs a header row with the columns path,label "
                f"(found {found})"
            )
        at_path, at_label = names.index("path"), names.index("label")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(at_path, at_label):
                raise ModlabelError(f"{where}: expected the columns path,label, got {row}")
            file, label = row[at_path].strip(), row[at_label].strip()
            if not file or not label:
                raise ModlabelError(f"{where}: empty path or label")
            _add(records, file_key(base / file), TruthRecord(label), where)
    return records


# --------------------------------------------------------------------------
# Matching the truth to the stored rows.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """How the truth met the model's stored rows (files found missing left out)."""

    stored_rows: int
    with_truth: int  # stored rows with a truth record
    labeled: int  # of those, labeled: the images of Table 2
    errors: int  # of those, stored with an error (not labeled)
    without_truth: int  # stored rows the truth says nothing about
    truth_records: int | None  # None for folder names
    truth_without_row: int | None
    examples_without_row: list[str]  # the first few, as paths to show
    other_folders: dict[str, int]  # folder names that are no class (from_folders)


@dataclass(frozen=True)
class _Row:
    row_id: int
    stored_path: str
    file: str  # to open
    key: str
    true_class: str


def _match(engine: Engine, model_row: store.ModelRow, truth: Truth) -> tuple[list[_Row], Matching]:
    c = store.images.c
    query = (
        sa.select(c.id, c.path, c.label, c.error)
        .where(c.model_id == model_row.id, c.missing_since.is_(None))
        .order_by(c.path)
        .execution_options(yield_per=2000)
    )
    classes = set(model_row.class_names)
    labeled: list[_Row] = []
    seen: set[str] = set()
    stored = errors = with_truth = 0
    other_folders: Counter[str] = Counter()
    with engine.connect() as conn:
        for row_id, stored_path, label, error in conn.execute(query):
            stored += 1
            file = from_db(stored_path)
            key = file_key(file)
            true_class = truth.class_of(key)
            if true_class is None:
                continue
            if truth.kind == "folders" and true_class not in classes:
                other_folders[true_class] += 1
                continue
            with_truth += 1
            seen.add(key)
            if label is None or error is not None:
                errors += 1
                continue
            labeled.append(_Row(int(row_id), stored_path, file, key, true_class))
    if truth.kind == "folders":
        truth_records = without_row = None
        examples: list[str] = []
    else:
        truth_records = len(truth.records)
        unmatched = [k for k in truth.records if k not in seen]
        without_row = len(unmatched)
        examples = [display_path(k) for k in unmatched[:EXAMPLES]]
    matching = Matching(
        stored_rows=stored,
        with_truth=with_truth,
        labeled=len(labeled),
        errors=errors,
        without_truth=stored - with_truth,
        truth_records=truth_records,
        truth_without_row=without_row,
        examples_without_row=examples,
        other_folders=dict(other_folders.most_common()),
    )
    return labeled, matching


def _stored_scores(
    engine: Engine, rows: Sequence[_Row], class_names: Sequence[str]
) -> tuple[np.ndarray, dict[str, maps.ClassAverage]]:
    """The rows' stored probabilities (N, C), in ``class_names`` order, and per class
    the running average (Eq. 8) of the stored CRMs of its correctly classified rows.

    Read in chunks of ids, so that only the averages' sums stay in memory.
    """
    c = store.images.c
    probs = np.zeros((len(rows), len(class_names)), dtype=np.float64)
    averages: dict[str, maps.ClassAverage] = {}
    with engine.connect() as conn:
        for start in range(0, len(rows), 500):
            at = {r.row_id: start + i for i, r in enumerate(rows[start : start + 500])}
            query = sa.select(c.id, c.probabilities, c.crm, c.label).where(c.id.in_(list(at)))
            for row_id, probabilities, blob, label in conn.execute(query):
                i = at[int(row_id)]
                stored = probabilities or {}
                probs[i] = [float(stored.get(name, 0.0)) for name in class_names]
                true_class = rows[i].true_class
                if label == true_class and blob is not None:
                    averages.setdefault(true_class, maps.ClassAverage()).add(
                        codec.decode_map(bytes(blob))
                    )
    return probs, averages


# --------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MapScores:
    """Figure 6: one class's normalized map scores for one method (pooled pixels)."""

    class_name: str
    method: str
    images: int
    pixels: int
    mean: float | None
    std: float | None
    histogram: list[float]  # density over SCORE_BINS equal bins of [0, 1]


@dataclass(frozen=True)
class FaithfulnessRow:
    """One method's deletion and insertion areas: mean and std over the sample."""

    method: str
    images: int
    deletion_auc: float | None
    deletion_std: float | None
    insertion_auc: float | None
    insertion_std: float | None


@dataclass(frozen=True)
class Faithfulness:
    """Deletion and insertion (RISE) on a seeded sample of correct images."""

    requested: int
    seed: int
    steps: int
    blur_sigma: float  # pixels of the model's input
    images: list[str]  # the sample, as paths to show
    rows: list[FaithfulnessRow]  # one per method, then the random baseline
    curves: dict[str, dict[str, list[float]]]  # method -> deletion/insertion -> mean p


@dataclass
class TruthReport:
    """The evaluation against ground truth; ``truth.html.j2`` shows it.

    class_maps: Eq. 8 as the paper: per class, the mean of the stored CRMs of
    its correctly classified images, each divided by its own max.
    figures: name -> PNG bytes (``figure_src`` gives the data URI).
    files: what was written, relative to ``out_dir``.
    """

    model_identity: str
    truth_source: str
    truth_kind: TruthKind
    has_boxes: bool
    out_dir: Path
    class_names: list[str]
    matching: Matching
    table2: dict[str, Any]
    class_maps: dict[str, ClassMap]
    localization: LocalizationReport
    map_scores: list[MapScores]
    faithfulness: Faithfulness | None
    figures: dict[str, bytes] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    methods: tuple[str, ...] = EVAL_METHODS
    table2_keys: tuple[str, ...] = ("accuracy", "auc", "precision", "recall", "f1", "mcc")
    method_titles: dict[str, str] = field(
        default_factory=lambda: {**maps.TITLES, RANDOM: "random (baseline)"}
    )
    display_percent: int = round(100 * maps.DISPLAY_FRACTION)
    class_roi_percent: int = round(100 * maps.CLASS_ROI_FRACTION)
    score_bins: int = SCORE_BINS
    box_metrics: tuple[tuple[str, str, str | None], ...] = BOX_METRICS

    def figure_src(self, name: str) -> str:
        """A figure as a ``data:image/png;base64`` URI, for a self-contained page."""
        import base64

        return "data:image/png;base64," + base64.b64encode(self.figures[name]).decode("ascii")

    def map_score(self, class_name: str, method: str) -> MapScores | None:
        for row in self.map_scores:
            if row.class_name == class_name and row.method == method:
                return row
        return None

    def title(self, method: str) -> str:
        return self.method_titles.get(method, method)

    def to_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "model": self.model_identity,
                "truth": {"source": self.truth_source, "kind": self.truth_kind},
                "class_names": self.class_names,
                "matching": asdict(self.matching),
                "table2": self.table2,
                "class_maps": [_class_map_row(m) for m in self.class_maps.values()],
                "localization": self.localization.to_dict(),
                "map_scores": {
                    "values": "each pixel of a correctly classified image's map at "
                    f"{TABLE3_SIZE[0]}x{TABLE3_SIZE[1]}, divided by the map's max",
                    "rows": [asdict(r) for r in self.map_scores],
                },
                "faithfulness": asdict(self.faithfulness) if self.faithfulness else None,
                "files": self.files,
            }
        )


def render_truth_html(report: TruthReport) -> str:
    """The ``truth.html.j2`` section alone (the report includes it in its page)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("modlabel", "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    return env.get_template("truth.html.j2").render(truth=report)


def _clean(value: Any) -> Any:
    """JSON-ready: NaN and infinities as None, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _class_map_row(m: ClassMap) -> dict[str, Any]:
    return {
        "class": m.class_name,
        "images": m.image_count,
        "map_shape": list(m.average.shape),
        "roi_box": list(m.roi_box) if m.roi_box is not None else None,
    }


# --------------------------------------------------------------------------
# The evaluation.
# --------------------------------------------------------------------------


def _sklearn() -> tuple[Any, Callable[..., Any]]:
    """``modlabel.metrics`` and ``roc_curve``: scikit-learn, not in the runtime install."""
    try:
        from sklearn.metrics import roc_curve

        from . import metrics
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("sklearn", "scipy", "joblib", "threadpoolctl"):
            raise
        raise ModlabelError(
            "the evaluation against ground truth needs scikit-learn: pip install 'modlabel[eval]'"
        ) from None
    return metrics, roc_curve


def _load_model(model_row: store.ModelRow, model: OnnxModel | None) -> OnnxModel:
    if model is None:
        try:
            model = OnnxModel(model_row.path)
        except ModelError as exc:
            raise ModelError(
                f"the evaluation re-runs the model the images were scanned with, "
                f"{model_row.path}, and cannot load it: {exc}"
            ) from None
    if model.identity != model_row.identity:
        raise ModelError(
            f"{model.path} is not the model the images were scanned with: it is "
            f"{model.identity}, they were labeled by {model_row.identity}"
        )
    return model


def evaluate_truth(
    engine: Engine,
    model_row: store.ModelRow,
    truth: Truth,
    *,
    out_dir: Path,
    faithfulness: int = 0,
    formats: Iterable[str] = FORMATS,
    methods: Sequence[str] = EVAL_METHODS,
    batch_size: int = 32,
    steps: int = FAITHFULNESS_STEPS,
    seed: int = 0,
    model: OnnxModel | None = None,
) -> TruthReport:
    """Evaluate the model's stored labels and maps against ``truth``.

    Writes the tables and figures (PNG) into ``out_dir/evaluation/`` and
    returns them (see the module docstring for every measure and file).
    formats: the tables' formats, among ``FORMATS`` (csv, json); other names
    (the report's own formats, which ``build_report`` passes on) are ignored,
    and where none of csv and json is named, both are written.

    The maps other than the stored CRM need the model: ``model`` if given,
    else ``OnnxModel(model_row.path)``; it must be the model the rows were
    labeled with. faithfulness: how many correctly
    classified images (a sample drawn with ``seed``) get deletion and insertion
    curves of ``steps`` steps; 0 for none. Raises ModlabelError when the truth
    names classes the model lacks, no stored row has truth, scikit-learn is
    missing or the model cannot be loaded.
    """
    metrics, roc_curve = _sklearn()
    formats = [f for f in FORMATS if f in set(formats)] or list(FORMATS)
    if faithfulness < 0 or steps < 1 or batch_size < 1:
        raise ValueError("faithfulness must be >= 0, steps and batch_size >= 1")
    class_names = list(model_row.class_names)
    index_of = {name: i for i, name in enumerate(class_names)}
    foreign = sorted({r.class_name for r in truth.records.values()} - set(class_names))
    if foreign:
        raise ModlabelError(
            f"{truth.source}: classes {foreign} are not the model's classes {class_names}"
        )

    rows, matching = _match(engine, model_row, truth)
    if not rows:
        raise ModlabelError(_no_match_message(engine, model_row, truth, matching))
    model = _load_model(model_row, model)

    # Table 2 from the stored probabilities; Eq. 8 from the stored CRMs of correct rows.
    probs, averages = _stored_scores(engine, rows, class_names)
    y_true = np.array([index_of[r.true_class] for r in rows], dtype=np.int64)
    table2 = metrics.classification_metrics(y_true, probs, class_names)
    class_maps = {
        name: class_map_from_sum(
            name, averages[name].mean() * averages[name].count, averages[name].count
        )
        for name in class_names
        if name in averages
    }

    # The other maps: one pass of the model over the images with truth.
    scores = _ScoreDistributions(methods)
    correct: list[tuple[str, int]] = []

    def collect(batch: ScoredBatch) -> None:
        scores.add(batch)
        correct.extend(
            (file, index_of[record.class_name])
            for record, file in zip(batch.records, batch.files, strict=True)
        )

    localization = localize_images(
        ((_ground_truth(r, truth), r.file) for r in rows),
        model,
        source=truth.source,
        methods=methods,
        batch_size=batch_size,
        on_batch=collect,
    )
    faith = (
        _faithfulness(model, correct, faithfulness, methods, steps, seed, batch_size)
        if faithfulness > 0
        else None
    )

    report = TruthReport(
        model_identity=model_row.identity,
        truth_source=truth.source,
        truth_kind=truth.kind,
        has_boxes=truth.has_boxes,
        out_dir=Path(out_dir) / EVALUATION_DIR,
        class_names=class_names,
        matching=matching,
        table2=table2,
        class_maps=class_maps,
        localization=localization,
        map_scores=scores.rows([n for n in class_names if n in scores.classes]),
        faithfulness=faith,
        methods=tuple(methods),
        table2_keys=tuple(metrics.SUMMARY_KEYS),
    )
    _draw(report, y_true, probs, roc_curve)
    _write(report, formats)
    return report


def _ground_truth(row: _Row, truth: Truth) -> GroundTruth:
    record = truth.records.get(row.key)
    if record is not None and record.boxes is not None:
        return record.boxes
    return GroundTruth(display_path(row.stored_path), row.true_class, None, None, (), ())


def _no_match_message(
    engine: Engine, model_row: store.ModelRow, truth: Truth, matching: Matching
) -> str:
    if matching.with_truth:
        return (
            f"{truth.source}: the {matching.with_truth} stored images with truth all have "
            "errors; nothing to evaluate"
        )
    if truth.kind == "folders":
        folders = ", ".join(list(matching.other_folders)[:5]) or "none"
        return (
            f"no stored image of model {model_row.identity} lies in a folder named after "
            f"one of its classes {model_row.class_names} (folders: {folders})"
        )
    c = store.images.c
    with engine.connect() as conn:
        stored = conn.execute(sa.select(c.path).where(c.model_id == model_row.id).limit(1)).scalar()
    some_truth = next(iter(truth.records), "")
    return (
        f"{truth.source}: none of its {len(truth.records)} paths is a stored image of model "
        f"{model_row.identity} (truth paths look like {display_path(some_truth)}, stored ones "
        f"like {display_path(file_key(from_db(stored))) if stored else 'nothing: none stored'})"
    )


# --------------------------------------------------------------------------
# Figure 6: distributions of the normalized map scores.
# --------------------------------------------------------------------------


class _ScoreDistributions:
    """Running moments and histograms of max-normalized map values, per class and method."""

    def __init__(self, methods: Sequence[str]) -> None:
        self.methods = tuple(methods)
        self.classes: dict[str, int] = {}  # images per class
        self.hist: dict[tuple[str, str], np.ndarray] = {}
        self.moments: dict[tuple[str, str], np.ndarray] = {}  # count, sum, sum of squares

    def add(self, batch: ScoredBatch) -> None:
        names = np.array([r.class_name for r in batch.records])
        for name in set(names.tolist()):
            self.classes[name] = self.classes.get(name, 0) + int((names == name).sum())
        for method in self.methods:
            unit = maps.normalize_unit(batch.maps_at_size[method])
            for name in set(names.tolist()):
                values = unit[names == name].reshape(-1).astype(np.float64)
                bins = np.minimum((values * SCORE_BINS).astype(np.intp), SCORE_BINS - 1)
                key = (name, method)
                hist = np.bincount(bins, minlength=SCORE_BINS)
                moments = np.array([values.size, values.sum(), (values * values).sum()])
                self.hist[key] = self.hist.get(key, 0) + hist
                self.moments[key] = self.moments.get(key, 0) + moments

    def rows(self, class_order: Sequence[str]) -> list[MapScores]:
        out = []
        for name in class_order:
            for method in self.methods:
                n, total, squares = self.moments[(name, method)]
                mean = total / n
                std = math.sqrt(max(squares / n - mean * mean, 0.0))
                density = self.hist[(name, method)] / n * SCORE_BINS
                out.append(
                    MapScores(
                        name,
                        method,
                        self.classes[name],
                        int(n),
                        float(mean),
                        float(std),
                        [float(v) for v in density],
                    )
                )
        return out


# --------------------------------------------------------------------------
# Faithfulness: deletion and insertion (RISE).
# --------------------------------------------------------------------------


def pixel_order(map2d: np.ndarray, size_hw: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """The pixels of the input, most relevant first: (H*W,) flat indices.

    map2d: (h, w), upsampled (bilinear, the decoder's stretch) to ``size_hw``;
    pixels of equal value in a random order drawn from ``rng``.
    """
    values = maps.upsample(np.asarray(map2d, dtype=np.float32), size_hw).reshape(-1)
    return np.lexsort((rng.random(values.size), -values))


def relevance_curves(
    model: OnnxModel,
    pixels: np.ndarray,
    order: np.ndarray,
    class_index: int,
    *,
    blurred: np.ndarray,
    steps: int = FAITHFULNESS_STEPS,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves of one image: two (steps + 1,) arrays of p(class).

    pixels, blurred: (H, W, 3) at the model's input size (pixel values); order:
    ``pixel_order``. Step k has the first round(k H W / steps) pixels of
    ``order`` replaced by the mean pixel (deletion) or, on ``blurred``, put back
    (insertion).
    """
    height, width = pixels.shape[:2]
    n = height * width
    counts = np.rint(np.arange(steps + 1) * n / steps).astype(np.intp)
    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n)
    touched = (rank[None, :] < counts[:, None]).reshape(steps + 1, height, width, 1)
    image = pixels.astype(np.float32)
    mean = np.asarray(model.info.mean, dtype=np.float32)
    stack = np.concatenate(
        [np.where(touched, mean, image), np.where(touched, image, blurred.astype(np.float32))]
    )
    probs = []
    for start in range(0, len(stack), batch_size):
        logits, _ = model.run(model.preprocess(stack[start : start + batch_size]))
        probs.append(softmax(logits.astype(np.float64))[:, class_index])
    p = np.concatenate(probs)
    return p[: steps + 1], p[steps + 1 :]


def curve_area(values: np.ndarray) -> float:
    """Area under a curve sampled at equal steps of [0, 1] (trapezoids)."""
    v = np.asarray(values, dtype=np.float64)
    return float((v.sum() - (v[0] + v[-1]) / 2) / (v.size - 1))


def blur_sigma(size_hw: Sequence[int]) -> float:
    """The insertion canvas's blur: RISE's sigma 5 at 224 px, at the input's scale."""
    return max(1.0, BLUR_SIGMA_AT_224 * min(size_hw) / 224)


def _faithfulness(
    model: OnnxModel,
    correct: Sequence[tuple[str, int]],
    sample: int,
    methods: Sequence[str],
    steps: int,
    seed: int,
    batch_size: int,
) -> Faithfulness:
    info = model.info
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(correct), size=min(sample, len(correct)), replace=False))
    sigma = blur_sigma(info.input_size)
    names = [*methods, RANDOM]
    areas: dict[str, dict[str, list[float]]] = {m: {"deletion": [], "insertion": []} for m in names}
    curves: dict[str, dict[str, list[np.ndarray]]] = {
        m: {"deletion": [], "insertion": []} for m in names
    }
    shown = []
    chosen = [correct[int(i)] for i in picked]
    # Read and decoded in isolated workers, exactly as a scan decodes them.
    with image_pool(info.input_size) as pool:
        decoded = list(pool.map(chosen, lambda item: DecodeRequest(item[0])))
    for (file, class_index), image in decoded:
        if image.pixels is None:
            continue  # changed since the localization pass read it
        pixels = image.pixels
        logits, activations = model.run(model.preprocess(pixels[None]))
        if int(np.argmax(logits[0])) != class_index:
            continue
        shown.append(display_path(file))
        blurred = np.asarray(
            Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=sigma)), np.float32
        )
        by_method = maps.compute_maps(
            activations,
            info.head_weights,
            bias=info.head_bias,
            methods=methods,
            class_index=class_index,
            pooling=info.pooling,
        )
        by_method[RANDOM] = rng.random(activations.shape[1:3])[None].astype(np.float32)
        for method in names:
            order = pixel_order(by_method[method][0], info.input_size, rng)
            deletion, insertion = relevance_curves(
                model,
                pixels,
                order,
                class_index,
                blurred=blurred,
                steps=steps,
                batch_size=batch_size,
            )
            for curve, values in (("deletion", deletion), ("insertion", insertion)):
                areas[method][curve].append(curve_area(values))
                curves[method][curve].append(values)

    def stats(values: list[float]) -> tuple[float | None, float | None]:
        return (float(np.mean(values)), float(np.std(values))) if values else (None, None)

    rows = []
    for method in names:
        d_mean, d_std = stats(areas[method]["deletion"])
        i_mean, i_std = stats(areas[method]["insertion"])
        rows.append(
            FaithfulnessRow(method, len(areas[method]["deletion"]), d_mean, d_std, i_mean, i_std)
        )
    return Faithfulness(
        requested=sample,
        seed=seed,
        steps=steps,
        blur_sigma=sigma,
        images=shown,
        rows=rows,
        curves={
            m: {k: np.mean(v, axis=0).tolist() if v else [] for k, v in c.items()}
            for m, c in curves.items()
        },
    )


# --------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas, no pyplot) and files.
# --------------------------------------------------------------------------

METHOD_COLORS = {
    "cam": "tab:blue",
    "gradcam": "tab:orange",
    "crm": "tab:red",
    "crm_output": "tab:purple",
    "cam_squared": "tab:green",
    RANDOM: "tab:gray",
}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _grid(fig: Any, count: int, columns: int = 4) -> list[Any]:
    rows = max(1, math.ceil(count / columns))
    axes = fig.subplots(rows, min(columns, max(count, 1)), squeeze=False).reshape(-1)
    for ax in axes[count:]:
        ax.set_axis_off()
    return list(axes[:count])


def _draw(report: TruthReport, y_true: np.ndarray, probs: np.ndarray, roc_curve: Any) -> None:
    names = report.class_names
    figures = report.figures

    matrix = np.asarray(report.table2["confusion_matrix"])
    fig = _figure(1.2 + 0.7 * len(names), 1.0 + 0.6 * len(names))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    peak = max(int(matrix.max()), 1)
    for (i, j), v in np.ndenumerate(matrix):
        color = "white" if v > peak / 2 else "black"
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color=color)
    ax.set_title(f"confusion matrix ({report.table2['n']} images)", fontsize=10)
    figures["confusion_matrix"] = _png(fig)

    fig = _figure(6.0, 5.0)
    ax = fig.subplots()
    for c, name in enumerate(names):
        auc = report.table2["per_class"][name]["auc"]
        if auc is None:
            continue  # one-vs-rest undefined: no image of the class, or only its images
        fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
        ax.plot(fpr, tpr, lw=1.3, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curves, one class against the rest", fontsize=10)
    if report.table2["auc_classes"]:
        ax.legend(fontsize=7, loc="lower right")
    figures["roc"] = _png(fig)

    shown = list(report.class_maps.values())
    if not shown:
        return  # no image classified correctly: no class map, no map score, no sample
    fig = _figure(3.0 * min(4, max(len(shown), 1)), 3.0 * max(1, math.ceil(len(shown) / 4)))
    for ax, m in zip(_grid(fig, len(shown)), shown, strict=True):
        ax.imshow(m.average, cmap="jet", vmin=0, vmax=1, interpolation="bilinear")
        if m.roi_box is not None:
            from matplotlib.patches import Rectangle

            x0, y0, x1, y1 = m.roi_box
            corner = (x0 - 0.5, y0 - 0.5)  # cell centers are integers in imshow
            ax.add_patch(Rectangle(corner, x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=2))
        ax.set_title(f"{m.class_name} ({m.image_count})", fontsize=9)
        ax.set_axis_off()
    figures["class_maps"] = _png(fig)

    classes = list(dict.fromkeys(r.class_name for r in report.map_scores))
    fig = _figure(3.2 * min(4, max(len(classes), 1)), 2.8 * max(1, math.ceil(len(classes) / 4)))
    x = np.linspace(0, 1, 201)
    edges = np.linspace(0, 1, SCORE_BINS + 1)
    for ax, name in zip(_grid(fig, len(classes)), classes, strict=True):
        for method in report.methods:
            row = report.map_score(name, method)
            if row is None or row.mean is None:
                continue
            color = METHOD_COLORS.get(method)
            std = max(row.std or 0.0, 1e-6)
            pdf = np.exp(-0.5 * ((x - row.mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
            label = f"{report.title(method)} {row.mean:.2f}±{row.std:.2f}"
            dashed = "--" if method == "gradcam" else "-"  # CAM's twin: show both
            ax.plot(x, pdf, color=color, lw=1.5, ls=dashed, label=label)
            ax.stairs(row.histogram, edges, color=color, lw=0.6, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("normalized map score", fontsize=8)
        ax.legend(fontsize=6)
    figures["map_scores"] = _png(fig)

    if report.faithfulness is not None and report.faithfulness.images:
        faith = report.faithfulness
        fig = _figure(10.0, 4.0)
        axes = fig.subplots(1, 2)
        fractions = np.linspace(0, 1, faith.steps + 1)
        for ax, curve in zip(axes, ("deletion", "insertion"), strict=True):
            for row in faith.rows:
                values = faith.curves[row.method][curve]
                if not values:
                    continue
                area = row.deletion_auc if curve == "deletion" else row.insertion_auc
                ax.plot(
                    fractions,
                    values,
                    color=METHOD_COLORS.get(row.method),
                    ls=":" if row.method == RANDOM else "-",
                    label=f"{report.title(row.method)} (area {area:.3f})",
                )
            ax.set_xlabel(f"fraction of pixels {'removed' if curve == 'deletion' else 'inserted'}")
            ax.set_ylabel("p(predicted class)")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{curve} ({len(faith.images)} images)", fontsize=10)
            ax.legend(fontsize=7)
        figures["faithfulness"] = _png(fig)


def _write_table(
    folder: Path, name: str, rows: list[dict[str, Any]], formats: Sequence[str], files: list[str]
) -> None:
    rows = _clean(rows)
    if "csv" in formats:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with (folder / f"{name}.csv").open("w", encoding="utf-8", newline="") as handle:
            writer = spreadsheet.SafeDictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        files.append(f"{EVALUATION_DIR}/{name}.csv")
    if "json" in formats:
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        files.append(f"{EVALUATION_DIR}/{name}.json")


def _write(report: TruthReport, formats: Sequence[str]) -> None:
    folder = report.out_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_files(report, folder, formats)
    except OSError as exc:
        raise ModlabelError(f"{folder}: cannot write: {exc.strerror or exc}") from None


def _write_files(report: TruthReport, folder: Path, formats: Sequence[str]) -> None:
    files = report.files
    names = report.class_names
    t2 = report.table2
    matching = asdict(report.matching)
    for key in ("examples_without_row", "other_folders"):
        matching[key] = json.dumps(matching[key])  # one cell of a CSV row
    table = [
        ("matching", [matching]),
        ("table2", [{"images": t2["n"], **{k: t2[k] for k in report.table2_keys}}]),
        ("per_class", [{"class": n, **t2["per_class"][n]} for n in names]),
        (
            "confusion_matrix",
            [
                {"true_class": n, **dict(zip(names, row, strict=True))}
                for n, row in zip(names, t2["confusion_matrix"], strict=True)
            ],
        ),
        ("class_maps", [_class_map_row(m) for m in report.class_maps.values()]),
        (
            "localization",
            [asdict(r) for r in report.localization.rows + report.localization.overall],
        ),
        (
            "localization_classes",
            [asdict(c) for c in [*report.localization.classes, report.localization.totals]],
        ),
        (
            "map_scores",
            [{k: v for k, v in asdict(r).items() if k != "histogram"} for r in report.map_scores],
        ),
    ]
    if report.faithfulness is not None:
        faith = report.faithfulness
        table.append(("faithfulness", [asdict(r) for r in faith.rows]))
        table.append(
            (
                "faithfulness_curves",
                [
                    {"method": m, "curve": curve, "step": k, "fraction": k / faith.steps, "p": p}
                    for m, by_curve in faith.curves.items()
                    for curve, values in by_curve.items()
                    for k, p in enumerate(values)
                ],
            )
        )
    for name, rows in table:
        _write_table(folder, name, rows, formats, files)
    for name, png in report.figures.items():
        (folder / f"{name}.png").write_bytes(png)
        files.append(f"{EVALUATION_DIR}/{name}.png")
    if "json" in formats:
        files.append(f"{EVALUATION_DIR}/evaluation.json")
        (folder / "evaluation.json").write_text(
            json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8"
        )


__all__ = [
    "Faithfulness",
    "FaithfulnessRow",
    "MapScores",
    "Matching",
    "Truth",
    "TruthRecord",
    "TruthReport",
    "evaluate_truth",
    "load_truth",
    "render_truth_html",
]
