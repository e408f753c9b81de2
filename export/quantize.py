"""Quantize: an exported fp32 model to a static int8 one, checked against it.

``quantize_run(RUN, M.onnx, M.int8.onnx)`` uses onnxruntime's own tools
(``onnxruntime.quantization``): ``quant_pre_process`` (ONNX shape inference
and onnxruntime's basic graph optimizations), then ``quantize_static`` with
MinMax calibration on images of the run's training split, in the QDQ format
with per-channel int8 weights and uint8 activations (U8S8: the options measured
fastest on an x86 CPU with VNNI, at full agreement: README, "Models and
training", and ``benchmarks/bench_quantize.py``).

What stays float, so that the maps are computed exactly as for fp32:

* the ``activations`` output: the graph ends in DequantizeLinear, so both
  outputs are float32 tensors and ``modlabel.maps`` reads them unchanged;
* the dense head (global average pooling, MatMul, Add: every node that feeds
  ``logits`` but not ``activations``). It is not quantized, so the int8
  model's logits are ``GAP(activations) @ W + b`` with the head stored in the
  metadata, and the CRM explains the scores the model reports. It is a
  K x C product per image, nothing to gain from int8.

Images are decoded exactly as the runtime decodes them
(``modlabel.decode.load_pixels`` then ``normalize`` with the run's mean and
std). The calibration images are taken class by class in turn from the
training split (up to ``calibration``); the int8 model is then compared with
the fp32 one on the test split (the validation split where there is none):
label agreement (the share of images with the same arg max), the Pearson
correlation of the logits (all of them, flattened), the per-image Pearson
correlation of the CRMs (min and mean), and the largest difference between
the int8 logits and its own head. It is refused (``QuantizationError``,
nothing written) when the agreement is below ``min_agreement`` or the head
does not explain the logits. Otherwise it is written like an export: the
``modlabel`` metadata of the fp32 model, with ``extra["quantization"]``
added, into a temporary file that the runtime loads once before it is
renamed into place. Its sha256 differs from the fp32 file's, so it is a model
of its own in the database (``OnnxModel.identity``).

onnx and onnxruntime.quantization are imported only when a function needs them.
"""

from __future__ import annotations

import csv
import hashlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

import modlabel
from modlabel.decode import normalize
from modlabel.maps import crm
from modlabel.metadata import ACTIVATIONS, INPUT_NAME, LOGITS, METADATA_KEY, ModelInfo
from modlabel.model import OnnxModel
from modlabel.train.rundir import SPLIT_CSV

from .errors import QuantizationError
from .onnx_export import CPU, _write_verified, read_run
from .parity import image_pixels

DEFAULT_CALIBRATION = 64
DEFAULT_MIN_AGREEMENT = 0.995
INT8_SUFFIX = ".int8.onnx"
CALIBRATION_SPLIT = "train"
# The int8 model is judged on images that were not used to train or calibrate it.
EVALUATION_SPLITS = ("test", "val")
# Images per onnxruntime run, in calibration and evaluation: it bounds memory (a
# VGG16 at 300 x 300 computes about 100 MB of feature maps per image).
BATCH_SIZE = 8
# Tolerance of int8 logits against GAP(int8 activations) @ W + b, times
# max(1, max |logits|): the head runs in float32 on the dequantized activations,
# as in the fp32 export's parity check.
HEAD_ATOL = 1e-4

QuantType = Literal["int8", "uint8"]


