"""Explain: label images and draw their maps side by side, like the paper's Figure 5.

For each image: the original, then one overlay per method (CAM, Grad-CAM and
CRM by default), each titled with its ROI ratio at the display threshold (the
measure of Table 3, at the model's input size), under the label and its
confidence. An image that cannot be read gets an error naming it; the others
are still explained. ``explain_roots`` takes folders too, walked as a scan walks
them (``source.walk_files``, the same image filter).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import geometry, maps, overlay, perturb, stopping
from .decode_pool import DecodeRequest, image_pool
from .infer import ImageLabel, LayerMaps, describe, label_pixels
from .model import OnnxModel
from .source import ImageFilter, Unreadable, walk_files

BATCH_SIZE = 16
DISPLAY_PX = 512  # longest side of a panel; the figure need not be full resolution


@dataclass
class ExplainResult:
    """One image's outcome: what ``infer`` says of it and the figure, or the error."""

    path: str
    image: ImageLabel | None = None  # the label, calibrated confidences, out-of-set flag
    figure: Path | None = None
    error: str | None = None
    roi: dict[str, geometry.RoiStats] = field(default_factory=dict)

    @property
    def label(self) -> str | None:
        return self.image.label if self.image is not None else None

    @property
    def confidence(self) -> float | None:
        return self.image.confidence if self.image is not None else None

    @property
    def class_index(self) -> int | None:
        return self.image.class_index if self.image is not None else None

    def to_dict(self) -> dict[str, object]:
        """What the figure shows, as data (``explain --format json``): the same label,
        calibrated confidence and out-of-set flag a scan stores for the image."""
        out: dict[str, object] = {"path": self.path, "error": self.error}
        if self.image is not None:
            out.update(describe(self.image))
            out["probabilities"] = self.image.probabilities
        out["roi"] = {name: {"pixels": r.pixels, "ratio": r.ratio} for name, r in self.roi.items()}
        out["figure"] = str(self.figure) if self.figure is not None else None
        return out


@dataclass
class _Loaded:
    index: int
    pixels: np.ndarray  # (H, W, 3) uint8 at the model's input size
    display: np.ndarray  # (h, w, 3) uint8, the original's geometry, at most DISPLAY_PX


def explain_images(
    paths: Sequence[str | Path],
    model: OnnxModel,
    out_dir: str | Path,
    *,
    methods: Sequence[str] | None = None,
    batch_size: int = BATCH_SIZE,
    perturbation: perturb.Options | None = None,
    layer_maps: LayerMaps | None = None,
) -> list[ExplainResult]:
    """Label each image and write ``out_dir/<stem>.explain.png``; results in input order.
    ``perturbation``: how Score-CAM and RISE run, when ``methods`` names them.
    ``layer_maps``: maps drawn after the methods' (``layer_crm.LayerCrm``: CRM at a layer);
    a layer-wise-only model draws only those unless ``methods`` are named."""
    # None: the registry's defaults; none for a layer-wise-only model (no closed-form head)
    methods = () if methods is None and model.info.layer_wise_only else maps.parse_methods(methods)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [ExplainResult(path=str(p)) for p in paths]
    names = _figure_names(paths)
    with image_pool(model.info.input_size, display_px=DISPLAY_PX) as pool:
        decoded = pool.map(range(len(results)), lambda i: DecodeRequest(results[i].path))
        while batch := list(itertools.islice(decoded, batch_size)):
            loaded = []
            for i, image in batch:
                if image.cancelled:
                    stopping.check()
                if image.error is not None or image.cancelled:
                    results[i].error = image.error or "decoding stopped"
                else:
                    loaded.append(_Loaded(i, image.pixels, image.display))
            if loaded:
                _explain_batch(
                    loaded, model, methods, results, names, out, perturbation, layer_maps
                )
    return results


