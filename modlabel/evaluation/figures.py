"""The evaluation's figures (matplotlib's Agg canvas, no pyplot)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from .. import maps
from .results import RANDOM, SCORE_BINS, TruthReport

# --------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas, no pyplot) and files.
# --------------------------------------------------------------------------


def method_colour(name: str) -> str | None:
    """A method's line colour (the registry's; grey for the random baseline)."""
    if name == RANDOM:
        return "tab:gray"
    method = maps.METHODS.get(name)
    return method.colour if method is not None else None


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


def draw_figures(
    report: TruthReport, y_true: np.ndarray, probs: np.ndarray, roc_curve: Any
) -> None:
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
            color = method_colour(method)
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
                    color=method_colour(row.method),
                    ls=":" if row.method == RANDOM else "-",
                    label=f"{report.title(row.method)} (area {area:.3f})",
                )
            ax.set_xlabel(f"fraction of pixels {'removed' if curve == 'deletion' else 'inserted'}")
            ax.set_ylabel("p(predicted class)")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{curve} ({len(faith.images)} images)", fontsize=10)
            ax.legend(fontsize=7)
        figures["faithfulness"] = _png(fig)
