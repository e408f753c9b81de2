"""Localization report as text: Table 3, then the metrics against the ground-truth boxes.

``evaluation.localization`` computes the numbers (``LocalizationReport``); this module
only lays them out as text grids (rows: methods, columns: classes), so another
face of the same report (an HTML page, say) can be added beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .. import maps
from .localization import OVERALL, LocalizationReport, MethodRow


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
    if report.unreadable:
        lines.append(f"{len(report.unreadable)} unreadable files left out")
    return "\n".join(lines) + "\n"