@dataclass(frozen=True)
class QuantizeOptions:
    """How ``quantize_static`` is called. The defaults are the fastest
    combination measured on vgg16 at 300 x 300 (``benchmarks/bench_quantize.py``).

    quant_format: "qdq" (QuantizeLinear/DequantizeLinear pairs around float ops,
    fused by onnxruntime at load time) or "qoperator" (QLinearConv and so on).
    per_channel: one weight scale per output channel, not one per tensor.
    activation_type, weight_type: "int8" (S8) or "uint8" (U8).
    reduce_range: 7-bit weights (for CPUs without VNNI).
    op_types: the op types to quantize; None for all that onnxruntime can.
    preprocess: run ``quant_pre_process`` first.
    quantize_head: also quantize the dense head (then the maps no longer
    explain the logits exactly, and ``quantize_run`` refuses the model).
    """

    quant_format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    # x86's VNNI instructions multiply uint8 by int8: int8 activations cost a
    # conversion per product (S8S8 measured 10-13% slower than U8S8 on vgg16@300).
    activation_type: QuantType = "uint8"
    weight_type: QuantType = "int8"
    reduce_range: bool = False
    op_types: tuple[str, ...] | None = None
    preprocess: bool = True
    quantize_head: bool = False

    @property
    def method(self) -> str:
        """A short name for ``extra["quantization"]["method"]``: int8-static-qdq."""
        return f"int8-static-{self.quant_format}"

    def describe(self) -> str:
        """One line for people: "QDQ, per-channel, U8S8" (activations, then weights)."""
        letters = {"int8": "S8", "uint8": "U8"}
        return ", ".join(
            [
                self.quant_format.upper() if self.quant_format == "qdq" else "QOperator",
                "per-channel" if self.per_channel else "per-tensor",
                letters[self.activation_type] + letters[self.weight_type],
                *(["reduce_range"] if self.reduce_range else []),
                *([f"ops {'/'.join(self.op_types)}"] if self.op_types else []),
                *([] if self.preprocess else ["no pre-processing"]),
                *(["head quantized"] if self.quantize_head else []),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["op_types"] = list(self.op_types) if self.op_types else None
        return doc


@dataclass(frozen=True)
class Fidelity:
    """How closely a quantized model follows its fp32 original, on ``images`` images.

    agreement: share of images whose arg max of the logits is the same, in [0, 1].
    logits_correlation: Pearson correlation of all logits, flattened, in [-1, 1].
    crm_correlation_min, crm_correlation_mean: of the per-image Pearson
    correlations of the CRMs (``modlabel.maps.crm``), in [-1, 1].
    max_abs_head_diff: max |logits - (GAP(activations) @ W + b)| of the quantized
    model, with the head in the metadata; logits_scale: max |reference logits|,
    to read it against.
    """

    images: int
    agreement: float
    logits_correlation: float
    crm_correlation_min: float
    crm_correlation_mean: float
    max_abs_head_diff: float = 0.0
    logits_scale: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class QuantizationReport:
    """What ``quantize_run`` wrote and how it compares with the fp32 model."""

    out_path: Path
    sha256: str
    fp32_sha256: str
    options: QuantizeOptions
    calibration_images: int
    evaluation_split: str
    fidelity: Fidelity
    min_agreement: float
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)  # extra["quantization"] in the file


def int8_path(out_path: str | Path) -> Path:
    """Where ``modlabel export --quantize int8`` writes the int8 model unless ``--int8-out``
    names another file: beside the fp32 model ``--out``, M.onnx -> M.int8.onnx."""
    out_path = Path(out_path)
    stem = out_path.name[: -len(".onnx")] if out_path.name.endswith(".onnx") else out_path.name
    return out_path.with_name(stem + INT8_SUFFIX)


def split_image_paths(run_dir: str | Path, split: str, *, limit: int | None = None) -> list[Path]:
    """The images of ``split`` in RUN/split.csv, classes in turn, up to ``limit``.

    Classes in turn (the first image of each class, then the second, ...) so
    that a small calibration set still sees every class. Paths are under the
    run's ``data_dir``. Raises ``QuantizationError`` when the run has no
    split.csv or its data directory cannot be read.
    """
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    data_dir = run.get("data_dir")
    split_file = run_dir / SPLIT_CSV
    if not data_dir or not Path(data_dir).is_dir():
        raise QuantizationError(
            f"{run_dir}: the run's data directory {data_dir!r} cannot be read; int8 "
            "quantization calibrates and checks on the run's own images"
        )
    try:
        with split_file.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if {"split", "class", "path"} <= r.keys()]
    except FileNotFoundError:
        raise QuantizationError(f"{run_dir}: no {SPLIT_CSV}; it names the run's images") from None
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise QuantizationError(f"{split_file}: cannot read: {exc}") from None
    by_class: dict[str, list[Path]] = {}
    for row in rows:
        if row["split"] == split:
            by_class.setdefault(row["class"], []).append(Path(data_dir) / row["path"])
    picked = [
        path
        for turn in range(max((len(v) for v in by_class.values()), default=0))
        for paths in by_class.values()
        if turn < len(paths)
        for path in paths[turn : turn + 1]
    ]
    return picked if limit is None else picked[:limit]


