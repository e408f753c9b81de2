"""ONNX CNNs as other tools export them (no modlabel metadata), made with ``onnx.helper``.

``cnn_nchw`` writes a small PyTorch-style model: input (N, 3, H, W), channels first
throughout, tensor names as PyTorch's exporter gives them::

    input -> Conv 3x3 -> Relu (relu1) -> MaxPool 2x2 (pool1) -> Conv 3x3 -> Relu (relu2)
      [residual: -> Conv 3x3 -> Relu (relu3) -> Add relu2 -> Relu (block)]
      -> GlobalAveragePool -> Flatten -> head -> [Softmax] -> output

with the head ``gemm`` (Gemm, transB=1, as torch.nn.Linear exports), ``matmul``
(MatMul + Add) or ``hidden`` (Gemm -> Relu -> Gemm: a hidden dense layer, which adopt
refuses without ``--layer``). Weights are normal with std ``std`` (0.1) and so are the
biases: random, but of the sizes a trained model has. ``masked`` adds an input ``mask``
(1, 1, h, w) that multiplies a tensor, the brute force of layer-wise CRM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "input"
OUTPUT = "output"
MASK = "mask"


def cnn_nchw(
    path: str | Path,
    *,
    classes: int = 3,
    input_hw: tuple[int, int] = (16, 16),
    channels: tuple[int, int] = (6, 8),
    head: str = "gemm",
    residual: bool = False,
    softmax: bool = False,
    opset: int = 17,
    seed: int = 0,
    std: float = 0.1,
) -> Path:
    """Write the model to ``path`` and return the path (the same seed, the same file)."""
    rng = np.random.default_rng(seed)
    c1, c2 = channels
    height, width = input_hw

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0.0, std, size=shape).astype(np.float32), name)

    def conv(x: str, out: str, w: str, b: str) -> onnx.NodeProto:
        return helper.make_node(
            "Conv", [x, w, b], [out], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name=out
        )

    inits = [weight("w1", c1, 3, 3, 3), weight("b1", c1), weight("w2", c2, c1, 3, 3),
             weight("b2", c2)]  # fmt: skip
    nodes = [
        conv(INPUT, "conv1", "w1", "b1"),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2]),
        conv("pool1", "conv2", "w2", "b2"),
        helper.make_node("Relu", ["conv2"], ["relu2"]),
    ]
    last = "relu2"
    if residual:
        inits += [weight("w3", c2, c2, 3, 3), weight("b3", c2)]
        nodes += [
            conv("relu2", "conv3", "w3", "b3"),
            helper.make_node("Relu", ["conv3"], ["relu3"]),
            helper.make_node("Add", ["relu3", "relu2"], ["add"]),
            helper.make_node("Relu", ["add"], ["block"]),
        ]
        last = "block"
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
    ]
    scores = OUTPUT if not softmax else "scores"
    if head == "gemm":
        inits += [weight("fc_w", classes, c2), weight("fc_b", classes)]
        nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [scores], transB=1))
    elif head == "matmul":
        inits += [weight("fc_w", c2, classes), weight("fc_b", classes)]
        nodes += [
            helper.make_node("MatMul", ["flat", "fc_w"], ["fc"]),
            helper.make_node("Add", ["fc_b", "fc"], [scores]),  # the bias first, as tf2onnx may
        ]
    elif head == "hidden":
        inits += [weight("fc1_w", 16, c2), weight("fc1_b", 16), weight("fc2_w", classes, 16),
                  weight("fc2_b", classes)]  # fmt: skip
        nodes += [
            helper.make_node("Gemm", ["flat", "fc1_w", "fc1_b"], ["fc1"], transB=1),
            helper.make_node("Relu", ["fc1"], ["fc1_relu"]),
            helper.make_node("Gemm", ["fc1_relu", "fc2_w", "fc2_b"], [scores], transB=1),
        ]
    else:
        raise ValueError(f"unknown head {head!r}")
    if softmax:
        nodes.append(helper.make_node("Softmax", [scores], [OUTPUT], axis=1))
    graph = helper.make_graph(
        nodes,
        "torch_jit",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, height, width])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, producer_name="pytorch", opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 7 if opset <= 13 else 8
    onnx.checker.check_model(model, full_check=True)
    out = Path(path)
    onnx.save(model, out)
    return out


def masked(path: str | Path, tensor: str, out: str | Path) -> Path:
    """The model at ``path`` with ``tensor`` multiplied by a new input ``mask`` (1, 1, h, w)
    (broadcast over the batch and the channels) before anything reads it."""
    model = onnx.load(str(path))
    g = model.graph
    for node in g.node:
        node.input[:] = [f"{tensor}_masked" if n == tensor else n for n in node.input]
    g.node.append(helper.make_node("Mul", [tensor, MASK], [f"{tensor}_masked"]))
    g.input.append(helper.make_tensor_value_info(MASK, TensorProto.FLOAT, [1, 1, None, None]))
    sorted_nodes = _topological(g)
    del g.node[:]
    g.node.extend(sorted_nodes)
    onnx.save(model, str(out))
    return Path(out)


def _topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    todo, done = list(graph.node), []
    while todo:
        for node in todo:
            if all(n in ready for n in node.input if n):
                done.append(node)
                ready.update(node.output)
                todo.remove(node)
                break
        else:
            raise ValueError("the graph has a cycle")
    return done