def explain_roots(
    roots: Sequence[str | Path],
    model: OnnxModel,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    methods: Sequence[str] | None = None,
    image_filter: ImageFilter | None = None,
    batch_size: int = BATCH_SIZE,
    perturbation: perturb.Options | None = None,
    layer_maps: LayerMaps | None = None,
) -> list[ExplainResult]:
    """``explain_images`` of the images under ``roots`` (files or folders), in the order a
    scan walks them (``source.walk_files``: folders sorted, hidden names skipped, the same
    image filter); ``limit``: only the first that many. A file the walk cannot take (gone,
    too large, not a regular file) is a result with its error, in its place."""
    found: list[str | Unreadable] = []
    for entry in walk_files(roots, image_filter=image_filter):
        if limit is not None and len(found) >= limit:
            break
        found.append(entry if isinstance(entry, Unreadable) else entry.path)
    readable = [p for p in found if not isinstance(p, Unreadable)]
    explained = iter(
        explain_images(
            readable,
            model,
            out_dir,
            methods=methods,
            batch_size=batch_size,
            perturbation=perturbation,
            layer_maps=layer_maps,
        )
    )
    return [
        ExplainResult(path=p.path, error=p.reason) if isinstance(p, Unreadable) else next(explained)
        for p in found
    ]


def _explain_batch(
    loaded: list[_Loaded],
    model: OnnxModel,
    methods: Sequence[str],
    results: list[ExplainResult],
    names: list[str],
    out: Path,
    perturbation: perturb.Options | None = None,
    layer_maps: LayerMaps | None = None,
) -> None:
    labels = label_pixels(model, np.stack([item.pixels for item in loaded]))
    maps_by_method = labels.maps(methods, perturbation=perturbation, layer_maps=layer_maps)
    for row, item in enumerate(loaded):
        result = results[item.index]
        result.image = labels[row]
        per_method = {name: m[row] for name, m in maps_by_method.items()}
        result.roi = {
            name: geometry.roi_stats(m, model.info.input_size) for name, m in per_method.items()
        }
        result.figure = out / names[item.index]
        figure_png(item.display, per_method, result, result.figure)


def _figure_names(paths: Sequence[str | Path]) -> list[str]:
    """``<stem>.explain.png``, numbered where two images share a stem."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = Path(p).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        suffix = "" if seen[stem] == 1 else f"-{seen[stem]}"
        names.append(f"{stem}{suffix}.explain.png")
    return names


def figure_png(
    image_rgb: np.ndarray,
    per_method: dict[str, np.ndarray],
    result: ExplainResult,
    path: Path,
) -> None:
    """Write the figure: the image, then each method's overlay (h, w) -> PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = image_rgb.shape[:2]
    panels = 1 + len(per_method)
    panel_w = 3.0
    # Constrained layout leaves room for the colour bar (tight_layout cannot place one).
    fig = Figure(
        figsize=(panel_w * panels, panel_w * height / width + 1.3), dpi=100, layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(image_rgb)
    axes[0].set_title("image", fontsize=10)
    for ax, (name, m) in zip(axes[1:], per_method.items(), strict=True):
        ax.imshow(overlay.overlay(image_rgb, m))
        ratio = result.roi[name].ratio if name in result.roi else None
        title = maps.title(name)
        ax.set_title(f"{title}  ROI {ratio:.1%}" if ratio is not None else title, fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    image = result.image
    heading = f"{Path(result.path).name}: {image.label} ({image.confidence:.1%}); then " \
        f"{image.runner_up} ({image.runner_up_probability:.1%})"  # fmt: skip
    if image.out_of_set:
        # The scan flags this image too: say so where it is seen, not only in the database.
        heading += f"\nOUT OF SET (score {image.ood_score:.4g}): likely none of the classes"
    fig.suptitle(heading, fontsize=11, color="#b00020" if image.out_of_set else "black")
    if per_method:
        _add_colorbar(fig, list(axes[1:]))
    fig.savefig(path, format="png")


def _add_colorbar(fig: Any, axes: list[Any]) -> None:
    """The overlays' colour bar under their panels: 0 to 1 of each map's own max, faded
    below the display threshold, where the overlay leaves the image uncoloured."""
    from matplotlib import cm, colors

    mappable = cm.ScalarMappable(colors.Normalize(0.0, 1.0), cmap=overlay.DEFAULT_CMAP)
    bar = fig.colorbar(
        mappable, ax=axes, orientation="horizontal", fraction=0.05, shrink=0.6, ticks=[0, 1]
    )
    bar.set_label(overlay.COLORBAR_LABEL, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    bar.ax.axvspan(0.0, geometry.DISPLAY_FRACTION, color="white", alpha=0.7, lw=0)