def evaluation_split(run_dir: str | Path) -> tuple[str, list[Path]]:
    """The split the int8 model is judged on (test, else val) and its images."""
    for split in EVALUATION_SPLITS:
        paths = split_image_paths(run_dir, split)
        if paths:
            return split, paths
    raise QuantizationError(
        f"{run_dir}: {SPLIT_CSV} has no test or val images to check the int8 model on"
    )


def load_batches(
    paths: Sequence[str | Path], info: ModelInfo, batch_size: int = BATCH_SIZE
) -> Iterator[np.ndarray]:
    """The images at ``paths`` as the runtime feeds them: (n, H, W, 3) float32
    batches, resized and normalized with the model's mean and std. Files that
    cannot be decoded are skipped."""
    for start in range(0, len(paths), batch_size):
        pixels = image_pixels(paths[start : start + batch_size], info.input_size)
        if len(pixels):
            yield normalize(pixels, info.mean, info.std)


class CalibrationImages:
    """onnxruntime's ``CalibrationDataReader`` over image files: ``get_next``
    gives {"image": (n, H, W, 3) float32} batch after batch, then None.

    A plain class (the reader's protocol is ``get_next``, and
    ``isinstance(reader, CalibrationDataReader)`` holds), so that importing
    this module does not import onnxruntime.quantization. ``images`` counts
    the images handed out so far.
    """

    def __init__(
        self, paths: Sequence[str | Path], info: ModelInfo, batch_size: int = BATCH_SIZE
    ) -> None:
        self._batches = load_batches(paths, info, batch_size)
        self.images = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {INPUT_NAME: batch}


def quantize_model(
    model: Any,
    calibration_reader: Any,
    options: QuantizeOptions = QuantizeOptions(),
) -> Any:
    """Static int8 quantization of a modlabel fp32 graph: an ``onnx.ModelProto``.

    model: an ``onnx.ModelProto``, its bytes, or a path. calibration_reader: a
    ``CalibrationDataReader`` (``CalibrationImages``). The metadata is left
    as ``quantize_static`` leaves it; ``quantize_run`` sets it. Raises
    ``QuantizationError`` when onnxruntime fails or an output is not float32.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    try:
        with tempfile.TemporaryDirectory(prefix="modlabel-quantize-") as tmp:
            source = Path(tmp) / "fp32.onnx"
            onnx.save(model, source)
            if options.preprocess:
                prepared = Path(tmp) / "prepared.onnx"
                # Symbolic shape inference is for transformers (and needs sympy);
                # ONNX's own shape inference gives every tensor of these CNNs a shape.
                quant_pre_process(source, prepared, skip_symbolic_shape=True)
                source = prepared
            graph = onnx.load(str(source))
            _name_nodes(graph)  # the quantizer excludes nodes by name
            onnx.save(graph, source)
            target = Path(tmp) / "int8.onnx"
            quantize_static(
                source,
                target,
                calibration_reader,
                quant_format=formats[options.quant_format],
                op_types_to_quantize=list(options.op_types) if options.op_types else None,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=types[options.activation_type],
                weight_type=types[options.weight_type],
                nodes_to_exclude=[] if options.quantize_head else head_nodes(graph),
                calibrate_method=CalibrationMethod.MinMax,
            )
            quantized = onnx.load(str(target))
    except QuantizationError:
        raise
    except Exception as exc:  # onnxruntime.quantization raises anything
        raise QuantizationError(f"onnxruntime cannot quantize the model: {exc}") from None
    outputs = {o.name: o.type.tensor_type.elem_type for o in quantized.graph.output}
    if outputs != {LOGITS: onnx.TensorProto.FLOAT, ACTIVATIONS: onnx.TensorProto.FLOAT}:
        raise QuantizationError(
            f"the quantized graph's outputs are {outputs}; expected float32 "
            f"{LOGITS!r} and {ACTIVATIONS!r}"
        )
    return quantized


def head_nodes(model: Any) -> list[str]:
    """Names of the nodes that feed ``logits`` but not ``activations``: the
    pooling and the dense head."""
    producers = {out: node for node in model.graph.node for out in node.output}

    def ancestors(tensor: str) -> set[str]:
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            node = producers.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    return sorted(ancestors(LOGITS) - ancestors(ACTIVATIONS))


def fidelity(
    reference_logits: np.ndarray,
    logits: np.ndarray,
    reference_crms: np.ndarray,
    crms: np.ndarray,
    *,
    max_abs_head_diff: float = 0.0,
) -> Fidelity:
    """Compare a quantized model's (logits (N, C), CRMs (N, h, w)) with its
    reference's. See ``Fidelity``."""
    reference_logits, logits = np.asarray(reference_logits), np.asarray(logits)
    if reference_logits.shape != logits.shape or np.shape(reference_crms) != np.shape(crms):
        raise QuantizationError(
            f"outputs of different shapes: logits {reference_logits.shape} and {logits.shape}, "
            f"maps {np.shape(reference_crms)} and {np.shape(crms)}"
        )
    images = int(len(logits))
    if images == 0:
        raise QuantizationError("no images to compare the models on")
    per_image = [pearson(a, b) for a, b in zip(reference_crms, crms, strict=True)]
    return Fidelity(
        images=images,
        agreement=float(np.mean(reference_logits.argmax(axis=1) == logits.argmax(axis=1))),
        logits_correlation=pearson(reference_logits, logits),
        crm_correlation_min=float(np.min(per_image)),
        crm_correlation_mean=float(np.mean(per_image)),
        max_abs_head_diff=float(max_abs_head_diff),
        logits_scale=float(np.abs(reference_logits).max()),
    )


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays, flattened, in float64.

    Where one of them is constant the correlation is undefined: 1.0 when both
    are (neither map points anywhere), else 0.0.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    sx, sy = float(np.sqrt(x @ x)), float(np.sqrt(y @ y))
    if sx == 0.0 or sy == 0.0:
        return 1.0 if sx == sy else 0.0
    return float(np.clip((x @ y) / (sx * sy), -1.0, 1.0))


