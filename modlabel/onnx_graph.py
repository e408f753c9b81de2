"""Read an ONNX graph: who makes and who reads each tensor, its constants, shapes and layout.

``adopt`` (taking in any ONNX CNN) and ``layer_crm`` (cutting a model at a layer) read
graphs through ``Graph``. This module needs the ``onnx`` package, which the runtime
(scan, report, a plain ``explain``) does without: importing it without ``onnx``
installed is a ``ModlabelError`` saying how to install it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import ModelError, ModlabelError

try:
    import onnx
    from onnx import numpy_helper, shape_inference
except ImportError:  # the runtime's install has no onnx: say what to install, no traceback
    raise ModlabelError(
        "this needs the onnx package, which the runtime does without: pip install onnx "
        "(or pip install 'modlabel[train]')"
    ) from None

# ONNX's own operators whose 4-D data are channels first (N, K, H, W), by the standard.
CHANNELS_FIRST_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool",
        "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "BatchNormalization",
        "InstanceNormalization", "LRN", "MaxRoiPool", "SpaceToDepth", "DepthToSpace",
    }
)  # fmt: skip
# Operators whose output has the layout of their (first non-constant) data input.
LAYOUT_KEEPING_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Clip", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Identity",
        "Dropout", "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Concat", "Pow",
        "Sqrt", "Abs", "Neg", "Exp", "Cast",
    }
)  # fmt: skip
# What may follow the logits to make a graph's output (so the logits are their input).
OUTPUT_ACTIVATIONS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "Identity"})


def load_model(path: str | Path) -> onnx.ModelProto:
    """The ONNX file at ``path``; ``ModelError`` when it cannot be read or is no ONNX."""
    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except Exception as exc:  # protobuf's DecodeError and onnx's own, untyped
        raise ModelError(f"{path}: not an ONNX model ({exc})") from None


class Graph:
    """A read-only view of a model's graph, with the shapes ONNX's inference finds.

    ``producer[t]``: the node that writes tensor t (absent for inputs and constants);
    ``consumers[t]``: the nodes that read it; ``constant(t)``: its value when it is an
    initializer or a ``Constant`` node's output, else None; ``shape(t)``: a list of ints
    and names (None where unknown), or None when the tensor's rank is unknown.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        try:
            self.inferred = shape_inference.infer_shapes(model)
        except Exception:  # an operator ONNX cannot infer: fewer shapes, still a graph
            self.inferred = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in self.initializers]
        self.output_names = [o.name for o in graph.output]
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    @cached_property
    def value_infos(self) -> dict[str, onnx.ValueInfoProto]:
        """Every tensor's type as shape inference (or the file) states it, by name."""
        g = self.inferred.graph
        return {v.name: v for v in (*g.value_info, *g.input, *g.output)}

    def has(self, name: str) -> bool:
        """Whether ``name`` is a tensor of the graph (an input, a constant or a node's output)."""
        return name in self.producer or name in self.initializers or name in self.input_names

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (an initializer, a ``Constant`` node's output, or
        an ``Identity`` of one), else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            return self.constant(node.input[0])
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                    return np.asarray(onnx.helper.get_attribute_value(attr))
        return None

    def shape(self, name: str) -> list[int | str | None] | None:
        """The tensor's shape, each dimension an int, a symbolic name or None; None when
        its rank is unknown."""
        info = self.value_infos.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        dims: list[int | str | None] = []
        for d in info.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        return dims

    def data_input(self, node: onnx.NodeProto) -> str | None:
        """A node's first input that is not a constant: the data it works on."""
        for name in node.input:
            if name and self.constant(name) is None:
                return name
        return None

    def ancestors(self, name: str, *, stop: Iterable[str] = ()) -> set[str]:
        """Every tensor that ``name`` is computed from (itself included), not looking
        past the tensors in ``stop``."""
        stops, seen = set(stop), {name}
        todo = deque([name])
        while todo:
            current = todo.popleft()
            node = self.producer.get(current)
            if current in stops or node is None:
                continue
            for up in node.input:
                if up and up not in seen:
                    seen.add(up)
                    todo.append(up)
        return seen

    def descendants(self, names: Iterable[str]) -> set[str]:
        """Every tensor computed from any of ``names`` (they included)."""
        seen = set(names)
        todo = deque(seen)
        while todo:
            for node in self.consumers.get(todo.popleft(), ()):
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        todo.append(out)
        return seen

    def logits_of(self, output: str) -> str:
        """The tensor before a graph output's Softmax (LogSoftmax, Sigmoid, Identity): the
        scores S_c of Eq. 1, pre-activation."""
        name = output
        while (node := self.producer.get(name)) is not None and node.op_type in OUTPUT_ACTIVATIONS:
            name = node.input[0]
        return name

    def layout_of(self, name: str, *, input_layout: str) -> str | None:
        """ "nchw" or "nhwc" for a 4-D tensor, from the operators around it: ONNX's conv
        and pooling operators are channels first; a Transpose says which way it turns;
        element-wise operators keep the layout of their input; the graph's input has
        ``input_layout``; a ReduceMean over axes (1, 2) or (2, 3) pools a channels-last or
        channels-first map. None when nothing around the tensor says."""
        for consumer in self.consumers.get(name, ()):
            if consumer.op_type in CHANNELS_FIRST_OPS and consumer.input[0] == name:
                return "nchw"
            if consumer.op_type == "ReduceMean":
                axes = self.reduce_axes(consumer)
                if axes in ((1, 2), (2, 3)):
                    return "nhwc" if axes == (1, 2) else "nchw"
            if consumer.op_type == "Transpose":
                perm = tuple(_ints(consumer, "perm"))
                if perm in ((0, 2, 3, 1), (0, 3, 1, 2)):
                    return "nchw" if perm == (0, 2, 3, 1) else "nhwc"
        seen: set[str] = set()
        todo = deque([name])
        while todo:
            current = todo.popleft()
            if current in seen:
                continue
            seen.add(current)
            if current in self.input_names:
                return input_layout
            node = self.producer.get(current)
            if node is None:
                continue
            if node.op_type in CHANNELS_FIRST_OPS:
                return "nchw"
            if node.op_type == "Transpose":
                perm = tuple(_ints(node, "perm"))
                if perm in ((0, 2, 3, 1), (0, 3, 1, 2)):
                    return "nhwc" if perm == (0, 2, 3, 1) else "nchw"
                continue
            if node.op_type in LAYOUT_KEEPING_OPS:
                todo.extend(n for n in node.input if n and self.constant(n) is None)
        return None

    def reduce_axes(self, node: onnx.NodeProto) -> tuple[int, ...] | None:
        """A Reduce* node's axes, sorted, made non-negative for a 4-D input (the
        attribute before opset 18, the second input since); None for "all axes"."""
        axes: list[int] | None = None
        if len(node.input) > 1 and node.input[1]:
            value = self.constant(node.input[1])
            axes = None if value is None else [int(v) for v in np.ravel(value)]
        elif any(a.name == "axes" for a in node.attribute):
            axes = list(_ints(node, "axes"))
        if axes is None:
            return None
        return tuple(sorted(a % 4 for a in axes))

    def spatial_tensors(self, of: str) -> list[str]:
        """The 4-D tensors that ``of`` is computed from, in graph order: the layers
        whose CRM can be asked for."""
        behind = self.ancestors(of)
        found = []
        for node in self.nodes:
            for out in node.output:
                shape = self.shape(out)
                if out in behind and shape is not None and len(shape) == 4:
                    found.append(out)
        return found


def attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    """A node's attribute value by name (``default`` when it has none)."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _ints(node: onnx.NodeProto, name: str) -> list[int]:
    return [int(v) for v in attribute(node, name, [])]  # type: ignore[union-attr]
