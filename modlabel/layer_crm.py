"""CRM at any layer: the paper's Eq. 6-7 by removing each spatial element and running the rest.

The closed form of ``maps.crm`` holds at the last conv layer of a pool-plus-dense head,
where removing an element changes each score by M_c(l, m) / s. At any other layer (or
over any other head: hidden dense layers, an adopted "layer-wise only" model) the
scores after the removal have no closed form, so they are computed: ``LayerCut`` cuts
the model's graph at the layer's tensor with ``onnx.utils.Extractor`` into a lower part
(the input -> the tensor) and an upper part (the tensor -> the logits), and
``layer_crm`` runs the upper part on every ablation of the tensor, one spatial element
(l, m) zeroed across all channels each, in bounded batches:

    R(l, m) = sum_c (S_c - S_c(l, m))^2                                   (Eq. 7)

over all C classes, with S the logits on the tensor as it is and S(l, m) the logits with
the element removed (Eq. 6). At the last conv layer of a modlabel model this equals
``maps.crm`` (mean pooling). Tensors the upper part reads besides the layer's (a
residual branch from below it) come from the lower part, held as they are.

Cost per image: h * w runs of the upper part (batched), so a layer deep in the network
costs about h * w forward passes of what lies above it (benchmarks/bench_layer_crm.py).
Needs the ``onnx`` package (``onnx_graph``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from . import stopping
from .errors import ModelError
from .metadata import LOGITS
from .model import CHANNEL_AXIS, OnnxModel, new_session
from .onnx_graph import Graph, load_model, onnx

DEFAULT_BATCH = 64  # ablations per run of the upper part
MAX_BATCH_BYTES = 256 * 2**20  # and at most this much of ablated tensors per run
LAYER_PREFIX = "crm@"  # a layer's map is named crm@<tensor> (explain, localize)


def layer_map_name(tensor: str) -> str:
    """The name the layer's CRM has in figures and reports: ``crm@<tensor>``."""
    return f"{LAYER_PREFIX}{tensor}"


@dataclass(frozen=True)
class _Side:
    name: str
    per_image: bool  # a (N, ...) tensor of each image (else passed as it is)


