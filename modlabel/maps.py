"""Maps: CAM, Grad-CAM and CRM from the last conv layer's activations.

Every method is a small pure function of the same ``HeadTerms`` (``head_terms``:
one matrix product per batch), batched with numpy; ``METHODS`` names them. Each
also has an entry point over the raw inputs. All entry points take
``(activations, weights)`` positionally and everything else by keyword only,
each name with one meaning in every function:

* ``activations``: (N, H, W, K) float32, the conv layer that feeds the pooling
  (the ONNX output ``activations``);
* ``weights``: (K, C) float32, the dense head's kernel (``ModelInfo.head_weights``);
* ``bias=``: (C,) float32 or None, the dense head's bias (``ModelInfo.head_bias``);
* ``class_index=``: the class of the class-specific maps: one for all images,
  one per image (N,), or None for the predicted class;
* ``logits=``: (N, C), the model's own scores; when given (and ``class_index``
  is not) their argmax is the predicted class, else the head is re-applied;
* ``pooling=``: how the head pools the activations. The prediction score is
  ``S_c = (1/s) * sum_xy sum_k w_kc f_k(x, y) + b_c`` with ``s = H*W`` for
  ``"mean"`` (Keras' GlobalAveragePooling2D, what modlabel models use) and
  ``s = 1`` for ``"sum"`` (Eq. 1 as the paper prints it, and the authors' code);
* ``gradient=`` (Grad-CAM only): how Eq. 4 reduces the gradient over locations.

Each returns (N, H, W) float32, one map per image. Equation numbers refer to
Kim, Rajaraman and Antani (2019), "Visual Interpretation of Convolutional Neural
Network Predictions in Classifying Medical Image Modalities", Diagnostics 9(2):38.

Around the methods: bilinear upsampling in the decoder's geometry (a plain
stretch of the whole image), the paper's display normalization and 20% ROI
threshold (Table 3), the class-level average (Eq. 8) and its 70% ROI box
(Figure 9).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Pooling = Literal["mean", "sum"]
Gradient = Literal["sum", "mean"]
ClassIndex = int | Sequence[int] | np.ndarray | None
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive

# The paper's thresholds: heatmaps show values above 20% of the max (Figure 4,
# Table 3); the class-level ROI is the area above 70% of the max (Figure 9).
DISPLAY_FRACTION = 0.2
CLASS_ROI_FRACTION = 0.7


# --------------------------------------------------------------------------
# Shared pieces: the head's per-location class scores and the prediction.
# --------------------------------------------------------------------------


def pooling_scale(pooling: str, height: int, width: int) -> float:
    """The divisor s of the pooled activations: H*W for "mean", 1 for "sum"."""
    if pooling == "mean":
        return float(height * width)
    if pooling == "sum":
        return 1.0
    raise ValueError(f"pooling must be 'mean' or 'sum', not {pooling!r}")


def _checked(activations: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    acts = np.asarray(activations, dtype=np.float32)
    wts = np.asarray(weights, dtype=np.float32)
    if acts.ndim != 4:
        raise ValueError(f"activations must be (N, H, W, K), got shape {acts.shape}")
    if wts.ndim != 2 or wts.shape[0] != acts.shape[3]:
        raise ValueError(f"weights must be (K, C) with K={acts.shape[3]}, got shape {wts.shape}")
    return acts, wts


def class_maps(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """M_c(x, y) = sum_k w_kc f_k(x, y) for every class c (Eq. 2).

    activations: (N, H, W, K); weights: (K, C). Returns (N, H, W, C) float32,
    a view of a classes-first (C, N, H, W) array (``HeadTerms.by_class``).
    """
    acts, wts = _checked(activations, weights)
    n, h, w, k = acts.shape
    # Classes first, each class's maps one contiguous block: the methods' sums
    # over the C classes become element-wise adds of blocks, far faster in numpy
    # than reductions over a short last axis. (N*H*W, K) @ (K, C) and one
    # transposing copy beat the (C, K) @ (K, N*H*W) product (measured).
    by_class = np.ascontiguousarray((acts.reshape(-1, k) @ wts).T)
    return by_class.reshape(wts.shape[1], n, h, w).transpose(1, 2, 3, 0)


@dataclass(frozen=True)
class HeadTerms:
    """What every method is computed from, for one batch (see ``head_terms``).

    class_maps: (N, H, W, C) float32, M_c(x, y) of Eq. 2 for every class.
    scale: s, the pooling divisor (``pooling_scale``).
    scores: (N, C) float64, S_c of Eq. 1, the bias included when given.
    classes: (N,) int, the class that the class-specific maps are drawn for.
    """

    class_maps: np.ndarray
    scale: float
    scores: np.ndarray
    classes: np.ndarray

    @property
    def by_class(self) -> np.ndarray:
        """class_maps classes first, (C, N, H, W): a view, contiguous when
        ``head_terms`` made the terms."""
        return self.class_maps.transpose(3, 0, 1, 2)


def head_terms(
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    class_index: ClassIndex = None,
    logits: np.ndarray | None = None,
    pooling: Pooling = "mean",
) -> HeadTerms:
    """The head's terms for a batch: one (N*H*W, K) x (K, C) product, shared by all methods.

    activations: (N, H, W, K); weights: (K, C); bias: (C,) or None (the scores
    then leave it out). class_index: one class for all images, one per image
    (N,), or None for the predicted class: the argmax of the model's ``logits``
    (N, C) when given, else of the scores (Eq. 1) re-computed here.
    """
    m = class_maps(activations, weights)
    n, h, w, c = m.shape
    s = pooling_scale(pooling, h, w)
    by_class = m.transpose(3, 0, 1, 2).reshape(c, n, h * w)  # a view, see class_maps
    scores = by_class.sum(axis=-1, dtype=np.float64).T / s
    if bias is not None:
        scores = scores + np.asarray(bias, dtype=np.float64).reshape(c)
    if class_index is not None:
        classes = np.array(np.broadcast_to(np.asarray(class_index, dtype=np.intp), (n,)))
        if classes.size and (classes.min() < 0 or classes.max() >= c):
            raise ValueError(f"class_index out of range for {c} classes: {class_index}")
    else:
        chooser = scores if logits is None else np.asarray(logits)
        classes = np.argmax(chooser, axis=-1).astype(np.intp)
    return HeadTerms(class_maps=m, scale=s, scores=scores, classes=classes)


def _class_map(terms: HeadTerms) -> np.ndarray:
    """M_c for each image's class: (N, H, W), a new array."""
    return terms.by_class[terms.classes, np.arange(terms.classes.size)]


