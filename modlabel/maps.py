"""Maps: CAM, Grad-CAM, CRM and the other methods, from the last conv layer's activations.

The methods: the paper's CAM, Grad-CAM and CRM (and two controls), then, in closed form
for this pool-plus-dense head, Grad-CAM++, LayerCAM, XGrad-CAM, HiResCAM, Eigen-CAM and
Ablation-CAM; Score-CAM and RISE run the model again on masked inputs (``perturb``,
``needs="model"``). docs/models.md ("Map methods") derives each closed form.

Every method is one small pure function of the same ``Terms`` (``terms``: one
matrix product per batch, with the activations, head weights, bias, scores and
the class each map is drawn for), batched with numpy, and one entry in the
registry (``register``/``METHODS``) that says its name, title, colour and
equation. Adding a method is that function and that entry: every command's
``--methods``, figure, table and colour follow, and so does the one entry point
over the raw inputs, ``closed_form(name, activations, weights, ...)`` (``crm``
and ``gradcam`` are shorthands of it). It and every function here take
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
* ``gradient=`` (Grad-CAM only, ``gradcam_from``'s): how Eq. 4 reduces the
  gradient over locations.

Each map is (N, H, W) float32, one map per image. Equation numbers refer to
Kim, Rajaraman and Antani (2019), "Visual Interpretation of Convolutional Neural
Network Predictions in Classifying Medical Image Modalities", Diagnostics 9(2):38.
The class-level average (Eq. 8) is ``ClassAverage``; upsampling, ROIs and boxes
are ``modlabel.geometry``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import numpy as np

from . import perturb
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
    """Class activation map (Eq. 2) of each image's class: M_c(x, y) = sum_k w_kc f_k(x, y).

    The class is ``Terms.classes``: given, or the predicted one (argmax of the model's
    ``logits`` when given, else of the head re-applied with its bias and pooling).
    Returns (N, H, W) float32, signed.
    """
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
    """Grad-CAM (Eq. 3) of each image's class: ReLU(sum_k alpha_k^c f_k(x, y)), alpha from
    the head weights (``gradcam_weights``, Eq. 4).

    gradient="sum" (Eq. 4) gives ReLU(CAM) for mean pooling; "mean" (the original
    Grad-CAM) scales it by 1/(H*W). Returns (N, H, W) float32, >= 0.
    """
    _, h, w, _ = t.class_maps.shape
    # alpha = factor * w (gradcam_weights), so sum_k alpha_k f_k = factor * M_c.
    factor = np.float32(_gradcam_factor(h, w, t.scale, gradient))
    cam = _class_map(t)
    if factor != 1:  # 1 for Eq. 4 with mean pooling: skip a pass
        cam *= factor
    return np.maximum(cam, np.float32(0), out=cam)


def crm_from(t: Terms) -> np.ndarray:
    """Class-selective relevance map (Eq. 6-7): R(l, m) = sum_c (S_c - S_c(l, m))^2.

    S_c(l, m) is the score with the element (l, m) removed, i.e. f_k(l, m) = 0
    for every k. The head is linear in the activations, so removing it changes
    S_c by exactly M_c(l, m) / s (the bias cancels), and in closed form
    R(l, m) = sum_c M_c(l, m)^2 / s^2, over all C classes (class-agnostic), with
    no loop over locations. The pooling conventions differ only by the constant
    factor (H*W)^2 ("sum", as in the authors' code, is the larger); normalized
    maps, ROIs and boxes are the same. Returns (N, H, W) float32, >= 0.
    """
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
    """Relevance at the softmax outputs (Eq. 5), per spatial element (l, m):

    R(l, m) = sum_c (t_c - o_c(l, m))^2 - sum_c (t_c - o_c)^2, with o = softmax(S),
    o(l, m) = softmax(S(l, m)) for the scores of Eq. 6 (the element removed) and
    t the one-hot target of each image's class (``Terms.classes``). This is the
    original class-selective relevance, on the outputs rather than on the scores.
    Closed form, all locations at once: S(l, m) = S - M(l, m) / s, and
    R(l, m) = E(S - M(l, m) / s) - E(S), with E the error of ``_output_error``
    (the constant 1 cancels).

    Unlike Eq. 7 the softmax does not cancel the bias, so the terms must have it
    (``needs_bias``). Returns (N, H, W) float32, signed (negative where removing the
    element brings the outputs closer to the target).
    """
    # Float64 throughout: R is the difference of two close error sums.
    removed = np.multiply(t.by_class, -1.0 / t.scale, dtype=np.float64)  # (C, N, H, W)
    removed += t.scores.T[:, :, None, None]
    full = _output_error(np.array(t.scores.T, dtype=np.float64), t.classes)
    error = _output_error(removed, t.classes)
    error -= full[:, None, None]
    return error.astype(np.float32)


def cam_squared_from(t: Terms) -> np.ndarray:
    """The class's CAM squared, M_c(x, y)^2 (Eq. 2 squared): a control for CRM.

    CRM (Eq. 7) is sum_c M_c^2 / s^2; this keeps the squaring and drops the sum
    over classes, so comparing ROIs shows how much of CRM's smaller ROI comes from
    squaring alone. Returns (N, H, W) float32, >= 0.
    """
    m = _class_map(t)
    return np.multiply(m, m, out=m)


# The methods of the pytorch-grad-cam family (jacobgil/pytorch-grad-cam), for this head.
# The gradient of the class score S_c with respect to every activation is the constant
#     g_k = dS_c / df_k(x, y) = w_kc / s      (the same at every location (x, y)),
# so each method's gradient expression has a closed form; every map ends in a ReLU, as
# pytorch-grad-cam's BaseCAM applies one. The derivations: docs/models.md, "Map methods".


def _class_gradients(t: Terms) -> np.ndarray:
    """g_nk = dS_c / df_k(x, y) = w_kc / s for each image's class c: (N, K) float64."""
    return t.weights[:, t.classes].T.astype(np.float64) / t.scale


def _channel_sums(t: Terms) -> np.ndarray:
    """sum_xy f_k(x, y) of each image and channel: (N, K) float64."""
    return t.activations.sum(axis=(1, 2), dtype=np.float64)


def _relu_weighted(t: Terms, weights: np.ndarray) -> np.ndarray:
    """ReLU(sum_k a_nk f_k(x, y)) for per-image channel weights a (N, K): (N, H, W) float32."""
    n, h, w, k = t.activations.shape
    summed = t.activations.reshape(n, h * w, k) @ weights.astype(np.float32)[:, :, None]
    return np.maximum(summed.reshape(n, h, w), np.float32(0))


def gradcampp_from(t: Terms) -> np.ndarray:
    """Grad-CAM++ (Chattopadhyay et al. 2018, "Grad-CAM++: Generalized Gradient-Based
    Visual Explanations for Deep Convolutional Networks", WACV; arXiv:1710.11063, Eq. 19
    and the weights of Eq. 7).

    With the exponential of the score, as pytorch-grad-cam does, the second and third
    derivatives are g^2 and g^3, and alpha = g^2 / (2 g^2 + sum_ab f_k(a, b) g^3). For
    this head g is the constant g_k, so alpha_k = 1 / (2 + g_k sum_ab f_k(a, b)) (0 where
    g_k = 0, as their ``np.where``), w_k = sum_xy alpha_k ReLU(g_k) = H W alpha_k ReLU(g_k)
    and the map is ReLU(sum_k w_k f_k). pytorch-grad-cam's 1e-6 in the denominator is
    left out: against g^2 ~ (w / (H W))^2 it is no rounding guard but a change of the
    weights. Returns (N, H, W) float32, >= 0.
    """
    _, h, w, _ = t.activations.shape
    g = _class_gradients(t)
    denominator = 2.0 + g * _channel_sums(t)
    alpha = np.divide(1.0, denominator, out=np.zeros_like(g), where=(g != 0) & (denominator != 0))
    return _relu_weighted(t, h * w * alpha * np.maximum(g, 0.0))


def layercam_from(t: Terms) -> np.ndarray:
    """LayerCAM (Jiang et al. 2021, "LayerCAM: Exploring Hierarchical Class Activation
    Maps for Localization", IEEE Trans. Image Processing 30): ReLU(sum_k ReLU(g_k) f_k(x, y)), the
    positive gradients weighing each location. Returns (N, H, W) float32, >= 0.
    """
    return _relu_weighted(t, np.maximum(_class_gradients(t), 0.0))


def xgradcam_from(t: Terms) -> np.ndarray:
    """XGrad-CAM (Fu et al. 2020, "Axiom-based Grad-CAM: Towards Accurate Visualization
    and Explanation of CNNs", BMVC; arXiv:2008.02312):
    w_k = sum_xy g_k f_k(x, y) / sum_xy f_k(x, y).

    With a constant g_k, w_k = g_k wherever sum_xy f_k != 0 (and 0 where it is 0), so for
    this head XGrad-CAM is ReLU(CAM) / s but for such channels. Returns (N, H, W) float32,
    >= 0.
    """
    g = _class_gradients(t)
    return _relu_weighted(t, np.where(_channel_sums(t) != 0, g, 0.0))


def hirescam_from(t: Terms) -> np.ndarray:
    """HiResCAM (Draelos and Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful
    explanations of convolutional neural networks", arXiv:2011.08891):
    ReLU(sum_k g_k(x, y) f_k(x, y)), the gradient multiplied element-wise.

    With g_k constant this is ReLU(M_c) / s: ReLU(CAM), scaled (the paper's own remark for
    a CAM architecture). Returns (N, H, W) float32, >= 0.
    """
    m = _class_map(t)
    m *= np.float32(1.0 / t.scale)
    return np.maximum(m, np.float32(0), out=m)


def eigencam_from(t: Terms) -> np.ndarray:
    """Eigen-CAM (Muhammad and Yeasin 2020, "Eigen-CAM: Class Activation Map using
    Principal Components", IJCNN; arXiv:2008.00299), class-agnostic.

    As pytorch-grad-cam's ``get_2d_projection``: each image's activations as an
    (H*W, K) matrix X, centered (each channel's mean over locations subtracted),
    projected on the first right singular vector v_1 of its SVD (X v_1 = s_1 u_1), then
    ReLU. Here s_1 u_1 comes from the eigendecomposition of the smaller Gram matrix
    (X X^T, (H*W)^2, or X^T X): the same vector, and many times cheaper than the SVD of X
    for VGG16's 324 x 512. An SVD's sign is arbitrary; here the projection is signed to
    correlate positively with the centered sum of the channels, X 1 (the same as
    sum_k v_1k > 0; if that correlation is 0, its largest-magnitude value is made
    positive), so the map is the same on every machine. Returns (N, H, W) float32, >= 0.
    """
    n, h, w, k = t.activations.shape
    x = t.activations.reshape(n, h * w, k).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    if h * w <= k:
        values, vectors = np.linalg.eigh(x @ x.transpose(0, 2, 1))  # ascending
        projection = vectors[:, :, -1] * np.sqrt(np.maximum(values[:, -1:], 0.0))
    else:
        _, vectors = np.linalg.eigh(x.transpose(0, 2, 1) @ x)
        projection = (x @ vectors[:, :, -1:])[:, :, 0]
    sign = np.sign(np.einsum("np,np->n", projection, x.sum(axis=2)))
    largest = projection[np.arange(n), np.abs(projection).argmax(axis=1)]
    sign = np.where(sign == 0, np.sign(largest), sign)
    projection *= sign[:, None]
    return np.maximum(projection, 0.0).reshape(n, h, w).astype(np.float32)


def ablationcam_from(t: Terms) -> np.ndarray:
    """Ablation-CAM (Desai and Ramaswamy 2020, "Ablation-CAM: Visual Explanations for Deep
    Convolutional Network via Gradient-free Localization", WACV):
    w_k = (y_c - y_c^k) / y_c, y_c^k the score with channel k set to 0 (as pytorch-grad-cam
    does for activations whose minimum is 0, after a ReLU); the map is ReLU(sum_k w_k f_k).

    Above the activations the model is the head alone, linear in them, so zeroing
    channel k changes the score by exactly y_c - y_c^k = w_kc sum_xy f_k(x, y) / s: the
    forward pass the definition asks for, in closed form (no loop over channels). y_c is
    the score with its bias (``Terms.scores``; ``needs_bias``). An image with y_c = 0 gets
    an all-zero map. Returns (N, H, W) float32, >= 0.
    """
    drop = _class_gradients(t) * _channel_sums(t)  # y_c - y_c^k, (N, K)
    score = t.scores[np.arange(t.classes.size), t.classes][:, None]
    return _relu_weighted(t, np.divide(drop, score, out=np.zeros_like(drop), where=score != 0))


def scorecam_from(t: Terms, forward: perturb.Forward) -> np.ndarray:
    """Score-CAM (Wang et al. 2020) of each image's class: ReLU(sum_k w_k f_k), with the
    weights of ``perturb.score_cam_weights`` (one forward pass per channel). Returns
    (N, H, W) float32, >= 0."""
    return _relu_weighted(t, perturb.score_cam_weights(t.activations, t.classes, forward))


def rise_from(t: Terms, forward: perturb.Forward) -> np.ndarray:
    """RISE of each image's class: ``perturb.rise``, at the input's size."""
    return perturb.rise(t.classes, forward)


# --------------------------------------------------------------------------
# The registry: every method, once.
# --------------------------------------------------------------------------


Needs = Literal["terms", "model"]


@dataclass(frozen=True)
class Method:
    """A map method as every command knows it.

    name: what ``--methods`` takes; title: what figures and tables print; colour: its
    line in plots; fn: the map of each image of a batch, (N, H, W) float32 (or at the
    input's size), from its ``Terms`` (and, for ``needs="model"``, a ``perturb.Forward``
    as second argument); source: the equation or paper it follows; default: drawn when a
    command is not told which (``explain``'s figure, the report's evaluation); needs:
    ``"terms"`` for a closed form over one batch's activations and head, ``"model"``
    for a method that runs the model again on perturbed inputs (``perturb``);
    needs_bias: its numbers depend on the head's bias (not only its class choice), so
    ``closed_form`` refuses a call without ``bias=``; class_specific: False for a map
    drawn for no one class (over all of them, or none), which ``closed_form`` then
    refuses a ``class_index`` or ``logits`` for.
    """

    name: str
    title: str
    colour: str
    fn: Callable[..., np.ndarray]
    source: str
    default: bool = True
    needs: Needs = "terms"
    needs_bias: bool = False
    class_specific: bool = True


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"a map method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


register(Method("cam", "CAM", "#1f77b4", cam_from, "Eq. 2"))
register(Method("gradcam", "Grad-CAM", "#ff7f0e", gradcam_from, "Eq. 3-4"))
register(Method("crm", "CRM", "#d62728", crm_from, "Eq. 6-7", class_specific=False))
register(
    Method("crm_output", "CRM (outputs)", "#9467bd", crm_output_from, "Eq. 5", default=False,
           needs_bias=True)
)  # fmt: skip
register(
    Method("cam_squared", "CAM\u00b2", "#8c564b", cam_squared_from, "Eq. 2, squared",
           default=False)
)  # fmt: skip
# More methods: none is drawn by default; the last two run the model (``perturb``).
# fmt: off
register(Method("gradcampp", "Grad-CAM++", "#2ca02c", gradcampp_from,
                "Chattopadhyay et al. 2018", default=False))
register(Method("layercam", "LayerCAM", "#e377c2", layercam_from, "Jiang et al. 2021",
                default=False))
register(Method("xgradcam", "XGrad-CAM", "#bcbd22", xgradcam_from, "Fu et al. 2020",
                default=False))
register(Method("hirescam", "HiResCAM", "#9edae5", hirescam_from, "Draelos and Carin 2020",
                default=False))
register(Method("eigencam", "Eigen-CAM", "#aec7e8", eigencam_from, "Muhammad and Yeasin 2020",
                default=False, class_specific=False))
register(Method("ablationcam", "Ablation-CAM", "#98df8a", ablationcam_from,
                "Desai and Ramaswamy 2020", default=False, needs_bias=True))
register(Method("scorecam", "Score-CAM", "#ffbb78", scorecam_from, "Wang et al. 2020",
                default=False, needs="model"))
register(Method("rise", "RISE", "#c5b0d5", rise_from, "Petsiuk et al. 2018", default=False,
                needs="model"))
# fmt: on


def default_methods() -> tuple[str, ...]:
    """The methods a command draws unless told which."""
    return tuple(name for name, m in METHODS.items() if m.default)


def closed_form_methods() -> tuple[str, ...]:
    """The methods computed from one batch's activations and head alone (``needs="terms"``),
    without running the model again."""
    return tuple(name for name, m in METHODS.items() if m.needs == "terms")


def method_names(text: str | Sequence[str]) -> list[str]:
    """``--methods`` as the names it gives, unchecked: comma-separated text (or a
    sequence), each stripped, the empty ones left out."""
    names = text.split(",") if isinstance(text, str) else text
    return [n.strip() for n in names if n.strip()]


def parse_methods(text: str | Sequence[str] | None, *, model: bool = True) -> tuple[str, ...]:
    """``--methods``: names, comma-separated (or a sequence), ``all``, or None for the
    defaults. Raises ``ValueError`` naming the unknown ones and the known.

    model: whether the caller can run the model on perturbed inputs (a ``perturb.Forward``);
    without it ``all`` is the closed-form methods and a method that needs the model is
    refused, in one line that names it and the methods that can run."""
    if text is None:
        return default_methods()
    names = method_names(text)
    if names == ["all"]:
        return tuple(METHODS) if model else closed_form_methods()
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(
            f"unknown map methods {unknown or names}; known: {', '.join(METHODS)} (or all)"
        )
    refused = [n for n in names if METHODS[n].needs == "model" and not model]
    if refused:
        raise ValueError(
            f"map methods {refused} run the model on masked images, which is not at hand "
            f"here; these can run: {', '.join(closed_form_methods())}"
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
    methods: Sequence[str] | None = None,
    class_index: ClassIndex = None,
    logits: np.ndarray | None = None,
    pooling: Pooling = "mean",
) -> dict[str, np.ndarray]:
    """Several closed-form methods (names in ``METHODS``; None: all of them,
    ``closed_form_methods``) over one batch: name -> (N, H, W) float32.

    The head's terms (one matrix product) and the class (default: the argmax
    of ``logits``, else of the re-applied head) are computed once and shared.
    ``bias`` must be passed, as ``closed_form`` asks of the methods with
    ``needs_bias`` (None only for a head without one); Grad-CAM uses
    gradient="sum" (Eq. 4). A method that needs the
    model (``needs="model"``) is refused: ``modlabel.infer``'s ``Labels.maps`` runs those.
    """
    t = terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return maps_of(t, closed_form_methods() if methods is None else methods)


def maps_of(
    t: Terms, methods: Sequence[str], forward: perturb.Forward | None = None
) -> dict[str, np.ndarray]:
    """name -> (N, H, W) float32 of each method over one batch's terms (RISE's at the
    input's size). ``forward``: the batch's inputs and the model, for the methods that
    need them; without it those are refused (``parse_methods``)."""
    names = parse_methods(list(methods), model=forward is not None)
    return {
        name: METHODS[name].fn(t, forward)
        if METHODS[name].needs == "model"
        else METHODS[name].fn(t)
        for name in names
    }


# --------------------------------------------------------------------------
# One method over the raw inputs.
# --------------------------------------------------------------------------


class _Unset(Enum):
    """``closed_form``'s default bias: not passed (None is a head without a bias)."""

    BIAS = "not passed"


def closed_form(
    name: str,
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None | _Unset = _Unset.BIAS,
    class_index: ClassIndex = None,
    logits: np.ndarray | None = None,
    pooling: Pooling = "mean",
    **options: Any,
) -> np.ndarray:
    """One closed-form method (``needs="terms"``) over one batch: ``METHODS[name].fn`` of
    the batch's ``terms``. Returns (N, H, W) float32.

    activations: (N, H, W, K) float32; weights: (K, C) float32; the keywords as in the
    module docstring. bias: (C,), or None for a head without one; leaving it out means
    None, but for a method whose numbers depend on it (``Method.needs_bias``: CRM at the
    outputs, Ablation-CAM), which is refused (TypeError). class_index, logits: the class
    of a class-specific method, chosen as in ``terms``; a method drawn for no one class
    (``Method.class_specific`` False: CRM, Eigen-CAM) refuses them (TypeError).
    options: keyword options of the method's own function (Grad-CAM's ``gradient=``).
    An unknown name, or a method that runs the model (``needs="model"``), is a
    ``ValueError`` naming the closed-form methods.
    """
    method = METHODS.get(name)
    if method is None or method.needs != "terms":
        why = "is not a map method" if method is None else "runs the model on masked images"
        raise ValueError(
            f"{name!r} {why}; closed_form takes one of {', '.join(closed_form_methods())}"
        )
    if bias is _Unset.BIAS:
        if method.needs_bias:
            raise TypeError(
                f"map method {name!r} needs bias= (the head's bias; None only for a head "
                "without one): its maps depend on it"
            )
        bias = None
    if not method.class_specific and (class_index is not None or logits is not None):
        raise TypeError(
            f"map method {name!r} is drawn for no one class: it takes no class_index or logits"
        )
    t = terms(
        activations, weights, bias=bias, class_index=class_index, logits=logits, pooling=pooling
    )
    return method.fn(t, **options)


def crm(
    activations: np.ndarray,
    weights: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    pooling: Pooling = "mean",
) -> np.ndarray:
    """CRM (Eq. 6-7, ``crm_from``) over the raw inputs: ``closed_form("crm", ...)``.
    bias is accepted as every method accepts it (it cancels). Returns (N, H, W) float32."""
    return closed_form("crm", activations, weights, bias=bias, pooling=pooling)


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
    """Grad-CAM (Eq. 3-4, ``gradcam_from``) over the raw inputs: ``closed_form("gradcam",
    ...)``. Returns (N, H, W) float32, >= 0."""
    return closed_form(
        "gradcam", activations, weights, bias=bias, class_index=class_index, logits=logits,
        pooling=pooling, gradient=gradient,
    )  # fmt: skip


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
