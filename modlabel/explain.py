"""Explain: label images and draw their maps side by side, like the paper's Figure 5.

For each image: the original, then one overlay per method (CAM, Grad-CAM and
CRM by default), each titled with its ROI ratio at the display threshold (the
measure of Table 3, at the model's input size), under the label and its
confidence. An image that cannot be read gets an error naming it; the others
are still explained.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import maps, overlay, stopping
from .decode_pool import DecodeRequest, image_pool
from .model import OnnxModel, softmax

DEFAULT_METHODS = ("cam", "gradcam", "crm")
BATCH_SIZE = 16
DISPLAY_PX = 512  # longest side of a panel; the figure need not be full resolution


@dataclass
class ExplainResult:
    """One image's outcome: the label and the figure, or the error."""

    path: str
    label: str | None = None
    confidence: float | None = None
    figure: Path | None = None
    error: str | None = None
    class_index: int | None = None
    roi: dict[str, maps.RoiStats] = field(default_factory=dict)


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
    methods: Sequence[str] = DEFAULT_METHODS,
    batch_size: int = BATCH_SIZE,
) -> list[ExplainResult]:
    """Label each image and write ``out_dir/<stem>.explain.png``; results in input order."""
    unknown = [m for m in methods if m not in maps.METHODS]
    if unknown:
        raise ValueError(f"unknown map methods {unknown}; known: {sorted(maps.METHODS)}")
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
                _explain_batch(loaded, model, methods, results, names, out)
    return results


def _explain_batch(
    loaded: list[_Loaded],
    model: OnnxModel,
    methods: Sequence[str],
    results: list[ExplainResult],
    names: list[str],
    out: Path,
) -> None:
    batch = model.preprocess(np.stack([item.pixels for item in loaded]))
    logits, activations = model.run(batch)
    probs = softmax(logits)
    maps_by_method = maps.compute_maps(
        activations,
        model.info.head_weights,
        bias=model.info.head_bias,
        methods=methods,
        logits=logits,
        pooling=model.info.pooling,
    )
    for row, item in enumerate(loaded):
        result = results[item.index]
        c = int(np.argmax(logits[row]))
        result.class_index = c
        result.label = model.info.class_names[c]
        result.confidence = float(probs[row, c])
        per_method = {name: m[row] for name, m in maps_by_method.items()}
        result.roi = {
            name: maps.roi_stats(m, model.info.input_size) for name, m in per_method.items()
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
    fig = Figure(figsize=(panel_w * panels, panel_w * height / width + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(image_rgb)
    axes[0].set_title("image", fontsize=10)
    for ax, (name, m) in zip(axes[1:], per_method.items(), strict=True):
        ax.imshow(overlay.overlay(image_rgb, m))
        ratio = result.roi[name].ratio if name in result.roi else None
        title = maps.TITLES.get(name, name)
        ax.set_title(f"{title}  ROI {ratio:.1%}" if ratio is not None else title, fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{Path(result.path).name}: {result.label} ({result.confidence:.1%})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