def compare_models(
    reference: Any, candidate: Any, paths: Sequence[str | Path], info: ModelInfo
) -> Fidelity:
    """Run both onnxruntime sessions on the images at ``paths`` and compare them.

    reference, candidate: ``onnxruntime.InferenceSession``s of modlabel models
    (inputs and outputs by name); info: the metadata both share.
    """
    ref_logits, logits, ref_crms, crms = [], [], [], []
    head_diff = 0.0
    weights = np.asarray(info.head_weights, dtype=np.float64)
    bias = np.asarray(info.head_bias, dtype=np.float64)
    for batch in load_batches(paths, info):
        outputs = [
            s.run([LOGITS, ACTIVATIONS], {INPUT_NAME: batch}) for s in (reference, candidate)
        ]
        for (out_logits, out_acts), logits_to, crms_to in zip(
            outputs, (ref_logits, logits), (ref_crms, crms), strict=True
        ):
            logits_to.append(out_logits)
            crms_to.append(
                crm(out_acts, info.head_weights, bias=info.head_bias, pooling=info.pooling)
            )
        cand_logits, cand_acts = outputs[1]
        pooled = cand_acts.astype(np.float64).mean(axis=(1, 2))
        if info.pooling == "sum":
            pooled *= cand_acts.shape[1] * cand_acts.shape[2]
        head_diff = max(head_diff, float(np.abs(cand_logits - (pooled @ weights + bias)).max()))
    if not logits:
        raise QuantizationError("none of the evaluation images could be decoded")
    return fidelity(
        np.concatenate(ref_logits),
        np.concatenate(logits),
        np.concatenate(ref_crms),
        np.concatenate(crms),
        max_abs_head_diff=head_diff,
    )


