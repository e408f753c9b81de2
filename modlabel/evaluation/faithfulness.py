"""Faithfulness: deletion and insertion curves (RISE, Petsiuk et al. 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from .. import geometry, perturb
from ..decode_pool import DecodeRequest, image_pool
from ..infer import label_pixels
from ..model import OnnxModel
from ..paths import display_path
from .results import (
    BLUR_SIGMA_AT_224,
    FAITHFULNESS_METRICS,
    FAITHFULNESS_SAMPLE,
    FAITHFULNESS_STEPS,
    RANDOM,
    Faithfulness,
    FaithfulnessRow,
)
from .significance import Comparison, FigureInterval, StatisticsSettings, image_statistics

# --------------------------------------------------------------------------
# Faithfulness: deletion and insertion (RISE).
# --------------------------------------------------------------------------


def pixel_order(map2d: np.ndarray, size_hw: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """The pixels of the input, most relevant first: (H*W,) flat indices.

    map2d: (h, w), upsampled (bilinear, the decoder's stretch) to ``size_hw``;
    pixels of equal value in a random order drawn from ``rng``.
    """
    values = geometry.upsample(np.asarray(map2d, dtype=np.float32), size_hw).reshape(-1)
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
        # The calibrated probability, as every command gives it (modlabel.infer).
        labels = label_pixels(model, stack[start : start + batch_size])
        probs.append(labels.probabilities[:, class_index])
    p = np.concatenate(probs)
    return p[: steps + 1], p[steps + 1 :]


def curve_area(values: np.ndarray) -> float:
    """Area under a curve sampled at equal steps of [0, 1] (trapezoids)."""
    v = np.asarray(values, dtype=np.float64)
    return float((v.sum() - (v[0] + v[-1]) / 2) / (v.size - 1))


def blur_sigma(size_hw: Sequence[int]) -> float:
    """The insertion canvas's blur: RISE's sigma 5 at 224 px, at the input's scale."""
    return max(1.0, BLUR_SIGMA_AT_224 * min(size_hw) / 224)


def faithfulness_test(
    model: OnnxModel,
    correct: Sequence[tuple[str, int]],
    sample: int,
    methods: Sequence[str],
    steps: int,
    seed: int,
    batch_size: int,
    settings: StatisticsSettings | None = None,
    perturbation: perturb.Options | None = None,
) -> Faithfulness:
    """Deletion and insertion areas of every method and the random ranking on a
    seeded sample of ``sample`` of the ``correct`` (file, class index) images, with
    bootstrap intervals over the sample and paired tests of every two rankings
    (``settings``; default: ``StatisticsSettings(seed=seed)``). ``perturbation``: how
    Score-CAM and RISE run, when ``methods`` names them."""
    settings = settings if settings is not None else StatisticsSettings(seed=seed)
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
        labels = label_pixels(model, pixels[None])
        if int(labels.top[0]) != class_index:
            continue
        shown.append(display_path(file))
        blurred = np.asarray(
            Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=sigma)), np.float32
        )
        by_method = labels.maps(methods, class_index=class_index, perturbation=perturbation)
        by_method[RANDOM] = rng.random(labels.activations.shape[1:3])[None].astype(np.float32)
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
    intervals: list[FigureInterval] = []
    comparisons: list[Comparison] = []
    if shown:
        # Per image (rows, in the sample's order) and ranking: its two areas.
        per_image = {
            m: np.column_stack([areas[m]["deletion"], areas[m]["insertion"]]) for m in names
        }
        intervals, comparisons = image_statistics(
            per_image,
            FAITHFULNESS_METRICS,
            {FAITHFULNESS_SAMPLE: np.arange(len(shown))},
            tested=FAITHFULNESS_METRICS,
            settings=settings,
            compare_in=FAITHFULNESS_SAMPLE,
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
        settings=settings,
        intervals=intervals,
        comparisons=comparisons,
    )
