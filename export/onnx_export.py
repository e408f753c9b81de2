"""Export: a training run to one self-contained ONNX file.

The file follows the contract in ``modlabel.model``: input ``image``
(N, H, W, 3) float32 NHWC, already normalized; outputs ``logits`` (N, C) and
``activations`` (N, h, w, K), the post-ReLU output of ``crm_conv`` that feeds
global average pooling; metadata ``modlabel`` (``ModelInfo``) with the class
names, input size, preprocessing and the dense head (W (K, C), b (C)) that the
maps are computed from. The runtime needs nothing beside this file.

Steps: RUN/run.json and RUN/model.keras -> a two-output Keras model -> tf2onnx
(from a ``tf.function``, the path that works with Keras 3) -> parity against
Keras on a few images (``export.parity``) -> metadata -> a temporary file
beside the target, loaded once with ``modlabel.model.OnnxModel``, renamed into
place. A failed export writes nothing and leaves a file already at the target
untouched.

Parity images: ``parity_samples`` seeded noise images, plus up to
``parity_samples`` real ones (one per class, test split first, from the run's
``split.csv``) when the data directory that run.json names under
``data_dir`` can be read. Both go through ``modlabel.decode.normalize`` with
the run's mean and std, the runtime's own preprocessing. ONNX runs on
onnxruntime's CPU provider.

TensorFlow, Keras and tf2onnx are imported only when a function needs them:
importing this module is cheap, and a missing install is a clean error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import modlabel
from modlabel.decode import normalize
from modlabel.metadata import ACTIVATIONS, INPUT_NAME, LOGITS, METADATA_KEY, ModelInfo
from modlabel.model import OnnxModel
from modlabel.ood import DEFAULT_OOD_RATE
from modlabel.train.rundir import (
    ACTIVATION_LAYER,
    GAP_LAYER,
    HEAD_LAYER,
    MODEL_FILE,
    RUN_JSON,
    SPLIT_CSV,
)

from .calibrate import CalibrationReport, calibrate
from .errors import ExportError
from .parity import check_parity, image_pixels, random_pixels

REQUIRED_RUN_KEYS = ("class_names", "input_size", "mean", "std")
# run.json keys that ModelInfo carries itself; the rest goes to extra["run"], except
# the training data's location: a model file is shared, the paths of its archive are not.
_INFO_KEYS = frozenset({*REQUIRED_RUN_KEYS, "backbone", "cut_layer", "data_dir"})

# The oldest opset at which all four backbones were seen to convert and pass
# parity (below 9, tf2onnx lists the weights as graph inputs); tf2onnx caps the
# newest.
MIN_OPSET = 9
DEFAULT_OPSET = 17
CPU = ["CPUExecutionProvider"]


@dataclass(frozen=True)
class ExportReport:
    """What ``export_run`` wrote and how closely it matches Keras.

    activation_shape: (h, w, K) of the ``activations`` output.
    samples: images compared (noise and real); real_images: how many were real.
    max_abs_logits_diff, max_rel_activations_diff, max_abs_head_diff,
    logits_scale: see ``export.parity.ParityResult``.
    seconds: wall time of the whole export.
    """

    out_path: Path
    opset: int
    max_abs_logits_diff: float
    max_rel_activations_diff: float
    activation_shape: tuple[int, int, int]
    seconds: float
    max_abs_head_diff: float
    logits_scale: float
    samples: int
    real_images: int
    sha256: str
    calibration: CalibrationReport | None = None


def export_run(
    run_dir: str | Path,
    out_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    parity_samples: int = 4,
    atol_logits: float = 1e-4,
    rtol_activations: float = 1e-4,
    seed: int = 0,
    ood_rate: float = DEFAULT_OOD_RATE,
) -> ExportReport:
    """Export ``run_dir`` to ``out_path`` as a two-output ONNX file, parity-checked.

    Raises ``ParityError`` when ONNX and Keras differ beyond the tolerances
    (logits absolute, activations relative to their largest value), and
    ``ExportError`` for a run that cannot be exported; in both cases nothing is
    written.

    The temperature and the out-of-set rule are fitted on the run's splits
    (``export.calibrate``; ``ood_rate``: the share of the validation split the
    threshold flags at most) and stored in the metadata
    (``extra["temperature"]``, ``extra["out_of_set"]``, ``extra["calibration"]``);
    where the run's images cannot be read, neither is stored.
    """
    started = time.perf_counter()
    run_dir, out_path = Path(run_dir), Path(out_path)
    if parity_samples < 1:
        raise ExportError(f"parity_samples must be at least 1; got {parity_samples}")
    if out_path.is_dir():
        raise ExportError(f"--out {out_path}: is a directory; name the .onnx file to write")
    run = read_run(run_dir)
    tf, keras, tf2onnx = _import_tensorflow()
    check_opset(opset)

    model = load_keras_model(run_dir)
    info = model_info_from_run(run_dir, model)
    two_outputs = two_output_model(model, run.get("activation_layer", ACTIVATION_LAYER))
    proto = convert_to_onnx(two_outputs, info.input_size, opset)

    real = image_pixels(run_image_paths(run_dir, run, limit=parity_samples), info.input_size)
    pixels = np.concatenate([random_pixels(info.input_size, parity_samples, seed=seed), real])
    batch = normalize(pixels, info.mean, info.std)
    keras_outputs = tuple(np.asarray(t) for t in two_outputs(tf.constant(batch), training=False))
    onnx_outputs = _run_onnx(proto.SerializeToString(), batch)
    parity = check_parity(
        keras_outputs,
        onnx_outputs,
        info.head_weights,
        info.head_bias,
        atol_logits=atol_logits,
        rtol_activations=rtol_activations,
    )

    import onnx
    import onnxruntime

    provenance = {
        "opset": opset,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_name": run_dir.resolve().name,
        "keras_model_sha256": _sha256((run_dir / MODEL_FILE).read_bytes()),
        "software": {
            "modlabel": modlabel.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "parity": {
            **parity.to_dict(),
            "random_images": parity_samples,
            "real_images": int(len(real)),
            "seed": seed,
            "atol_logits": atol_logits,
            "rtol_activations": rtol_activations,
            "provider": CPU[0],
        },
    }
    extra: dict[str, Any] = {**info.extra, "export": provenance}
    calibrated = calibrate(run_dir, run, info, _onnx_runner(proto.SerializeToString()),
                           ood_rate=ood_rate)  # fmt: skip
    if calibrated is not None:
        extra["temperature"] = calibrated.temperature
        extra["calibration"] = calibrated.to_dict()
        extra["out_of_set"] = calibrated.rule.to_dict()
    info = replace(info, extra=extra)
    onnx.helper.set_model_props(proto, {METADATA_KEY: info.to_json()})
    data = proto.SerializeToString()
    _write_verified(data, out_path)
    return ExportReport(
        out_path=out_path,
        opset=opset,
        max_abs_logits_diff=parity.max_abs_logits_diff,
        max_rel_activations_diff=parity.max_rel_activations_diff,
        activation_shape=info.activation_shape,
        seconds=time.perf_counter() - started,
        max_abs_head_diff=parity.max_abs_head_diff,
        logits_scale=parity.logits_scale,
        samples=parity.samples,
        real_images=int(len(real)),
        sha256=_sha256(data),
        calibration=calibrated,
    )


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """RUN/run.json as a dict, with the keys export needs present."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(
            f"{run_dir}: not a directory; pass a run folder written by `modlabel train`"
        )
    path = run_dir / RUN_JSON
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"{run_dir}: no {RUN_JSON}; pass a run folder written by `modlabel train`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read: {exc}") from None
    if not isinstance(run, dict):
        raise ExportError(f"{path}: expected a JSON object")
    missing = [key for key in REQUIRED_RUN_KEYS if key not in run]
    if missing:
        raise ExportError(f"{path}: missing {', '.join(missing)}")
    return run


