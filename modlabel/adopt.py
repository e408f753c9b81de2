"""Adopt: take in any ONNX CNN (a PyTorch or Keras export) as a modlabel model.

``adopt_model`` reads the graph for the head modlabel's closed-form maps need (the
paper's Eq. 1: the scores are a dense layer over the global average of the last conv
layer's map)::

    activations (4-D, either layout)                 the conv (or its Relu, Clip, Add)
      -> GlobalAveragePool | ReduceMean over the two spatial axes
      -> Flatten | Reshape | Squeeze (any number, or none)
      -> Gemm | MatMul (+ Add)                        = logits (N, C)
      [-> Softmax | Sigmoid | Identity]               (the graph's output)

It reads the head's weights (K, C) and bias (C,) from the constants (Gemm's alpha,
beta and transB applied), exposes the two tensors as the outputs ``logits`` and
``activations`` (the original outputs stay), makes the batch dimension free, and writes
modlabel's metadata (``ModelInfo``: the class names, the preprocessing, the layouts,
the head). A head of any other shape (VGG16's hidden dense layers, a transformer's
token head) is refused with one line naming what it is; with ``layer`` it is adopted
all the same, that tensor as the activations, as "layer-wise only": no closed-form
head, so only layer-wise CRM (``layer_crm``) applies.

Before it writes, it checks the result: on a random input the adopted file's copies
of the original outputs equal the original's (within ``OUTPUT_TOLERANCE``), and the
logits equal the head re-applied to the activations (``maps.terms``, within
``HEAD_TOLERANCE``); the written file loads as a modlabel model (``OnnxModel``).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import maps
from .errors import ModelError, ModlabelError
from .metadata import ACTIVATIONS, LAYOUTS, LOGITS, METADATA_KEY, ModelInfo
from .model import CHANNEL_AXIS, OnnxModel, channels_last, new_session, to_layout
from .onnx_graph import Graph, attribute, load_model, onnx

# Original outputs of the adopted file against the original file, on the same input:
# the same nodes on the same data, so equal (at most a last-bit difference from another
# batch size's kernels): the largest difference relative to max(1, largest value).
OUTPUT_TOLERANCE = 1e-6
# The logits against the head re-applied in float64 to the float32 activations: the
# graph's float32 sums over h*w*K terms round differently.
HEAD_TOLERANCE = 1e-4
CHECK_BATCH = 2
RESHAPING_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"})
DENSE_OPS = frozenset({"Gemm", "MatMul"})
SPATIAL_OPS = frozenset({"Conv", "ConvTranspose"})  # a refusal describes the head after them
POOL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "MaxPool", "AveragePool"})
DESCRIBE_OPS = 12  # how far back from the output a refusal describes the head
DEFAULT_SCALE = 255.0  # pixels / 255, then (x - mean) / std: torchvision's convention


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects of an RGB image: x = (pixels / scale - mean) / std per
    channel, pixels in [0, 255] (torchvision: scale 255 and ImageNet's mean and std;
    Keras' MobileNetV2: scale 127.5, mean 1, std 1). ``ModelInfo`` stores the same as
    one mean and std over [0, 255] pixels (``folded``)."""

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = DEFAULT_SCALE

    def folded(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(mean, std) over [0, 255] pixels: (p / s - m) / d = (p - m s) / (d s)."""
        if not self.scale > 0 or any(v == 0 for v in self.std):
            raise ModlabelError("the preprocessing needs a positive scale and non-zero stds")
        s = float(self.scale)
        mean = tuple(float(m) * s for m in self.mean)
        std = tuple(float(d) * s for d in self.std)
        return mean, std  # type: ignore[return-value]


@dataclass(frozen=True)
class Head:
    """What ``find_head`` found: the activations tensor and its layout, the pooling node,
    the logits tensor, the head's weights (K, C) float32 and bias (C,) float32, and the
    operators from the pool to the logits."""

    activations: str
    activations_layout: str
    logits: str
    weights: np.ndarray
    bias: np.ndarray
    ops: tuple[str, ...]


@dataclass(frozen=True)
class Adopted:
    """What ``adopt_model`` wrote: the metadata, the path, the head's operators (empty
    for a layer-wise-only model), and the checks' largest differences."""

    path: Path
    info: ModelInfo
    head_ops: tuple[str, ...]
    output_difference: float
    head_difference: float | None
    notes: list[str] = field(default_factory=list)


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file, one a line (blank lines skipped), in the order of
    the model's outputs."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ModlabelError(f"{path}: cannot read the class names: {exc.strerror or exc}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ModlabelError(f"{path}: needs 2 or more distinct class names, one a line")
    return names


