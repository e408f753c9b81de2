"""Maps: CAM, Grad-CAM, CRM and the other methods, from the last conv layer's activations.

Every method is one small pure function of the same ``Terms`` (``terms``: one
matrix product per batch, with the activations, head weights, bias, scores and
the class each map is drawn for), batched with numpy, and one entry in the
registry (``register``/``METHODS``) that says its name, title, colour and
equation. Adding a method is that function and that entry: every command's
``--methods``, figure, table and colour follow. Each method also has an entry
point over the raw inputs, all of them taking ``(activations, weights)``
positionally and everything else by keyword only, each name with one meaning in
every function:

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
The class-level average (Eq. 8) is ``ClassAverage``; upsampling, ROIs and boxes
are ``modlabel.geometry``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .geometry import normalize_unit

Pooling = Literal["mean", "sum"]
Gradient = Literal["sum", "mean"]
ClassIndex = int | Sequence[int] | np.ndarray | None


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
class Terms:
    """What every method is computed from, for one batch (see ``terms``).

    activations: (N, H, W, K) float32; weights: (K, C) float32; bias: (C,) or None.
    class_maps: (N, H, W, C) float32, M_c(x, y) of Eq. 2 for every class.
    scale: s, the pooling divisor (``pooling_scale``).
    scores: (N, C) float64, S_c of Eq. 1, the bias included when given.
    classes: (N,) int, the class that the class-specific maps are drawn for.
    """

    activations: np.ndarray
    weights: np.ndarray
    bias: np.ndarray | None
    class_maps: np.ndarray
    scale: float
    scores: np.ndarray
    classes: np.ndarray

    @property
    def by_class(self) -> np.ndarray:
        """class_maps classes first, (C, N, H, W): a view, contiguous when ``terms``
        made them."""
        return self.class_maps.transpose(3, 0, 1, 2)


def terms(
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    class_index: ClassIndex = None,
    logits: np.ndarray | None = None,
    pooling: Pooling = "mean",
) -> Terms:
    """The head's terms for a batch: one (N*H*W, K) x (K, C) product, shared by all methods.

    activations: (N, H, W, K); weights: (K, C); bias: (C,) or None (the scores
    then leave it out). class_index: one class for all images, one per image
    (N,), or None for the predicted class: the argmax of the model's ``logits``
    (N, C) when given, else of the scores (Eq. 1) re-computed here.
    """
    acts, wts = _checked(activations, weights)
    m = class_maps(acts, wts)
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
    return Terms(acts, wts, bias, m, s, scores, classes)


def _class_map(t: Terms) -> np.ndarray:
    """M_c for each image's class: (N, H, W), a new array."""
    return t.by_class[t.classes, np.arange(t.classes.size)]


# --------------------------------------------------------------------------
# The methods. Each is a small function of ``Terms`` (registered below, so a
# batch's terms are computed once), with an entry point over activations and
# head weights that carries its equation.
# --------------------------------------------------------------------------


def cam_from(t: Terms) -> np.ndarray:
    """CAM (Eq. 2) of each image's class; see ``cam``."""
    return _class_map(t)


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


def gradcam_from(t: Terms, *, gradient: Gradient = "sum") -> np.ndarray:
    """Grad-CAM (Eq. 3) of each image's class; see ``gradcam``."""
    _, h, w, _ = t.class_maps.shape
    # alpha = factor * w (gradcam_weights), so sum_k alpha_k f_k = factor * M_c.
    factor = np.float32(_gradcam_factor(h, w, t.scale, gradient))
    cam = _class_map(t)
    if factor != 1:  # 1 for Eq. 4 with mean pooling: skip a pass
        cam *= factor
    return np.maximum(cam, np.float32(0), out=cam)


def crm_from(t: Terms) -> np.ndarray:
    """CRM (Eq. 6-7) over all classes, sum_c M_c^2 / s^2; see ``crm``."""
    m = t.by_class
    r = np.einsum("cnhw,cnhw->nhw", m, m)
    r /= np.float32(t.scale**2)
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


def crm_output_from(t: Terms) -> np.ndarray:
    """Eq. 5 at the softmax outputs, target each image's class; see ``crm_output``.

    R(l, m) = E(S - M(l, m) / s) - E(S), with E the error of ``_output_error``
    (the constant 1 cancels) and S - M(l, m) / s the scores of Eq. 6.
    """
    # Float64 throughout: R is the difference of two close error sums.
    removed = np.multiply(t.by_class, -1.0 / t.scale, dtype=np.float64)  # (C, N, H, W)
    removed += t.scores.T[:, :, None, None]
    full = _output_error(np.array(t.scores.T, dtype=np.float64), t.classes)
    error = _output_error(removed, t.classes)
    error -= full[:, None, None]
    return error.astype(np.float32)


def cam_squared_from(t: Terms) -> np.ndarray:
    """CAM squared of each image's class; see ``cam_squared``."""
    m = _class_map(t)
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
    t = terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return cam_from(t)


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
    t = terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return gradcam_from(t, gradient=gradient)


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
    return crm_from(terms(activations, weights, bias=bias, pooling=pooling))


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
    t = terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return crm_output_from(t)


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
    t = terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return cam_squared_from(t)


# --------------------------------------------------------------------------
# The registry: every method, once.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A map method as every command knows it.

    name: what ``--methods`` takes; title: what figures and tables print; colour: its
    line in plots; fn: the map of each image of a batch, (N, H, W) float32, from its
    ``Terms``; source: the equation or paper it follows; default: drawn when a command
    is not told which (``explain``'s figure, the report's evaluation).
    """

    name: str
    title: str
    colour: str
    fn: Callable[[Terms], np.ndarray]
    source: str
    default: bool = True


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"a map method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


register(Method("cam", "CAM", "#1f77b4", cam_from, "Eq. 2"))
register(Method("gradcam", "Grad-CAM", "#ff7f0e", gradcam_from, "Eq. 3-4"))
register(Method("crm", "CRM", "#d62728", crm_from, "Eq. 6-7"))
register(Method("crm_output", "CRM (outputs)", "#9467bd", crm_output_from, "Eq. 5", default=False))
register(
    Method("cam_squared", "CAM\u00b2", "#8c564b", cam_squared_from, "Eq. 2, squared",
           default=False)
)  # fmt: skip


def default_methods() -> tuple[str, ...]:
    """The methods a command draws unless told which."""
    return tuple(name for name, m in METHODS.items() if m.default)


def parse_methods(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--methods``: names, comma-separated (or a sequence), ``all``, or None for the
    defaults. Raises ``ValueError`` naming the unknown ones and the known."""
    if text is None:
        return default_methods()
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if names == ["all"]:
        return tuple(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(
            f"unknown map methods {unknown or names}; known: {', '.join(METHODS)} (or all)"
        )
    return tuple(dict.fromkeys(names))


def title(name: str) -> str:
    """How figures and tables name a method (its own name for one not registered)."""
    method = METHODS.get(name)
    return method.title if method is not None else name


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
    t = terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return maps_of(t, methods)


def maps_of(t: Terms, methods: Sequence[str]) -> dict[str, np.ndarray]:
    """name -> (N, H, W) float32 of each method over one batch's terms."""
    names = parse_methods(list(methods))
    return {name: METHODS[name].fn(t) for name in names}


# --------------------------------------------------------------------------
# Class level (Eq. 8).
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