def quantize_run(
    run_dir: str | Path,
    fp32_path: str | Path,
    out_path: str | Path,
    *,
    calibration: int = DEFAULT_CALIBRATION,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    options: QuantizeOptions = QuantizeOptions(),
) -> QuantizationReport:
    """Quantize ``fp32_path`` (the export of ``run_dir``) to int8 at ``out_path``.

    Calibrates on up to ``calibration`` training images, compares with the
    fp32 model on the test split (else val) and writes the int8 model only
    when its label agreement is at least ``min_agreement`` and its head
    explains its logits; raises ``QuantizationError`` (nothing written)
    otherwise. See the module's docstring.
    """
    started = time.perf_counter()
    run_dir, fp32_path, out_path = Path(run_dir), Path(fp32_path), Path(out_path)
    if calibration < 1:
        raise QuantizationError(f"--calibration must be at least 1; got {calibration}")
    if not 0.0 <= min_agreement <= 1.0:
        raise QuantizationError(f"--min-agreement must be within [0, 1]; got {min_agreement}")
    if out_path.resolve() == fp32_path.resolve():
        raise QuantizationError(f"{out_path}: the int8 model would replace the fp32 one")
    if out_path.is_dir():
        raise QuantizationError(f"{out_path}: is a directory; name the .onnx file to write")

    fp32 = OnnxModel(fp32_path, providers=CPU)
    info = fp32.info
    run = read_run(run_dir)
    if [str(c) for c in run["class_names"]] != info.class_names or tuple(
        int(v) for v in run["input_size"]
    ) != tuple(info.input_size):
        raise QuantizationError(
            f"{fp32_path} is not an export of {run_dir}: its classes or input size differ"
        )
    split, evaluation = evaluation_split(run_dir)
    calibration_paths = split_image_paths(run_dir, CALIBRATION_SPLIT, limit=calibration)
    if not calibration_paths:
        raise QuantizationError(f"{run_dir}: {SPLIT_CSV} names no training images to calibrate on")
    reader = CalibrationImages(calibration_paths, info)
    quantized = quantize_model(fp32_path, reader, options)
    data = quantized.SerializeToString()
    result = compare_models(fp32.session, _session(data), evaluation, info)

    if not result.agreement >= min_agreement:  # `not >=` so that NaN fails too
        raise QuantizationError(
            f"int8 model refused: its labels agree with the fp32 model's on "
            f"{result.agreement:.2%} of {result.images} {split} images, below "
            f"--min-agreement {min_agreement:g} (logits correlation "
            f"{result.logits_correlation:.4f}, CRM correlation min "
            f"{result.crm_correlation_min:.4f}); try more --calibration images"
        )
    head_tolerance = HEAD_ATOL * max(1.0, result.logits_scale)
    if not result.max_abs_head_diff <= head_tolerance:
        raise QuantizationError(
            f"int8 model refused: its logits differ from GAP(activations) @ W + b by up to "
            f"{result.max_abs_head_diff:.3g} (tolerance {head_tolerance:.3g}): the head in "
            "the metadata does not explain them"
        )

    import onnx
    import onnxruntime

    fp32_sha256 = fp32.sha256
    record = {
        "method": options.method,
        "calibration_images": reader.images,
        "calibration_split": CALIBRATION_SPLIT,
        "calibrate_method": "minmax",
        "options": options.to_dict(),
        "fp32_sha256": fp32_sha256,
        "evaluation": {
            "split": split,
            **result.to_dict(),
            "min_agreement": min_agreement,
            "provider": CPU[0],
        },
        "quantized_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {
            "modlabel": modlabel.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
    info = replace(info, extra={**info.extra, "quantization": record})
    del quantized.metadata_props[:]
    onnx.helper.set_model_props(quantized, {METADATA_KEY: info.to_json()})
    data = quantized.SerializeToString()
    _write_verified(data, out_path)
    return QuantizationReport(
        out_path=out_path,
        sha256=hashlib.sha256(data).hexdigest(),
        fp32_sha256=fp32_sha256,
        options=options,
        calibration_images=reader.images,
        evaluation_split=split,
        fidelity=result,
        min_agreement=min_agreement,
        seconds=time.perf_counter() - started,
        metadata=record,
    )


def _session(data: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(data, sess_options=options, providers=CPU)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise QuantizationError(f"onnxruntime cannot load the int8 graph: {exc}") from None


def _name_nodes(model: Any) -> None:
    taken = {node.name for node in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_modlabel_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