def load_keras_model(run_dir: str | Path) -> Any:
    """RUN/model.keras, uncompiled."""
    _, keras, _ = _import_tensorflow()
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise ExportError(f"{run_dir}: no {MODEL_FILE}; has training finished?")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError, TypeError, OSError, ... here
        raise ExportError(f"{path}: cannot load the Keras model: {exc}") from None


def model_info_from_run(run_dir: str | Path, keras_model: Any) -> ModelInfo:
    """The metadata for ``keras_model`` from RUN/run.json and the model's head.

    head_weights is the Dense layer's kernel (K, C) and head_bias its bias (C),
    as float32, bit for bit. Checks that the model has the CRM head's shape:
    ``activation_layer`` (N, h, w, K) -> GlobalAveragePooling2D -> linear
    Dense over C = len(class_names). run.json's other keys (hyperparameters and
    so on) go to ``extra["run"]``.
    """
    _, keras, _ = _import_tensorflow()
    run = read_run(run_dir)
    class_names = [str(name) for name in run["class_names"]]
    input_size = _pair(run["input_size"], "input_size")
    mean, std = _triple(run["mean"], "mean"), _triple(run["std"], "std")
    if not all(v > 0 for v in std):
        raise ExportError(f"run.json: std must be positive; got {list(std)}")

    if len(keras_model.inputs) != 1 or len(keras_model.outputs) != 1:
        raise ExportError(
            f"the model has {len(keras_model.inputs)} inputs and "
            f"{len(keras_model.outputs)} outputs; export needs one of each"
        )
    input_shape = tuple(keras_model.inputs[0].shape)
    if len(input_shape) != 4 or input_shape[3] != 3:
        raise ExportError(f"the model's input is {input_shape}; expected (N, H, W, 3)")
    if any(
        got is not None and got != want
        for got, want in zip(input_shape[1:3], input_size, strict=True)
    ):
        raise ExportError(
            f"the model's input is {input_shape[1]}x{input_shape[2]} but "
            f"run.json says input_size {list(input_size)}"
        )

    head = _layer(keras_model, run.get("head_layer", HEAD_LAYER))
    if not isinstance(head, keras.layers.Dense):
        raise ExportError(f"head layer {head.name!r} is a {type(head).__name__}, not Dense")
    if head.activation is not keras.activations.linear:
        raise ExportError(
            f"head layer {head.name!r} applies {head.activation.__name__}; "
            "export needs pre-softmax logits (a linear Dense)"
        )
    gap = _layer(keras_model, run.get("gap_layer", GAP_LAYER))
    if not isinstance(gap, keras.layers.GlobalAveragePooling2D):
        raise ExportError(
            f"pooling layer {gap.name!r} is a {type(gap).__name__}; the maps "
            "need GlobalAveragePooling2D"
        )
    activations = _layer(keras_model, run.get("activation_layer", ACTIVATION_LAYER))
    shape = tuple(activations.output.shape)
    if None in shape[1:]:
        shape = keras.Model(keras_model.inputs[0], activations.output).compute_output_shape(
            (1, *input_size, 3)
        )
    if len(shape) != 4:
        raise ExportError(
            f"activation layer {activations.name!r} gives shape {shape}; expected (N, h, w, K)"
        )
    activation_shape = (int(shape[1]), int(shape[2]), int(shape[3]))

    weights = np.asarray(keras.ops.convert_to_numpy(head.kernel), dtype=np.float32)
    num_classes = weights.shape[1]
    bias = (
        np.asarray(keras.ops.convert_to_numpy(head.bias), dtype=np.float32)
        if head.use_bias
        else np.zeros(num_classes, dtype=np.float32)
    )
    if weights.shape[0] != activation_shape[2]:
        raise ExportError(
            f"head layer {head.name!r} takes {weights.shape[0]} features but "
            f"{activations.name!r} has {activation_shape[2]} channels"
        )
    if num_classes != len(class_names):
        raise ExportError(
            f"head layer {head.name!r} has {num_classes} outputs but run.json "
            f"names {len(class_names)} classes"
        )

    return ModelInfo(
        class_names=class_names,
        input_size=input_size,
        mean=mean,
        std=std,
        head_weights=weights,
        head_bias=bias,
        backbone=str(run.get("backbone", "unknown")),
        cut_layer=str(run.get("cut_layer", "")),
        activation_shape=activation_shape,
        pooling="mean",
        extra={"run": {k: v for k, v in run.items() if k not in _INFO_KEYS}},
    )


