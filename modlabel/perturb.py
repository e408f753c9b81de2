"""Forward-pass maps: Score-CAM and RISE, which mask the input and run the model again.

The methods of ``maps`` are closed forms over one batch's activations and the dense head.
These two are not: each map costs many forward passes of the whole model on masked copies
of the image, so they need the model's inputs and a way to run it (``Forward``), which
``modlabel.infer`` hands them (``Labels.maps``). They are registered in ``maps`` with
``needs="model"``: ``explain``, ``localize`` and the report can draw them; the nightly
scan, which stores only the CRM, never runs them.

Scores are the network's own softmax (temperature 1), as both papers define them; the
model's fitted temperature (``ModelInfo.temperature``) calibrates what modlabel reports,
not the maps. Forward passes go through ``Forward.logits_of`` in batches of at most
``Options.batch_size`` inputs; a stop asked for (``stopping``) ends the loop between
batches. Masks are upsampled with ``geometry.upsample`` (bilinear, half-pixel centers,
the convention of the authors' ``skimage.transform.resize(order=1)``).

Costs, per image: Score-CAM K forward passes (one per channel whose map is not
constant; 512 for VGG16), RISE ``Options.rise_masks`` (2000 by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from . import geometry, stopping
from .calibration import calibrated_softmax

# RISE's defaults, those of the authors' example (eclique/RISE, Easy_start.ipynb:
# N = 2000 masks on an s = 8 grid, each cell kept with probability p1 = 0.5).
RISE_MASKS = 2000
RISE_GRID = 8
RISE_KEEP = 0.5
BATCH_SIZE = 32  # inputs per forward pass: (32, 300, 300, 3) float32 is 35 MB
SEED = 0

LogitsOf = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Options:
    """How the forward-pass methods run.

    rise_masks: N, RISE's number of random masks; rise_grid: s, the masks' grid (s x s
    cells); rise_keep: p, the probability that a cell is kept; seed: the masks' seed (the
    same seed, the same masks, the same map); batch_size: inputs per forward pass.
    """

    rise_masks: int = RISE_MASKS
    rise_grid: int = RISE_GRID
    rise_keep: float = RISE_KEEP
    seed: int = SEED
    batch_size: int = BATCH_SIZE

    def __post_init__(self) -> None:
        if self.rise_masks < 1 or self.rise_grid < 1 or self.batch_size < 1:
            raise ValueError("rise_masks, rise_grid and batch_size must be >= 1")
        if not 0 < self.rise_keep <= 1:
            raise ValueError(f"rise_keep must be in (0, 1], not {self.rise_keep}")


@dataclass(frozen=True)
class Forward:
    """What a forward-pass method needs beyond the activations.

    inputs: (N, H, W, 3) float32, the batch as the model saw it (preprocessed, as
    ``OnnxModel.preprocess`` gives it); logits_of: (M, H, W, 3) float32 -> (M, C) logits,
    the model's forward pass (``OnnxModel.run``'s first output); options: ``Options``.
    """

    inputs: np.ndarray
    logits_of: LogitsOf
    options: Options = field(default_factory=Options)

    def class_scores(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """softmax(logits)[c] of each masked input, for (inputs (M, H, W, 3), classes (M,))
        batches; the scores of all batches in order, (sum M,) float64."""
        out = []
        for inputs, classes in batches:
            stopping.check()
            probabilities = calibrated_softmax(self.logits_of(inputs))  # temperature 1
            out.append(probabilities[np.arange(len(classes)), classes])
        return np.concatenate(out) if out else np.zeros(0)


def score_cam_weights(activations: np.ndarray, classes: np.ndarray, forward: Forward) -> np.ndarray:
    """Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for
    Convolutional Neural Networks", CVPR Workshops; arXiv:1910.01279, Section 4 and
    Algorithm 1).

    For each image n and channel k: H_k = the channel A_k upsampled to the input size and
    min-max normalized to [0, 1]; the channel's weight is the class's softmax score on
    the masked input, w_k = softmax(f(X * H_k))_c; the map is ReLU(sum_k w_k A_k)
    (``maps.scorecam_from``), at the activations' grid as the other maps (the authors sum
    the upsampled channels, the same map upsampled). As in the authors' code, the
    baseline f(X_b) of the increase of confidence is left out, and a channel whose map
    is constant (an all-zero ReLU channel, say) is skipped: weight 0, no forward pass.

    activations: (N, h, w, K); classes: (N,) int, each image's class; forward: the
    batch's inputs (N, H, W, 3) and the model. Returns the weights w, (N, K) float64.
    """
    acts = np.asarray(activations, dtype=np.float32)
    n, _, _, k = acts.shape
    input_hw = forward.inputs.shape[1:3]
    varying = acts.max(axis=(1, 2)) > acts.min(axis=(1, 2))  # (N, K)
    images, channels = np.nonzero(varying)
    step = forward.options.batch_size

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, images.size, step):
            ns, ks = images[start : start + step], channels[start : start + step]
            masks = geometry.upsample(acts[ns, :, :, ks], input_hw)  # (b, H, W)
            low = masks.min(axis=(1, 2), keepdims=True)
            span = masks.max(axis=(1, 2), keepdims=True) - low
            masks = np.divide(masks - low, span, out=np.zeros_like(masks), where=span > 0)
            yield forward.inputs[ns] * masks[..., None], classes[ns]

    weights = np.zeros((n, k), dtype=np.float64)
    weights[images, channels] = forward.class_scores(batches())
    return weights


def rise_masks(
    count: int,
    input_hw: tuple[int, int],
    *,
    grid: int = RISE_GRID,
    keep: float = RISE_KEEP,
    seed: int = SEED,
    batch_size: int | None = None,
) -> Iterator[np.ndarray]:
    """RISE's random masks (Petsiuk et al. 2018, Section 3, "Mask generation"), in chunks
    of ``batch_size`` (all at once for None): (b, H, W) float32 in [0, 1], ``count`` in all.

    Each mask: a grid of s x s cells, each 1 with probability p; upsampled bilinearly to
    (s + 1) * C, C = ceil((H, W) / s) the cell size; cropped to (H, W) at a random shift
    in [0, C). All grids and shifts are drawn first from one generator seeded with
    ``seed``, so the masks are the same whatever the chunks.
    """
    height, width = (int(v) for v in input_hw)
    rng = np.random.default_rng(seed)
    grids = (rng.random((count, grid, grid)) < keep).astype(np.float32)
    cell_h, cell_w = -(-height // grid), -(-width // grid)
    shifts = np.stack(
        [rng.integers(0, cell_h, size=count), rng.integers(0, cell_w, size=count)], axis=1
    )
    up_hw = ((grid + 1) * cell_h, (grid + 1) * cell_w)
    step = count if batch_size is None else batch_size
    for start in range(0, count, step):
        up = geometry.upsample(grids[start : start + step], up_hw)
        crops = zip(up, shifts[start : start + step], strict=True)
        yield np.stack([u[y : y + height, x : x + width] for u, (y, x) in crops])


def rise(classes: np.ndarray, forward: Forward) -> np.ndarray:
    """RISE (Petsiuk, Das and Saenko 2018, "RISE: Randomized Input Sampling for
    Explanation of Black-box Models", BMVC; arXiv:1806.07421, Section 3):

    S_c(x, y) = 1 / (N p) * sum_i softmax(f(X * M_i))_c * M_i(x, y), over N random masks
    M_i (``rise_masks``; N, s, p and the seed in ``forward.options``). The same masks
    serve every image of the batch.

    classes: (N,) int, each image's class; forward: the batch's inputs (N, H, W, 3) and
    the model. Returns (N, H, W) float32, >= 0, at the input's size (not the activations'
    grid: RISE never looks inside the model).
    """
    opts = forward.options
    inputs = forward.inputs
    n, height, width = inputs.shape[:3]
    saliency = np.zeros((n, height, width), dtype=np.float64)
    chunks = rise_masks(
        opts.rise_masks,
        (height, width),
        grid=opts.rise_grid,
        keep=opts.rise_keep,
        seed=opts.seed,
        batch_size=opts.batch_size,
    )
    for masks in chunks:
        for image in range(n):
            batch = iter([(inputs[image] * masks[..., None], np.full(len(masks), classes[image]))])
            scores = forward.class_scores(batch)
            saliency[image] += np.tensordot(scores, masks, axes=1)
    saliency /= opts.rise_masks * opts.rise_keep
    return saliency.astype(np.float32)
