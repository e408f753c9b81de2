"""What an evaluation found (``TruthReport``), as a page section and as files."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import geometry, maps, spreadsheet
from ..errors import ModlabelError
from ..store import ClassMap
from .localization import TABLE3_SIZE, TESTED_METRICS, LocalizationReport
from .matching import Matching
from .significance import Comparison, FigureInterval, StatisticsSettings
from .tables import MEASURES, comparison_sentences, format_interval, statistics_note
from .truth import TruthKind

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


FAITHFULNESS_METRICS = ("deletion_auc", "insertion_auc")
FAITHFULNESS_SAMPLE = "sample"  # the group name of the faithfulness intervals


@dataclass(frozen=True)
class Faithfulness:
    """Deletion and insertion (RISE) on a seeded sample of correct images.

    intervals: each method's mean areas (``FAITHFULNESS_METRICS``) with their
    bootstrap intervals over the sample's images; comparisons: every two
    methods (the random baseline among them) on each area, a paired bootstrap
    over the same images, Holm-adjusted over the pairs of each area.
    """

    requested: int
    seed: int
    steps: int
    blur_sigma: float  # pixels of the model's input
    images: list[str]  # the sample, as paths to show
    rows: list[FaithfulnessRow]  # one per method, then the random baseline
    curves: dict[str, dict[str, list[float]]]  # method -> deletion/insertion -> mean p
    settings: StatisticsSettings | None = None
    intervals: list[FigureInterval] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    def interval_text(self, method: str, metric: str) -> str:
        """``0.123 [0.101, 0.145]``, or ``-``."""
        found = next((i for i in self.intervals if i.method == method and i.metric == metric), None)
        return format_interval(found, MEASURES[metric][1])


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

    methods: tuple[str, ...] = field(default_factory=maps.default_methods)
    table2_keys: tuple[str, ...] = ("accuracy", "auc", "precision", "recall", "f1", "mcc")
    method_titles: dict[str, str] = field(
        default_factory=lambda: {
            **{name: m.title for name, m in maps.METHODS.items()},
            RANDOM: "random (baseline)",
        }
    )
    display_percent: int = round(100 * geometry.DISPLAY_FRACTION)
    class_roi_percent: int = round(100 * geometry.CLASS_ROI_FRACTION)
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

    # The intervals and paired tests, in the words of ``modlabel localize`` (tables).
    tested_metrics: tuple[str, ...] = TESTED_METRICS

    def measure_title(self, metric: str) -> str:
        return MEASURES[metric][0]

    def interval_text(self, method: str, metric: str) -> str:
        """A figure over all classes with its interval: ``0.89 [0.83, 0.94]``."""
        return format_interval(
            self.localization.interval("all", method, metric), MEASURES[metric][1]
        )

    def localization_note(self) -> str:
        loc = self.localization
        if loc.settings is None:
            return ""
        pairs = len(loc.methods) * (len(loc.methods) - 1) // 2
        return statistics_note(loc.settings, "the correctly classified images", pairs)

    def localization_sentences(self) -> list[str]:
        return comparison_sentences(self.localization.comparisons)

    def faithfulness_note(self) -> str:
        faith = self.faithfulness
        if faith is None or faith.settings is None:
            return ""
        pairs = len(faith.rows) * (len(faith.rows) - 1) // 2
        s = faith.settings
        return (
            f"{s.level:.0%} percentile bootstrap intervals over the sample's images "
            f"({s.resamples} resamples, seed {s.seed}); every two rankings compared by a "
            f"paired bootstrap over the same images, p-values Holm-adjusted over the {pairs} "
            f"pairs of each area; significant: Holm-adjusted p < {s.alpha:g}."
        )

    def faithfulness_sentences(self) -> list[str]:
        return comparison_sentences(self.faithfulness.comparisons) if self.faithfulness else []

    def to_dict(self) -> dict[str, Any]:
        return json_ready(
            {
                "model": self.model_identity,
                "truth": {"source": self.truth_source, "kind": self.truth_kind},
                "class_names": self.class_names,
                "matching": asdict(self.matching),
                "table2": self.table2,
                "class_maps": [class_map_row(m) for m in self.class_maps.values()],
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


def json_ready(value: Any) -> Any:
    """JSON-ready: NaN and infinities as None, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def class_map_row(m: ClassMap) -> dict[str, Any]:
    return {
        "class": m.class_name,
        "images": m.image_count,
        "map_shape": list(m.average.shape),
        "roi_box": list(m.roi_box) if m.roi_box is not None else None,
    }


def _write_table(
    folder: Path, name: str, rows: list[dict[str, Any]], formats: Sequence[str], files: list[str]
) -> None:
    rows = json_ready(rows)
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


def write_files(report: TruthReport, formats: Sequence[str]) -> None:
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
        ("class_maps", [class_map_row(m) for m in report.class_maps.values()]),
        (
            "localization",
            [asdict(r) for r in report.localization.rows + report.localization.overall],
        ),
        (
            "localization_classes",
            [asdict(c) for c in [*report.localization.classes, report.localization.totals]],
        ),
        ("localization_intervals", [asdict(i) for i in report.localization.intervals]),
        ("localization_tests", [asdict(c) for c in report.localization.comparisons]),
        (
            "map_scores",
            [{k: v for k, v in asdict(r).items() if k != "histogram"} for r in report.map_scores],
        ),
    ]
    if report.faithfulness is not None:
        faith = report.faithfulness
        table.append(("faithfulness", [asdict(r) for r in faith.rows]))
        table.append(("faithfulness_intervals", [asdict(i) for i in faith.intervals]))
        table.append(("faithfulness_tests", [asdict(c) for c in faith.comparisons]))
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