def two_output_model(keras_model: Any, activation_layer: str = ACTIVATION_LAYER) -> Any:
    """The same graph with two outputs: [logits (N, C), activations (N, h, w, K)]."""
    _, keras, _ = _import_tensorflow()
    activations = _layer(keras_model, activation_layer).output
    # The single input tensor, not the list: Keras 3 warns when called with a
    # tensor on a model built from a one-element list.
    return keras.Model(
        keras_model.inputs[0],
        [keras_model.outputs[0], activations],
        name=f"{keras_model.name}_export",
    )


def convert_to_onnx(
    two_outputs: Any, input_size: tuple[int, int], opset: int = DEFAULT_OPSET
) -> Any:
    """tf2onnx conversion of a two-output model to an ``onnx.ModelProto`` with
    input ``image`` (N, H, W, 3) and outputs ``logits`` and ``activations``."""
    tf, _, tf2onnx = _import_tensorflow()
    check_opset(opset)
    height, width = input_size
    signature = [tf.TensorSpec([None, height, width, 3], tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=signature)
    def serve(image):
        logits, activations = two_outputs(image, training=False)
        # float32 whatever the training dtype policy was; a no-op otherwise.
        return {LOGITS: tf.cast(logits, tf.float32), ACTIVATIONS: tf.cast(activations, tf.float32)}

    try:
        try:
            with _tf2onnx_without_rollback():
                proto, _ = tf2onnx.convert.from_function(
                    serve, input_signature=signature, opset=opset
                )
        except Exception:
            # tf2onnx's default mode skips an optimizer pass that fails.
            proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset)
    except Exception as exc:  # tf2onnx raises anything from its op handlers
        raise ExportError(f"tf2onnx cannot convert the model at opset {opset}: {exc}") from None

    inputs = [i.name for i in proto.graph.input]
    outputs = {o.name for o in proto.graph.output}
    if inputs != [INPUT_NAME] or outputs != {LOGITS, ACTIVATIONS}:
        raise ExportError(f"tf2onnx named the inputs {inputs} and outputs {sorted(outputs)}")
    return proto