class LayerCut:
    """``model`` cut at ``tensor``: the lower and upper parts as onnxruntime sessions.

    tensor: a 4-D tensor of the graph that the logits are computed from. layout: its
    layout, "nchw" (N, K, h, w) or "nhwc"; None: from the operators around it
    (``Graph.layout_of``). ``ModelError`` when the tensor is missing, not 4-D, does not
    feed the logits, or its layout cannot be told.
    """

    def __init__(self, model: OnnxModel, tensor: str, *, layout: str | None = None) -> None:
        self.model = model
        self.tensor = tensor
        proto = load_model(model.path)
        graph = Graph(proto)
        where = f"{model.path}"
        if not graph.has(tensor):
            raise ModelError(f"{where}: no tensor {tensor!r}; {_some_layers(graph)}")
        logits = graph.logits_of(LOGITS)
        behind = graph.ancestors(logits)
        if tensor not in behind or tensor == logits:
            raise ModelError(
                f"{where}: the logits are not computed from {tensor!r}; {_some_layers(graph)}"
            )
        shape = graph.shape(tensor)
        if shape is not None and len(shape) != 4:
            raise ModelError(f"{where}: {tensor!r} is not a 4-D map (shape {shape})")
        self.layout = layout or graph.layout_of(tensor, input_layout=model.info.layout)
        if self.layout not in CHANNEL_AXIS:
            raise ModelError(f"{where}: cannot tell whether {tensor!r} is NCHW or NHWC")
        sides = _side_inputs(graph, tensor, logits)
        typed = _typed(proto, graph, [tensor, *sides, logits])
        extractor = onnx.utils.Extractor(typed)
        image = model.session.get_inputs()[0].name
        try:
            lower = extractor.extract_model([image], [tensor, *sides])
            upper = extractor.extract_model([tensor, *sides], [logits])
        except Exception as exc:  # onnx's own: a graph the extractor cannot cut
            raise ModelError(f"{where}: cannot cut the graph at {tensor!r} ({exc})") from None
        providers = model.session.get_providers()
        self.lower = _part_session(lower, providers, where)
        self.upper = _part_session(upper, providers, where)
        per_image = {v.name: _batched(v) for v in lower.graph.output}
        self.sides = tuple(_Side(name, per_image[name]) for name in sides)

    @property
    def name(self) -> str:
        """The map's name: ``crm@<tensor>``."""
        return layer_map_name(self.tensor)

    def lower_run(self, inputs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """inputs: (N, H, W, 3) float32, preprocessed -> the tensor in its own layout and
        the side tensors the upper part also reads."""
        outs = self.lower.run(None, {self.lower.get_inputs()[0].name: self.model.feed(inputs)})
        return outs[0], {s.name: v for s, v in zip(self.sides, outs[1:], strict=True)}

    def upper_run(self, tensor: np.ndarray, sides: dict[str, np.ndarray]) -> np.ndarray:
        """The logits (B, C) of the upper part on ``tensor`` (B, ...) in its own layout."""
        feed = {self.tensor: np.ascontiguousarray(tensor, np.float32), **sides}
        return self.upper.run(None, feed)[0]


def layer_crm(
    cut: LayerCut,
    inputs: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH,
    max_batch_bytes: int = MAX_BATCH_BYTES,
) -> np.ndarray:
    """CRM at the cut's layer (Eq. 6-7) for a batch of images.

    inputs: (N, H, W, 3) float32, preprocessed (``OnnxModel.preprocess``). Each image's
    h * w ablations run through the upper part ``batch_size`` at a time (fewer when that
    many would pass ``max_batch_bytes``). Returns (N, h, w) float32, >= 0:
    sum_c (S_c - S_c(l, m))^2 with S the logits of the upper part, in float64 from its
    float32 outputs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tensor, sides = cut.lower_run(inputs)
    if tensor.ndim != 4:
        raise ModelError(f"{cut.model.path}: {cut.tensor!r} is {tensor.ndim}-D, not a 4-D map")
    n = tensor.shape[0]
    h, w = tensor.shape[2:4] if cut.layout == "nchw" else tensor.shape[1:3]
    per_image = {s.name for s in cut.sides if s.per_image}
    one = tensor[0].nbytes + sum(sides[k][0].nbytes for k in per_image)
    step = max(1, min(batch_size, max_batch_bytes // max(1, one)))
    full = np.concatenate(
        [
            cut.upper_run(tensor[i : i + step], _rows(sides, per_image, slice(i, i + step)))
            for i in range(0, n, step)
        ]
    ).astype(np.float64)
    relevance = np.empty((n, h * w), np.float64)
    for images, locations in _chunks(n, h * w, step):
        stopping.check()  # a stop asked for ends the ablations between runs
        ablated = tensor[images]  # a copy (fancy indexing)
        rows, cols = np.divmod(locations, w)
        if cut.layout == "nchw":
            ablated[np.arange(len(images)), :, rows, cols] = 0
        else:
            ablated[np.arange(len(images)), rows, cols, :] = 0
        scores = cut.upper_run(ablated, _rows(sides, per_image, images))
        difference = full[images] - scores.astype(np.float64)
        relevance[images, locations] = np.einsum("bc,bc->b", difference, difference)
    return relevance.reshape(n, h, w).astype(np.float32)


class LayerCrm:
    """Layer-wise CRM as a map source for ``explain`` and ``localize``
    (``infer.LayerMaps``): ``names`` is ``("crm@<tensor>",)``; called with a batch's
    inputs (N, H, W, 3) float32, preprocessed, it returns that name -> (N, h, w)."""

    def __init__(self, model: OnnxModel, tensor: str, *, batch_size: int = DEFAULT_BATCH) -> None:
        self.cut = LayerCut(model, tensor)
        self.batch_size = batch_size
        self.names = (self.cut.name,)

    def __call__(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {self.cut.name: layer_crm(self.cut, inputs, batch_size=self.batch_size)}


def layer_maps_for(model: OnnxModel, layer: str | None) -> LayerCrm | None:
    """The layer-wise CRM a command draws: at ``layer`` (``--layer``); for a layer-wise-only
    model without one, at its activations (``ModelInfo.cut_layer``); else None."""
    if layer is None and model.info.layer_wise_only:
        layer = model.info.cut_layer
    return LayerCrm(model, layer) if layer else None


def _chunks(images: int, locations: int, step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image index, location index) pairs of every ablation, ``step`` at a time."""
    total = images * locations
    for start in range(0, total, step):
        flat = np.arange(start, min(start + step, total))
        yield flat // locations, flat % locations


def _rows(sides: dict[str, np.ndarray], per_image: set[str], rows: object) -> dict:
    """The side inputs for a batch of ablations: each image's row of a per-image tensor."""
    return {k: np.ascontiguousarray(v[rows]) if k in per_image else v for k, v in sides.items()}


def _side_inputs(graph: Graph, tensor: str, logits: str) -> list[str]:
    """The tensors besides ``tensor`` that the upper part reads and that depend on the
    model's input (a residual branch from below the cut): computed by the lower part
    and held fixed. Constants and what is computed from constants alone stay in the
    upper part."""
    after = graph.descendants([tensor])
    from_input = graph.descendants(graph.input_names)
    upper = graph.ancestors(logits, stop=[tensor])
    sides: list[str] = []
    for node in graph.nodes:
        if not any(out in after and out in upper and out != tensor for out in node.output):
            continue  # not in the upper part (the tensor's own producer is the lower's)
        for name in node.input:
            if name and name not in after and name in from_input and name not in sides:
                sides.append(name)
    return sides


def _typed(proto: onnx.ModelProto, graph: Graph, names: list[str]) -> onnx.ModelProto:
    """``proto`` with the inferred types of ``names`` in its value_info, which the
    Extractor needs for the tensors it makes inputs and outputs (float32 where shape
    inference could not tell)."""
    typed = onnx.ModelProto()
    typed.CopyFrom(proto)
    known = {v.name for v in (*typed.graph.value_info, *typed.graph.input, *typed.graph.output)}
    for name in names:
        if name in known:
            continue
        info = graph.value_infos.get(name)
        typed.graph.value_info.append(
            info if info is not None
            else onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )  # fmt: skip
    return typed


def _batched(value: onnx.ValueInfoProto) -> bool:
    """Whether an output's first dimension is the batch (symbolic or unknown, not a
    fixed size), so each image's row is taken."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        return False
    dims = tensor.shape.dim if tensor.HasField("shape") else None
    return not dims or not dims[0].HasField("dim_value") or dims[0].dim_value == 1


def _part_session(proto: onnx.ModelProto, providers: list[str], where: str) -> ort.InferenceSession:
    return new_session(
        proto.SerializeToString(),
        failure=f"{where}: cannot run a part of the cut graph",
        providers=providers,
    )


def _some_layers(graph: Graph) -> str:
    """A hint naming the last 4-D tensors the logits are computed from."""
    layers = graph.spatial_tensors(graph.logits_of(LOGITS))
    if not layers:
        return "the graph names no 4-D tensor the logits are computed from"
    return "4-D tensors the logits are computed from include " + ", ".join(layers[-6:])
