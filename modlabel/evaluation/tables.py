"""Localization report as text: Table 3, then the metrics against the ground-truth boxes.

``evaluation.localization`` computes the numbers (``LocalizationReport``); this module
only lays them out as text grids (rows: methods, columns: classes), so another
face of the same report (an HTML page, say) can be added beside it. The sentences
that say which differences between methods (or models) are significant are made
here once (``comparison_sentences``), for the text and the report's page alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .. import maps
from .localization import (
    OVERALL,
    TESTED_METRICS,
    LocalizationReport,
    MethodRow,
    PooledLocalization,
)
from .significance import Comparison, FigureInterval, StatisticsSettings


def _header_lines(name: str) -> list[str]:
    return name.split("_")


def _grid(columns: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    """A text grid: a first column of row labels, then ``columns`` (names wrapped
    at underscores); a row with no cells is a section title."""
    heads = [_header_lines(c) for c in columns]
    depth = max(len(h) for h in heads)
    label_w = max([len(label) for label, _ in rows if _] + [6])
    widths = [
        max([len(part) for part in h] + [len(cells[i]) for _, cells in rows if cells])
        for i, h in enumerate(heads)
    ]
    lines = []
    for level in range(depth):
        parts = [h[level] if level < len(h) else "" for h in heads]
        lines.append(
            " " * label_w + "  " + "  ".join(p.rjust(w) for p, w in zip(parts, widths, strict=True))
        )
    lines.append("-" * (label_w + sum(w + 2 for w in widths)))
    for label, cells in rows:
        if not cells:
            lines.append(label)
            continue
        lines.append(
            label.ljust(label_w)
            + "  "
            + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
        )
    return [line.rstrip() for line in lines]


def _fmt_rate(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _fmt_roi(row: MethodRow) -> str:
    if row.roi_pixels is None or row.roi_ratio is None:
        return "-"
    return f"{row.roi_pixels:,.0f} ({row.roi_ratio:.1f})"


# (heading, MethodRow field, ClassSummary field of its chance level, decimals);
# distractors cover about 1% of an image, hence three decimals.
LOCALIZATION_SECTIONS = (
    (
        "pointing game: hit rate (the map's max inside a structure box)",
        "pointing",
        "structure_area",
        2,
    ),
    (
        "ROI precision: share of the ROI inside structure boxes",
        "roi_precision",
        "structure_area",
        2,
    ),
    ("ROI recall: share of the structure-box pixels inside the ROI", "roi_recall", None, 2),
    (
        "distractor share: share of the ROI on text, scale bars, arrows",
        "distractor_share",
        "distractor_area",
        3,
    ),
)


# How the intervals' table and the sentences name each measure, and its decimals.
MEASURES: dict[str, tuple[str, int]] = {
    "pointing": ("pointing game", 2),
    "energy": ("energy", 2),
    "roi_iou": ("IoU", 2),
    "roi_precision": ("ROI precision", 2),
    "roi_recall": ("ROI recall", 2),
    "distractor_share": ("distractor share", 3),
    "roi_ratio": ("ROI ratio (%)", 1),
    "deletion_auc": ("deletion area", 3),
    "insertion_auc": ("insertion area", 3),
}
# The chance level beside a measure in the intervals' table (``ClassSummary`` field).
CHANCE_OF = {
    "pointing": "structure_area",
    "energy": "structure_area",
    "roi_precision": "structure_area",
    "distractor_share": "distractor_area",
}


def measure_name(metric: str) -> str:
    return MEASURES.get(metric, (metric, 2))[0]


def format_interval(interval: FigureInterval | None, digits: int) -> str:
    """``0.89 [0.83, 0.94]``; ``-`` where there is no figure."""
    found = interval.interval() if interval is not None else None
    return "-" if found is None else found.text(digits)


def format_p(p: float | None) -> str:
    if p is None:
        return "-"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}" if p < 0.01 else f"= {p:.2f}"


def _digits_for(digits: int, *values: float | None) -> int:
    """``digits``, or more where every value would round to 0 but one is not 0: a
    difference of 0.0004 shows as +0.0004, not +0.00 (at most 6 decimals)."""
    largest = max((abs(v) for v in values if v is not None), default=0.0)
    if largest == 0 or largest >= 0.5 * 10.0**-digits:
        return digits
    return min(6, 1 - math.floor(math.log10(largest)))


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def _side(name: str) -> str:
    return maps.title(name)


def comparison_sentences(comparisons: Sequence[Comparison]) -> list[str]:
    """One sentence per pair (of methods, or of models on one method): each measure's
    difference with its interval and p, and whether it is significant, e.g.
    ``CRM vs CAM: pointing game -0.04 [-0.10, 0.02], p = 0.31, not significant; ...``.
    Significant means Holm-adjusted p below alpha (``Comparison.significant``); where
    the adjustment changes p, it is given too (``Holm p``)."""
    pairs: dict[tuple[str, str, str | None], list[Comparison]] = {}
    for c in comparisons:
        pairs.setdefault((c.first, c.second, c.method), []).append(c)
    sentences = []
    for (first, second, method), found in pairs.items():
        parts = []
        for c in found:
            digits = _digits_for(
                MEASURES.get(c.metric, (c.metric, 2))[1], c.difference, c.low, c.high
            )
            if c.difference is None:
                parts.append(f"{measure_name(c.metric)} undefined")
                continue
            low = "-" if c.low is None else f"{c.low:.{digits}f}"
            high = "-" if c.high is None else f"{c.high:.{digits}f}"
            holm = (
                f" (Holm p {format_p(c.p_holm)})"
                if c.p_holm is not None and c.p_holm != c.p_value
                else ""
            )
            verdict = "significant" if c.significant else "not significant"
            parts.append(
                f"{measure_name(c.metric)} {_signed(c.difference, digits)} [{low}, {high}], "
                f"p {format_p(c.p_value)}{holm}, {verdict}"
            )
        head = (
            f"{first} vs {second}, {_side(method)}"
            if method
            else f"{_side(first)} vs {_side(second)}"
        )
        sentences.append(f"{head}: " + "; ".join(parts) + ".")
    return sentences


def statistics_note(settings: StatisticsSettings, over: str, families: int) -> str:
    """The sentence that states how the intervals and tests were drawn."""
    return (
        f"{settings.level:.0%} percentile bootstrap intervals over {over} ({settings.resamples} "
        f"resamples, seed {settings.seed}). Paired tests: McNemar's exact test for the "
        "pointing game, a paired bootstrap for the other measures; p-values Holm-adjusted "
        f"over the {families} pairs of each measure; significant: Holm-adjusted p < "
        f"{settings.alpha:g}." + resolution_note(settings, families)
    )


def resolution_note(settings: StatisticsSettings, families: int) -> str:
    """A warning where the bootstrap is too coarse for Holm's adjustment over ``families``
    pairs: its smallest p is 2 / (B + 1), so with B resamples no bootstrap p adjusted over m
    pairs falls below 2 m / (B + 1); below alpha it needs B >= 2 m / alpha (3,120 for the
    78 pairs of 13 methods at 5%). Empty where B suffices."""
    floor = 2 * families / (settings.resamples + 1)
    if families < 2 or floor < settings.alpha:
        return ""
    needed = math.ceil(2 * families / settings.alpha)
    return (
        f" With {families} pairs, {settings.resamples} resamples cannot give a Holm-adjusted "
        f"bootstrap p below {floor:.2f}: no bootstrap difference can be significant at "
        f"{settings.alpha:g}; ask for --resamples {needed} or more."
    )


def _interval_grid(
    methods: Sequence[str],
    interval: Callable[[str, str], FigureInterval | None],
    chance: Callable[[str], float | None] | None,
) -> list[str]:
    """Rows: the tested measures; columns: the methods (and the chance level)."""
    columns = [maps.title(m) for m in methods] + (["chance"] if chance else [])
    rows = []
    for metric in TESTED_METRICS:
        name, digits = MEASURES[metric]
        cells = [format_interval(interval(m, metric), digits) for m in methods]
        if chance:
            cells.append(_fmt_rate(chance(metric), digits))
        rows.append((name, cells))
    return _grid([c.replace("_", " ") for c in columns], rows)


def format_statistics(report: LocalizationReport) -> list[str]:
    """The all-classes figures with their intervals, then a sentence per method pair."""
    if report.settings is None:
        return []
    totals = report.totals

    def chance(metric: str) -> float | None:
        field = CHANCE_OF.get(metric)
        return getattr(totals, field) if field else None

    pairs = len(report.methods) * (len(report.methods) - 1) // 2
    lines = [
        "",
        f"All classes, with intervals over the {report.correct} correctly classified images",
    ]
    lines += _interval_grid(report.methods, lambda m, k: report.interval(OVERALL, m, k), chance)
    lines.append(statistics_note(report.settings, "images", pairs))
    lines += comparison_sentences(report.comparisons)
    return lines


def format_pooled(pooled: PooledLocalization) -> str:
    """Several models: the pooled figures with their intervals, a sentence per method
    pair, then a sentence per two models and method."""
    settings = pooled.settings
    pairs = len(pooled.methods) * (len(pooled.methods) - 1) // 2
    lines = [
        f"Pooled over {len(pooled.models)} models ({', '.join(pooled.models)}): each figure "
        "is the mean over models of each model's mean over its correctly classified images.",
    ]
    lines += _interval_grid(pooled.methods, pooled.interval, None)
    lines.append(
        f"{settings.level:.0%} two-stage bootstrap intervals ({settings.resamples} resamples, "
        f"seed {settings.seed}): the models resampled, then the images within each. Paired "
        "tests from the same two-stage bootstrap of the per-image differences; p-values "
        f"Holm-adjusted over the {pairs} pairs of each measure; significant: Holm-adjusted "
        f"p < {settings.alpha:g}." + resolution_note(settings, pairs)
    )
    lines += comparison_sentences(pooled.comparisons)
    if pooled.model_comparisons:
        lines += [
            "",
            "Model against model, method by method, over the images both classified "
            "correctly (McNemar's exact test for the pointing game, a paired bootstrap "
            "otherwise; Holm-adjusted over the model pairs and methods of each measure):",
        ]
        lines += comparison_sentences(pooled.model_comparisons)
    return "\n".join(lines) + "\n"


def format_report(report: LocalizationReport) -> str:
    """Table 3 (rows: methods, columns: classes, cells "pixels (ratio%)"), then the
    localization metrics against the ground-truth boxes in the same layout."""
    summaries = [*report.classes, report.totals]
    columns = [c.class_name for c in summaries]
    height, width = report.size

    def cells(method: str, fmt: Callable[[MethodRow], str]) -> list[str]:
        return [fmt(report.row(name, method)) for name in columns]

    def title(method: str) -> str:
        return maps.title(method)

    lines = [
        f"{report.archive}: {report.images} images, {report.correct} correctly classified "
        f"(accuracy {_fmt_rate(report.accuracy)}), model {report.model}",
        f"Maps at {height}x{width} pixels; ROI = values above {report.fraction:.0%} of the "
        "map's max. Map statistics are means over correctly classified images only.",
        "",
        "Table 3: mean ROI pixels (ratio %)",
    ]
    table3 = [("correct", [f"{c.correct}/{c.images}" for c in summaries])]
    table3 += [(title(m), cells(m, _fmt_roi)) for m in report.methods]
    lines += _grid(columns, table3)
    cam = report.row(OVERALL, "cam").roi_pixels if "cam" in report.methods else None
    if cam:
        changes = [
            f"{title(m)} {100 * (pixels / cam - 1):+.1f}%"
            for m in report.methods
            if m != "cam" and (pixels := report.row(OVERALL, m).roi_pixels) is not None
        ]
        lines.append("ROI size against CAM's (all images): " + ", ".join(changes))

    localization: list[tuple[str, list[str]]] = []
    for heading, metric, chance, digits in LOCALIZATION_SECTIONS:
        localization.append((heading, []))
        localization += [
            (
                "  " + title(m),
                cells(m, lambda row, k=metric, d=digits: _fmt_rate(getattr(row, k), d)),
            )
            for m in report.methods
        ]
        if chance:
            localization.append(
                ("  chance (box area)", [_fmt_rate(getattr(c, chance), digits) for c in summaries])
            )
    lines += ["", "Localization against the ground-truth boxes"]
    lines += _grid(columns, localization)
    lines += format_statistics(report)
    if report.unreadable:
        lines.append(f"{len(report.unreadable)} unreadable files left out")
    return "\n".join(lines) + "\n"