def find_head(graph: Graph, output: str) -> Head:
    """The pool-plus-dense head that computes ``output`` (a graph output), or
    ``ModelError`` naming what the head is instead (one line)."""
    logits = graph.logits_of(output)
    node = graph.producer.get(logits)
    bias: np.ndarray | None = None
    if node is not None and node.op_type == "Add":
        for i, name in enumerate(node.input[:2]):
            value = graph.constant(name)
            other = graph.producer.get(node.input[1 - i])
            if value is not None and other is not None and other.op_type == "MatMul":
                bias, node = value, other
                break
    if node is None or node.op_type not in DENSE_OPS:
        raise _refusal(graph, output, "the scores are not made by a dense layer")
    weights, bias = _dense_weights(graph, node, bias)
    ops = [node.op_type] if bias is None or node.op_type == "Gemm" else ["MatMul", "Add"]
    embedding = graph.data_input(node)
    while embedding is not None:
        producer = graph.producer.get(embedding)
        if producer is None or producer.op_type not in RESHAPING_OPS:
            break
        ops.insert(0, producer.op_type)
        embedding = producer.input[0]
    pool = graph.producer.get(embedding) if embedding is not None else None
    layout = _pool_layout(graph, pool) if pool is not None else None
    if pool is None or layout is None:
        raise _refusal(graph, output, "no global average pooling before the dense layer")
    ops.insert(0, pool.op_type)
    activations = pool.input[0]
    shape = graph.shape(activations)
    if shape is not None and len(shape) != 4:
        raise ModelError(f"the pooled tensor {activations!r} is not 4-D (shape {shape})")
    channels = shape[CHANNEL_AXIS[layout]] if shape is not None else None
    k = weights.shape[0]
    if isinstance(channels, int) and channels != k:
        raise ModelError(
            f"the pooled tensor {activations!r} has {channels} channels but the dense "
            f"layer's weights are ({k}, {weights.shape[1]})"
        )
    bias_c = np.zeros(weights.shape[1], np.float32) if bias is None else bias
    return Head(activations, layout, logits, weights, bias_c, tuple(ops))