# --------------------------------------------------------------------------
# The methods. Each is a small function of ``HeadTerms`` (the ``METHODS``
# registry, so a batch's terms are computed once), with an entry point over
# activations and head weights that carries its equation.
# --------------------------------------------------------------------------


def cam_from(terms: HeadTerms) -> np.ndarray:
    """CAM (Eq. 2) of each image's class; see ``cam``."""
    return _class_map(terms)


def gradcam_weights(
    weights: np.ndarray,
    height: int,
    width: int,
    *,
    pooling: Pooling = "mean",
    gradient: Gradient = "sum",
) -> np.ndarray:
    """Grad-CAM's channel weights alpha_k^c for a conv -> pooling -> dense head (Eq. 4).

    dS_c / df_k(x, y) = w_kc / s at every location, so no backward pass is
    needed. gradient="sum" is Eq. 4 (summed over locations): alpha = w * H*W/s,
    exactly w for mean pooling, as the paper notes. gradient="mean" is the
    original Grad-CAM's global average of the gradient: alpha = w / s.
    Returns (K, C) float32.
    """
    return (
        np.asarray(weights, dtype=np.float32)
        * np.float32(
            _gradcam_factor(height, width, pooling_scale(pooling, height, width), gradient)
        )
    ).astype(np.float32)


def _gradcam_factor(height: int, width: int, scale: float, gradient: str) -> float:
    if gradient == "sum":
        return height * width / scale
    if gradient == "mean":
        return 1.0 / scale
    raise ValueError(f"gradient must be 'sum' or 'mean', not {gradient!r}")


def gradcam_from(terms: HeadTerms, *, gradient: Gradient = "sum") -> np.ndarray:
    """Grad-CAM (Eq. 3) of each image's class; see ``gradcam``."""
    _, h, w, _ = terms.class_maps.shape
    # alpha = factor * w (gradcam_weights), so sum_k alpha_k f_k = factor * M_c.
    factor = np.float32(_gradcam_factor(h, w, terms.scale, gradient))
    cam = _class_map(terms)
    if factor != 1:  # 1 for Eq. 4 with mean pooling: skip a pass
        cam *= factor
    return np.maximum(cam, np.float32(0), out=cam)