def check_opset(opset: int) -> None:
    """Refuse an opset tf2onnx cannot write or the backbones were not checked with."""
    _, _, tf2onnx = _import_tensorflow()
    newest = max(tf2onnx.constants.OPSET_TO_IR_VERSION)
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"--opset {opset}: choose {MIN_OPSET} to {newest} "
            f"(tf2onnx {tf2onnx.__version__} writes up to {newest})"
        )


def run_image_paths(run_dir: str | Path, run: dict[str, Any], *, limit: int) -> list[Path]:
    """Up to ``limit`` of the run's own images, one per class, test split first.

    Empty when the run has no split.csv or its ``data_dir`` is not reachable.
    """
    data_dir = run.get("data_dir")
    split_file = Path(run_dir) / SPLIT_CSV
    if not data_dir or not Path(data_dir).is_dir() or not split_file.is_file():
        return []
    order = {"test": 0, "val": 1, "train": 2}
    try:
        with split_file.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if {"split", "class", "path"} <= r.keys()]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    rows.sort(key=lambda r: order.get(r["split"], len(order)))
    picked: list[Path] = []
    seen: set[str] = set()
    for row in rows:
        if row["class"] not in seen and len(picked) < limit:
            seen.add(row["class"])
            picked.append(Path(data_dir) / row["path"])
    return picked


def _onnx_runner(data: bytes) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """One onnxruntime CPU session over the converted graph, as a function of a batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=CPU)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ExportError(f"onnxruntime cannot load the converted graph: {exc}") from None

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, activations = session.run([LOGITS, ACTIVATIONS], {INPUT_NAME: batch})
        return logits, activations

    return run


def _run_onnx(data: bytes, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=CPU)
        logits, activations = session.run([LOGITS, ACTIVATIONS], {INPUT_NAME: batch})
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ExportError(f"onnxruntime cannot run the converted graph: {exc}") from None
    return logits, activations


def _write_verified(data: bytes, out_path: Path) -> None:
    """Write to a temporary file beside ``out_path``, check that the runtime
    loads it, then rename it into place (atomic on one file system)."""
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("xb") as f:
            f.write(data)
        OnnxModel(tmp, providers=CPU)
        os.replace(tmp, out_path)
    except OSError as exc:
        raise ExportError(f"--out {out_path}: cannot write: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _tf2onnx_without_rollback() -> Iterator[None]:
    # Before each optimizer pass tf2onnx deep-copies the whole graph, weights
    # included, to roll a failing pass back: that doubles the conversion time
    # of a 20M-parameter backbone. This variable turns the copies off (any
    # value does in tf2onnx 1.17; "FALSE" also means off if that is fixed).
    name = "TF2ONNX_CATCH_ERRORS"
    before = os.environ.get(name)
    os.environ[name] = "FALSE"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _import_tensorflow() -> tuple[Any, Any, Any]:
    # TensorFlow's C++ start-up chatter goes to stderr unless told otherwise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise ExportError(
            f"export needs TensorFlow and tf2onnx ({exc}); install them with "
            "pip install 'modlabel[train]'"
        ) from None
    return tf, keras, tf2onnx


def _layer(keras_model: Any, name: str) -> Any:
    try:
        return keras_model.get_layer(name)
    except ValueError:
        raise ExportError(f"the model has no layer named {name!r}") from None


def _pair(value: Any, key: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ExportError(f"run.json: {key} must be [height, width]; got {value!r}") from None
    return height, width


def _triple(value: Any, key: str) -> tuple[float, float, float]:
    try:
        r, g, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ExportError(
            f"run.json: {key} must be three numbers (R, G, B); got {value!r}"
        ) from None
    return r, g, b


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