def _dense_weights(
    graph: Graph, node: onnx.NodeProto, bias: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(K, C) weights and (C,) bias (or None) of a MatMul (+ Add) or a Gemm."""
    if node.op_type == "MatMul":
        w = graph.constant(node.input[1])
        if w is None or w.ndim != 2:
            raise ModelError("the dense layer's weights are not a constant (K, C) matrix")
        return w.astype(np.float32), _bias_vector(bias, w.shape[1])
    if attribute(node, "transA", 0):
        raise ModelError("the dense layer transposes its input (Gemm transA=1)")
    b = graph.constant(node.input[1])
    if b is None or b.ndim != 2:
        raise ModelError("the dense layer's weights are not a constant matrix")
    w = (b.T if attribute(node, "transB", 0) else b) * float(attribute(node, "alpha", 1.0))
    c = graph.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and c is None:
        raise ModelError("the dense layer's bias is not a constant")
    if c is not None:
        c = c * float(attribute(node, "beta", 1.0))
    return w.astype(np.float32), _bias_vector(c, w.shape[1])


def _bias_vector(bias: np.ndarray | None, classes: int) -> np.ndarray | None:
    if bias is None:
        return None
    if bias.size not in (1, classes):
        raise ModelError(f"the dense layer's bias has shape {bias.shape}, not ({classes},)")
    return np.broadcast_to(np.ravel(bias), (classes,)).astype(np.float32)


def _pool_layout(graph: Graph, pool: onnx.NodeProto) -> str | None:
    """The pooled map's layout when ``pool`` is a global average pool, else None."""
    if pool.op_type == "GlobalAveragePool":
        return "nchw"
    if pool.op_type == "ReduceMean":
        axes = graph.reduce_axes(pool)
        return {(2, 3): "nchw", (1, 2): "nhwc"}.get(axes) if axes is not None else None
    return None


def _refusal(graph: Graph, output: str, why: str) -> ModelError:
    """The one line that says what the head is instead of pool-plus-dense."""
    ops: list[str] = []
    name: str | None = output
    while name is not None and len(ops) < DESCRIBE_OPS:
        node = graph.producer.get(name)
        if node is None or node.op_type in SPATIAL_OPS:
            break
        ops.insert(0, node.op_type)
        if node.op_type in POOL_OPS:
            break  # the head starts at the (last) pooling
        name = graph.data_input(node)
    dense = sum(op in DENSE_OPS for op in ops)
    if dense > 1:
        why = f"{dense} dense layers"
    chain = " \u2192 ".join(ops) or "empty"
    return ModelError(
        f"the head is {chain}: {why}, not pool-plus-dense; adopt it with --layer TENSOR "
        "for layer-wise CRM"
    )


def adopt_model(
    source: str | Path,
    out: str | Path,
    *,
    class_names: Sequence[str],
    layer: str | None = None,
    layout: str | None = None,
    preprocessing: Preprocessing = Preprocessing(),
    input_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> Adopted:
    """Adopt the ONNX CNN at ``source`` and write it, with modlabel's metadata, to ``out``.

    class_names: C names in the order of the model's outputs. layer: the tensor to expose
    as the activations; a model whose head is not pool-plus-dense needs it, and is then
    layer-wise only (so is one whose ``layer`` is not the pooled map). layout: the input's,
    "nchw" (N, 3, H, W) or "nhwc" (N, H, W, 3); None: from the input's shape.
    input_size: (H, W), needed when the input's shape leaves it open. ``ModelError`` for a
    model it cannot adopt, with the reason.
    """
    source, out = Path(source), Path(out)
    model = load_model(source)
    if any(p.key == METADATA_KEY for p in model.metadata_props):
        raise ModelError(f"{source}: a modlabel model already (it has modlabel metadata)")
    graph = Graph(model)
    image, layout_, size = _input_of(graph, source, layout, input_size)
    if not graph.output_names:
        raise ModelError(f"{source}: the graph has no output")
    output = graph.output_names[0]
    try:
        head: Head | None = find_head(graph, output)
    except ModelError as exc:
        if layer is None:
            raise ModelError(f"{source}: {exc}") from None
        head = None
    if layer is not None and not graph.has(layer):
        raise ModelError(f"{source}: no tensor {layer!r} in the graph")
    # The closed-form head, when there is one and the activations are what it pools.
    dense = head if head is not None and layer in (None, head.activations) else None
    logits = head.logits if head is not None else graph.logits_of(output)
    activations = dense.activations if dense is not None else str(layer)
    if activations not in graph.ancestors(logits):
        raise ModelError(f"{source}: the tensor {activations!r} does not feed the logits")
    act_layout = (
        dense.activations_layout
        if dense is not None
        else graph.layout_of(activations, input_layout=layout_)
    )
    act_shape = graph.shape(activations)
    if act_shape is not None and len(act_shape) != 4:
        raise ModelError(f"{source}: {activations!r} is not a 4-D map (shape {act_shape})")
    if act_layout is None:
        raise ModelError(f"{source}: cannot tell whether {activations!r} is NCHW or NHWC")

    adopted = _with_outputs(model, graph, logits, activations)
    session = new_session(
        adopted.SerializeToString(), failure=f"{source}: onnxruntime cannot load it"
    )
    rng = np.random.default_rng(seed)
    batch = rng.standard_normal((CHECK_BATCH, *size, 3)).astype(np.float32)
    fed = np.ascontiguousarray(to_layout(batch, layout_))
    try:
        values = session.run(None, {image: fed})
    except Exception as exc:  # onnxruntime's own, untyped: a batch of 2 it cannot take
        raise ModelError(
            f"{source}: the model does not run on a batch of {CHECK_BATCH} ({exc}); "
            "a fixed batch size (a Reshape to 1 x ...) cannot be adopted"
        ) from None
    got = dict(zip([o.name for o in session.get_outputs()], values, strict=True))
    num_classes = int(got[LOGITS].shape[-1])
    if got[LOGITS].ndim != 2 or num_classes != len(class_names):
        shape = " x ".join(str(d) for d in got[LOGITS].shape[1:]) or "no"
        raise ModelError(
            f"{source}: the model gives {shape} scores per image but "
            f"{len(class_names)} class names were given"
        )
    output_difference = _check_outputs(model, image, fed, got, source)

    _state_output_shapes(adopted, got)

    mean, std = preprocessing.folded()
    acts = channels_last(got[ACTIVATIONS], act_layout)
    if dense is not None:
        weights, bias, head_ops = dense.weights, dense.bias, dense.ops
    else:  # layer-wise only: no head to store (``ModelInfo.layer_wise_only``)
        weights, bias, head_ops = np.zeros((0, num_classes), np.float32), None, ()
    info = ModelInfo(
        class_names=[str(n) for n in class_names],
        input_size=size,
        mean=mean,
        std=std,
        head_weights=weights,
        head_bias=np.zeros(num_classes, np.float32) if bias is None else bias,
        backbone=_backbone_name(source),
        cut_layer=activations,
        activation_shape=(int(acts.shape[1]), int(acts.shape[2]), int(acts.shape[3])),
        pooling="mean",
        extra={
            "adopted_from": {
                "file": source.name,
                "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                "producer": f"{model.producer_name} {model.producer_version}".strip(),
                "logits_tensor": logits,
            }
        },
        layout=layout_,
        activations_layout=act_layout,
        layer_wise_only=dense is None,
    )
    info.check()
    head_difference = None
    if dense is not None:
        scores = maps.terms(acts, info.head_weights, bias=info.head_bias).scores
        head_difference = _relative_difference(scores, got[LOGITS])
        if head_difference > HEAD_TOLERANCE:
            raise ModelError(
                f"{source}: the logits differ from the head read from the graph "
                f"(GAP(activations) @ W + b) by {head_difference:.3g} relative; not adopted"
            )
    onnx.helper.set_model_props(adopted, {METADATA_KEY: info.to_json()})
    _write_checked(adopted, out)
    notes = []
    if dense is None:
        notes.append(
            "layer-wise only: no closed-form maps; explain and localize draw CRM at --layer"
        )
        if head is not None:
            notes.append(
                f"(its head pools {head.activations!r}: adopt without --layer for the "
                "closed-form maps)"
            )
    return Adopted(out, info, head_ops, output_difference, head_difference, notes)


def _input_of(
    graph: Graph, source: Path, layout: str | None, input_size: tuple[int, int] | None
) -> tuple[str, str, tuple[int, int]]:
    """(input name, layout, (H, W)) of the graph's one float32 image input."""
    inputs = [i for i in graph.model.graph.input if i.name in graph.input_names]
    if len(inputs) != 1:
        raise ModelError(f"{source}: the model has {len(inputs)} inputs; adopt takes one image")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"{source}: the input is not float32")
    shape = graph.shape(inputs[0].name)
    if shape is None or len(shape) != 4:
        raise ModelError(f"{source}: the input is not 4-D (N, 3, H, W) or (N, H, W, 3)")
    if layout is None:
        first, last = shape[1] == 3, shape[3] == 3
        if first == last:
            raise ModelError(f"{source}: the input {shape} could be either; pass --layout")
        layout = "nchw" if first else "nhwc"
    if layout not in LAYOUTS:
        raise ModelError(f"unknown layout {layout!r} (nhwc or nchw)")
    channels, dims = (shape[1], shape[2:]) if layout == "nchw" else (shape[3], shape[1:3])
    if isinstance(channels, int) and channels != 3:
        raise ModelError(f"{source}: the input {shape} has {channels} channels in {layout}, not 3")
    static = tuple(d if isinstance(d, int) else None for d in dims)
    if input_size is not None:
        size = (int(input_size[0]), int(input_size[1]))
        if any(s is not None and s != v for s, v in zip(static, size, strict=True)):
            raise ModelError(f"{source}: the input is {static[0]}x{static[1]}, not {size}")
    elif None in static:
        raise ModelError(f"{source}: the input's size is not fixed; pass --input-size H W")
    else:
        size = (int(static[0]), int(static[1]))  # type: ignore[arg-type]
    if min(size) < 1:
        raise ModelError(f"{source}: the input size must be positive")
    return inputs[0].name, layout, size


def _with_outputs(
    model: onnx.ModelProto, graph: Graph, logits: str, activations: str
) -> onnx.ModelProto:
    """A copy of ``model`` with the outputs ``logits`` and ``activations`` first (Identity
    nodes; a tensor of the graph already named so is renamed ``<name>_original``), the
    original outputs after them, and a free batch dimension on the input and outputs."""
    adopted = copy.deepcopy(model)
    g = adopted.graph
    for wanted, tensor in ((LOGITS, logits), (ACTIVATIONS, activations)):
        if graph.has(wanted) and wanted != tensor:
            _rename(g, wanted, f"{wanted}_original")
            if logits == wanted:
                logits = f"{wanted}_original"
    keep = [o for o in g.output if o.name not in (LOGITS, ACTIVATIONS)]
    del g.output[:]
    for wanted, tensor in ((LOGITS, logits), (ACTIVATIONS, activations)):
        if tensor != wanted:
            g.node.append(onnx.helper.make_node("Identity", [tensor], [wanted], name=wanted))
        dims = ["N"] + [None] * (1 if wanted == LOGITS else 3)  # sizes: _state_output_shapes
        g.output.append(onnx.helper.make_tensor_value_info(wanted, _elem_type(graph, tensor), dims))
    g.output.extend(keep)
    del g.value_info[:]  # shapes inferred for a fixed batch would contradict a free one
    for value in (*g.input, *g.output):
        dims = value.type.tensor_type.shape.dim
        if dims and (value.name in graph.input_names or value in g.output):
            dims[0].Clear()
            dims[0].dim_param = "N"
    return adopted


def _state_output_shapes(model: onnx.ModelProto, got: dict[str, np.ndarray]) -> None:
    """Write the sizes seen in the check run into the two outputs' declared shapes (all
    but the batch): ``OnnxModel`` checks them against the metadata."""
    for value in model.graph.output:
        if value.name in (LOGITS, ACTIVATIONS):
            for dim, size in zip(value.type.tensor_type.shape.dim[1:], got[value.name].shape[1:],
                                 strict=True):  # fmt: skip
                dim.Clear()
                dim.dim_value = int(size)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new


def _elem_type(graph: Graph, name: str) -> int:
    info = graph.value_infos.get(name)
    if info is not None and info.type.tensor_type.elem_type:
        return int(info.type.tensor_type.elem_type)
    return onnx.TensorProto.FLOAT


def _check_outputs(
    model: onnx.ModelProto, image: str, fed: np.ndarray, got: dict[str, np.ndarray], source: Path
) -> float:
    """The original's outputs on ``fed`` against the adopted file's: the largest
    relative difference, ``ModelError`` above ``OUTPUT_TOLERANCE``. A model with a fixed
    batch size of 1 is run image by image."""
    session = new_session(
        model.SerializeToString(), failure=f"{source}: onnxruntime cannot load it"
    )
    names = [o.name for o in session.get_outputs()]
    try:
        original = session.run(None, {image: fed})
    except Exception:  # a fixed batch dimension: one image at a time
        rows = [session.run(None, {image: fed[i : i + 1]}) for i in range(len(fed))]
        original = [np.concatenate([r[j] for r in rows]) for j in range(len(names))]
    worst = 0.0
    for name, want in zip(names, original, strict=True):
        have = got.get(name if name not in (LOGITS, ACTIVATIONS) else f"{name}_original")
        if have is None:
            have = got.get(name)
        if have is None or have.shape != want.shape:
            raise ModelError(f"{source}: the adopted model lost the output {name!r}")
        worst = max(worst, _relative_difference(have, want))
    if worst > OUTPUT_TOLERANCE:
        raise ModelError(
            f"{source}: the adopted model's outputs differ from the original's by {worst:.3g} "
            "relative; not adopted"
        )
    return worst


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(1, max |b|), in float64."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.size == 0:
        return 0.0
    return float(np.max(np.abs(a64 - b64)) / max(1.0, float(np.max(np.abs(b64)))))


def _backbone_name(source: Path) -> str:
    """The model's name in modlabel's tables: the file's stem, in safe characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", source.stem).strip("-") or "adopted"


def _write_checked(model: onnx.ModelProto, out: Path) -> None:
    """Write ``model`` to ``out`` through a temporary file that must load as a modlabel
    model (``OnnxModel``), so a failed check leaves no file behind."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the adopted model is not valid ONNX ({exc})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(handle)
    try:
        onnx.save(model, tmp)
        OnnxModel(tmp, device="cpu")
        os.replace(tmp, out)
    except OSError as exc:
        raise ModlabelError(f"{out}: cannot write: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