def crm_from(terms: HeadTerms) -> np.ndarray:
    """CRM (Eq. 6-7) over all classes, sum_c M_c^2 / s^2; see ``crm``."""
    m = terms.by_class
    r = np.einsum("cnhw,cnhw->nhw", m, m)
    r /= np.float32(terms.scale**2)
    return r.astype(np.float32, copy=False)


def _output_error(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """sum_c (t_c - o_c)^2 - 1 = sum_c o_c^2 - 2 o_t, with o the softmax over classes.

    scores: (C, N, ...) float64, classes first and overwritten (it becomes
    exp(scores - max)); classes: (N,), the one-hot target t of each image.
    Returns (N, ...): sums over classes are element-wise adds of contiguous
    blocks, no one-hot array and no reduction over a short last axis.
    """
    scores -= scores.max(axis=0)  # o is unchanged, and exp cannot overflow
    e = np.exp(scores, out=scores)
    total = e.sum(axis=0)
    error = np.einsum("c...,c...->...", e, e) / total
    error -= 2.0 * e[classes, np.arange(classes.size)]
    error /= total
    return error


def crm_output_from(terms: HeadTerms) -> np.ndarray:
    """Eq. 5 at the softmax outputs, target each image's class; see ``crm_output``.

    R(l, m) = E(S - M(l, m) / s) - E(S), with E the error of ``_output_error``
    (the constant 1 cancels) and S - M(l, m) / s the scores of Eq. 6.
    """
    # Float64 throughout: R is the difference of two close error sums.
    removed = np.multiply(terms.by_class, -1.0 / terms.scale, dtype=np.float64)  # (C, N, H, W)
    removed += terms.scores.T[:, :, None, None]
    full = _output_error(np.array(terms.scores.T, dtype=np.float64), terms.classes)
    error = _output_error(removed, terms.classes)
    error -= full[:, None, None]
    return error.astype(np.float32)


def cam_squared_from(terms: HeadTerms) -> np.ndarray:
    """CAM squared of each image's class; see ``cam_squared``."""
    m = _class_map(terms)
    return np.multiply(m, m, out=m)


def cam(
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    class_index: ClassIndex = None,
    logits: np.ndarray | None = None,
    pooling: Pooling = "mean",
) -> np.ndarray:
    """Class activation map (Eq. 2): M_c(x, y) = sum_k w_kc f_k(x, y).

    activations: (N, H, W, K); weights: (K, C). class_index: one class for all
    images, one per image (N,), or None for the predicted class (argmax of
    ``logits`` (N, C) when given, else of the head re-applied with ``bias`` and
    ``pooling``). Returns (N, H, W) float32, signed.
    """
    terms = head_terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return cam_from(terms)


def gradcam(
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    class_index: ClassIndex = None,
    logits: np.ndarray | None = None,
    pooling: Pooling = "mean",
    gradient: Gradient = "sum",
) -> np.ndarray:
    """Grad-CAM (Eq. 3): ReLU(sum_k alpha_k^c f_k(x, y)), alpha from the head
    weights (``gradcam_weights``, Eq. 4).

    Same inputs and class choice as ``cam``. gradient="sum" (Eq. 4) gives
    ReLU(CAM) for mean pooling; "mean" (the original Grad-CAM) scales it by 1/(H*W).
    Returns (N, H, W) float32, >= 0.
    """
    terms = head_terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return gradcam_from(terms, gradient=gradient)


def crm(
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    pooling: Pooling = "mean",
) -> np.ndarray:
    """Class-selective relevance map (Eq. 6-7): R(l, m) = sum_c (S_c - S_c(l, m))^2.

    S_c(l, m) is the score with the element (l, m) removed, i.e. f_k(l, m) = 0
    for every k. The head is linear in the activations, so removing it changes
    S_c by exactly M_c(l, m) / s (the bias cancels), and in closed form
    R(l, m) = sum_c M_c(l, m)^2 / s^2, over all C classes, with no loop over
    locations. The pooling conventions differ only by the constant factor
    (H*W)^2 ("sum", as in the authors' code, is the larger); normalized maps,
    ROIs and boxes are the same.

    activations: (N, H, W, K); weights: (K, C); bias: (C,) or None (it cancels;
    accepted as every method accepts it). No ``class_index`` or ``logits``: the
    sum runs over all classes. Returns (N, H, W) float32, >= 0.
    """
    return crm_from(head_terms(activations, weights, bias=bias, pooling=pooling))


def crm_output(
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None,
    class_index: ClassIndex = None,
    logits: np.ndarray | None = None,
    pooling: Pooling = "mean",
) -> np.ndarray:
    """Relevance at the softmax outputs (Eq. 5), per spatial element (l, m):

    R(l, m) = sum_c (t_c - o_c(l, m))^2 - sum_c (t_c - o_c)^2, with o = softmax(S),
    o(l, m) = softmax(S(l, m)) for the scores of Eq. 6 (the element removed) and
    t the one-hot target of ``class_index`` (default: the predicted class, chosen
    as in ``cam``). This is the original class-selective relevance, on the
    outputs rather than on the scores. Closed form: S(l, m) = S - M(l, m) / s,
    all locations at once.

    Unlike Eq. 7 the softmax does not cancel the bias, so ``bias`` must be
    passed (None only for a head without one). Returns (N, H, W) float32, signed
    (negative where removing the element brings the outputs closer to the target).
    """
    terms = head_terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return crm_output_from(terms)


def cam_squared(
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    class_index: ClassIndex = None,
    logits: np.ndarray | None = None,
    pooling: Pooling = "mean",
) -> np.ndarray:
    """The class's CAM squared, M_c(x, y)^2 (Eq. 2 squared): a control for CRM.

    CRM (Eq. 7) is sum_c M_c^2 / s^2; this keeps the squaring and drops the sum
    over classes, so comparing ROIs shows how much of CRM's smaller ROI comes from
    squaring alone. Same inputs as ``cam``. Returns (N, H, W) float32, >= 0.
    """
    terms = head_terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return cam_squared_from(terms)


# name -> method over HeadTerms, for explain and reports.
METHODS: dict[str, Callable[[HeadTerms], np.ndarray]] = {
    "cam": cam_from,
    "gradcam": gradcam_from,
    "crm": crm_from,
    "crm_output": crm_output_from,
    "cam_squared": cam_squared_from,
}
TITLES = {
    "cam": "CAM",
    "gradcam": "Grad-CAM",
    "crm": "CRM",
    "crm_output": "CRM (outputs)",
    "cam_squared": "CAM\u00b2",
}


def compute_maps(
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None,
    methods: Sequence[str] = tuple(METHODS),
    class_index: ClassIndex = None,
    logits: np.ndarray | None = None,
    pooling: Pooling = "mean",
) -> dict[str, np.ndarray]:
    """Several methods (names in ``METHODS``) over one batch: name -> (N, H, W) float32.

    The head's terms (one matrix product) and the class (default: the argmax
    of ``logits``, else of the re-applied head) are computed once and shared.
    ``bias`` must be passed, as for ``crm_output`` (None only for a head
    without one); Grad-CAM uses gradient="sum" (Eq. 4).
    """
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown map methods {unknown}; known: {sorted(METHODS)}")
    terms = head_terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return {name: METHODS[name](terms) for name in methods}


# --------------------------------------------------------------------------
# Geometry: maps to the model's input size and to the original image.
# --------------------------------------------------------------------------


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centers.

    Output sample i sits at input coordinate (i + 0.5) * n_in / n_out - 0.5, the
    convention of PIL, OpenCV and tf.image.resize; the ends are clamped.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def upsample(maps: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a map (H, W) or a batch (N, H, W) to ``size_hw`` = (height, width).

    modlabel's decoder stretches the whole image to the input size (see
    ``decode.resize_rgb``), so map cell (i, j) covers the same fraction of the
    input and of the original image: ``upsample(m, model.info.input_size)`` lines
    up with the model's input and ``upsample(m, (orig_height, orig_width))`` with
    the original image. Sizes are (height, width) throughout modlabel, as numpy
    shapes are; only PIL's sizes, such as the original (width, height) that
    ``decode.load_pixels`` returns and the database stores as ``width`` and
    ``height``, are the other way round, and are named ``..._wh``.
    Returns float32 of shape (..., height, width).
    """
    arr = np.asarray(maps, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a map (H, W) or a batch (N, H, W), got shape {arr.shape}")
    height, width = int(size_hw[0]), int(size_hw[1])
    rows = _bilinear_matrix(arr.shape[-2], height).astype(np.float32)
    cols = _bilinear_matrix(arr.shape[-1], width).astype(np.float32)
    return rows @ arr @ cols.T


# --------------------------------------------------------------------------
# The paper's display normalization and ROI measure (Figure 4, Table 3).
# --------------------------------------------------------------------------


def normalize_unit(maps: np.ndarray) -> np.ndarray:
    """Each map (..., H, W) divided by its max, negatives clipped to 0: values in [0, 1].

    A map with no positive value becomes all zeros. Clipping rather than min-max
    scaling is what makes CAM and Grad-CAM ROIs "almost the same" as in Table 3:
    negative evidence never passes a threshold relative to the max.
    """
    arr = np.maximum(np.asarray(maps, dtype=np.float32), np.float32(0))
    peak = arr.max(axis=(-2, -1), keepdims=True)
    return np.divide(arr, peak, out=np.zeros_like(arr), where=peak > 0)


def normalize_255(maps: np.ndarray) -> np.ndarray:
    """The paper's display scale: ``normalize_unit`` times 255, float32 in [0, 255]."""
    return normalize_unit(maps) * np.float32(255)


def roi_mask(maps: np.ndarray, fraction: float = DISPLAY_FRACTION) -> np.ndarray:
    """Where each map (..., H, W) is above ``fraction`` of its max: bool, same shape.

    fraction=0.2 is the paper's display threshold. A map with no positive value
    has an empty ROI.
    """
    return normalize_unit(maps) > fraction


@dataclass(frozen=True)
class RoiStats:
    """Table 3's measure for one map: pixels above the threshold and their ratio (0-1)."""

    pixels: int
    ratio: float


def roi_stats(
    map2d: np.ndarray,
    size_hw: Sequence[int] | None = None,
    *,
    fraction: float = DISPLAY_FRACTION,
) -> RoiStats:
    """ROI pixel count and ratio of one map (H, W), upsampled to ``size_hw`` first
    when given (Table 3 counts pixels of 300x300 images)."""
    arr = np.asarray(map2d, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected one map (H, W), got shape {arr.shape}")
    if size_hw is not None:
        arr = upsample(arr, size_hw)
    mask = roi_mask(arr, fraction)
    pixels = int(mask.sum())
    return RoiStats(pixels=pixels, ratio=pixels / mask.size)


# --------------------------------------------------------------------------
# Class level (Eq. 8, Figure 9).
# --------------------------------------------------------------------------


class ClassAverage:
    """Streaming class-level map (Eq. 8): the mean of many per-image maps.

    Each map is first normalized to [0, 1] by its own max (``normalize_unit``),
    the same scale the heatmaps are shown and thresholded on. Raw CRM values are
    squared scores whose size varies by orders of magnitude between images, so
    without it a few confident images would decide the class-level ROI alone;
    with it every image weighs the same and the mean stays in [0, 1].
    ``normalization="none"`` averages the raw maps (Eq. 8 as printed, divided by
    the count). Maps with no positive value count as all-zero maps.
    """

    def __init__(self, *, normalization: Literal["max", "none"] = "max") -> None:
        if normalization not in ("max", "none"):
            raise ValueError(f"normalization must be 'max' or 'none', not {normalization!r}")
        self.normalization = normalization
        self._sum: np.ndarray | None = None
        self._count = 0

    @property
    def count(self) -> int:
        """How many maps were added."""
        return self._count

    def add(self, map2d: np.ndarray) -> None:
        """Add one map (H, W)."""
        arr = np.asarray(map2d)
        if arr.ndim != 2:
            raise ValueError(f"expected one map (H, W), got shape {arr.shape}")
        self.add_batch(arr[None])

    def add_batch(self, maps: np.ndarray) -> None:
        """Add a batch of maps (N, H, W)."""
        arr = np.asarray(maps, dtype=np.float32)
        if arr.ndim != 3:
            raise ValueError(f"expected a batch (N, H, W), got shape {arr.shape}")
        if self._sum is not None and arr.shape[1:] != self._sum.shape:
            raise ValueError(f"map shape {arr.shape[1:]} differs from {self._sum.shape}")
        if self.normalization == "max":
            arr = normalize_unit(arr)
        total = arr.sum(axis=0, dtype=np.float64)
        self._sum = total if self._sum is None else self._sum + total
        self._count += arr.shape[0]

    def merge(self, other: ClassAverage) -> None:
        """Fold another accumulator (same normalization) into this one."""
        if other.normalization != self.normalization:
            raise ValueError("cannot merge class averages with different normalizations")
        if other._sum is None:
            return
        if self._sum is not None and other._sum.shape != self._sum.shape:
            raise ValueError(f"map shape {other._sum.shape} differs from {self._sum.shape}")
        self._sum = other._sum.copy() if self._sum is None else self._sum + other._sum
        self._count += other._count

    def mean(self) -> np.ndarray:
        """The class-level map (H, W) float32."""
        if self._sum is None or self._count == 0:
            raise ValueError("no maps added")
        return (self._sum / self._count).astype(np.float32)


def roi_box(map2d: np.ndarray, fraction: float = CLASS_ROI_FRACTION) -> Box | None:
    """Bounding box (x0, y0, x1, y1) of the cells above ``fraction`` of the max.

    In the map's own cells, x1 and y1 exclusive; ``scale_box`` takes it to an
    image. fraction=0.7 is Figure 9's class-level ROI. None when nothing passes
    (a map with no positive value).
    """
    mask = roi_mask(np.asarray(map2d), fraction)
    if mask.ndim != 2:
        raise ValueError(f"expected one map (H, W), got shape {mask.shape}")
    if not mask.any():
        return None
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


# Neighbour offsets (dy, dx): 4-connectivity shares an edge, 8 also a corner.
_NEIGHBOURS: dict[int, tuple[tuple[int, int], ...]] = {
    4: ((-1, 0), (0, -1), (0, 1), (1, 0)),
    8: tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)),
}


def label_components(
    mask: np.ndarray, *, connectivity: Literal[4, 8] = 8
) -> tuple[np.ndarray, int]:
    """Label the connected regions of a bool mask (H, W): (labels, count).

    Two True cells are connected when a chain of True cells joins them, each
    step to one of the 8 surrounding cells (``connectivity=8``, corners count)
    or one of the 4 sharing an edge (``connectivity=4``). labels: (H, W) int32,
    0 off the mask and 1..count on it, numbered in raster order of each region's
    first cell (as ``scipy.ndimage.label`` numbers them). A flood fill from each
    unlabeled cell: linear in H*W, and maps have at most a few hundred cells.
    """
    cells = np.asarray(mask, dtype=bool)
    if cells.ndim != 2:
        raise ValueError(f"expected one mask (H, W), got shape {cells.shape}")
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity must be 4 or 8, not {connectivity!r}")
    steps = _NEIGHBOURS[connectivity]
    height, width = cells.shape
    on = cells.tolist()  # Python lists: a cell at a time, far faster than numpy indexing
    labels = [[0] * width for _ in range(height)]
    count = 0
    for y, x in np.argwhere(cells).tolist():  # row-major: raster order
        if labels[y][x]:
            continue
        count += 1
        labels[y][x] = count
        stack = [(y, x)]
        while stack:
            cy, cx = stack.pop()
            for dy, dx in steps:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < height and 0 <= nx < width and on[ny][nx] and not labels[ny][nx]:
                    labels[ny][nx] = count
                    stack.append((ny, nx))
    return np.array(labels, dtype=np.int32).reshape(height, width), count


def component_boxes(
    map2d: np.ndarray,
    fraction: float = CLASS_ROI_FRACTION,
    *,
    connectivity: Literal[4, 8] = 8,
) -> list[Box]:
    """One box per connected region above ``fraction`` of the max, for when
    several regions pass. Regions as ``label_components`` finds them (8-connected
    by default: cells touching at a corner are one region); boxes as in
    ``roi_box``; strongest region (highest peak of ``map2d``) first, ties in
    raster order of the regions' first cells."""
    arr = np.asarray(map2d, dtype=np.float32)
    mask = roi_mask(arr, fraction)
    if mask.ndim != 2:
        raise ValueError(f"expected one map (H, W), got shape {mask.shape}")
    labels, count = label_components(mask, connectivity=connectivity)
    boxes: list[Box] = []
    peaks = []
    for label in range(1, count + 1):
        region = labels == label
        ys = np.flatnonzero(region.any(axis=1))
        xs = np.flatnonzero(region.any(axis=0))
        boxes.append((int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1))
        peaks.append(arr[region].max())
    order = np.argsort(-np.asarray(peaks, dtype=np.float32), kind="stable")
    return [boxes[i] for i in order]


def scale_box(box: Box, from_hw: Sequence[int], to_hw: Sequence[int]) -> Box:
    """A box in a (height, width) grid taken to another grid of the same image
    (the stretch geometry), rounded outward so it still covers the region."""
    sy = to_hw[0] / from_hw[0]
    sx = to_hw[1] / from_hw[1]
    x0, y0, x1, y1 = box
    return (
        int(np.floor(x0 * sx)),
        int(np.floor(y0 * sy)),
        int(np.ceil(x1 * sx)),
        int(np.ceil(y1 * sy)),
    )
