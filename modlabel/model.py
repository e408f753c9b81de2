"""Infer: an exported modlabel ONNX model and onnxruntime.

The ONNX file is all the runtime needs. Its contract:

* one input ``image``: (N, H, W, 3) float32, RGB, already resampled to the
  model's input size and normalized as ``(pixels - mean) / std``;
* two outputs: ``logits`` (N, C) float32, the dense layer's pre-softmax scores,
  and ``activations`` (N, h, w, K) float32, the last conv layer (the one that
  feeds global average pooling);
* the metadata entry ``modlabel`` (see ``ModelInfo``), a JSON document with the
  class names, the input size, the preprocessing, and the dense head's weights
  (K, C) and bias (C) that the maps are computed from.

``export/`` writes files of this shape with ``ModelInfo.to_json``; this module
reads them without TensorFlow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelError

if TYPE_CHECKING:
    from .calibration import OutOfSetRule

log = logging.getLogger(__name__)

METADATA_KEY = "modlabel"
METADATA_FORMAT = 1
INPUT_NAME = "image"
LOGITS = "logits"
ACTIVATIONS = "activations"


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """An array as JSON: dtype, shape and base64 of its little-endian bytes (exact)."""
    arr = np.ascontiguousarray(arr, dtype=np.dtype(arr.dtype).newbyteorder("<"))
    return {
        "dtype": arr.dtype.str,
        "shape": list(arr.shape),
        "data": base64.b64encode(arr.tobytes()).decode("ascii"),
    }


def decode_array(doc: dict[str, Any]) -> np.ndarray:
    """Inverse of ``encode_array``."""
    raw = base64.b64decode(doc["data"])
    return np.frombuffer(raw, dtype=np.dtype(doc["dtype"])).reshape(doc["shape"]).copy()


@dataclass(frozen=True)
class ModelInfo:
    """What the ONNX metadata says about a modlabel model.

    head_weights: (K, C) float32, head_bias: (C,) float32.
    pooling: "mean" (Keras' GlobalAveragePooling2D: S_c = sum_k w_kc * mean_xy f_k + b_c).
    """

    class_names: list[str]
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    head_weights: np.ndarray
    head_bias: np.ndarray
    backbone: str = "unknown"
    cut_layer: str = ""
    activation_shape: tuple[int, int, int] = (0, 0, 0)  # (h, w, K)
    pooling: str = "mean"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = {
            "format": METADATA_FORMAT,
            "class_names": list(self.class_names),
            "input_size": list(self.input_size),
            "preprocessing": {
                "resize": "bilinear",
                "channel_order": "RGB",
                "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std],
            },
            "head": {
                "weights": encode_array(np.asarray(self.head_weights, dtype=np.float32)),
                "bias": encode_array(np.asarray(self.head_bias, dtype=np.float32)),
                "pooling": self.pooling,
            },
            "backbone": self.backbone,
            "cut_layer": self.cut_layer,
            "activation_shape": list(self.activation_shape),
            "input_name": INPUT_NAME,
            "outputs": [LOGITS, ACTIVATIONS],
            "extra": self.extra,
        }
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        """Parse the metadata; ``ModelError`` says what is wrong with it."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"modlabel metadata is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ModelError("modlabel metadata is not a JSON object")
        if doc.get("format") != METADATA_FORMAT:
            raise ModelError(f"unsupported modlabel metadata format {doc.get('format')!r}")
        try:
            pre = doc["preprocessing"]
            info = cls(
                class_names=[str(n) for n in doc["class_names"]],
                input_size=(int(doc["input_size"][0]), int(doc["input_size"][1])),
                mean=tuple(float(v) for v in pre["mean"]),
                std=tuple(float(v) for v in pre["std"]),
                head_weights=decode_array(doc["head"]["weights"]).astype(np.float32),
                head_bias=decode_array(doc["head"]["bias"]).astype(np.float32),
                backbone=str(doc.get("backbone", "unknown")),
                cut_layer=str(doc.get("cut_layer", "")),
                activation_shape=tuple(int(v) for v in doc.get("activation_shape", (0, 0, 0))),
                pooling=doc["head"].get("pooling", "mean"),
                extra=doc.get("extra", {}),
            )
        except KeyError as exc:
            raise ModelError(f"modlabel metadata lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError, IndexError, binascii.Error) as exc:
            raise ModelError(f"modlabel metadata is malformed ({exc})") from None
        info.check()
        return info

    @property
    def temperature(self) -> float:
        """The temperature T the scan divides the logits by before the softmax
        (``extra["temperature"]``, fitted by export; 1.0 for models exported before)."""
        return float(self.extra.get("temperature", 1.0))

    @cached_property
    def out_of_set(self) -> OutOfSetRule | None:
        """The out-of-set rule of ``extra["out_of_set"]``; None for models exported before."""
        from .calibration import OutOfSetRule

        doc = self.extra.get("out_of_set")
        if doc is None:
            return None
        try:
            return OutOfSetRule.from_dict(doc)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ModelError(f"modlabel metadata's out_of_set is malformed ({exc})") from None

    def check(self) -> None:
        """Raise ``ModelError`` when the metadata contradicts itself."""
        n = len(self.class_names)
        if n < 2 or len(set(self.class_names)) != n:
            raise ModelError(f"metadata names {n} classes; a model needs 2 or more, all distinct")
        if self.head_weights.ndim != 2 or self.head_weights.shape[1] != n:
            raise ModelError(
                f"metadata names {n} classes but the head's weights have shape "
                f"{tuple(self.head_weights.shape)} (expected (K, {n}))"
            )
        if self.head_bias.shape != (n,):
            raise ModelError(
                f"the head's bias has shape {tuple(self.head_bias.shape)}, expected ({n},)"
            )
        if min(self.input_size) < 1 or len(self.mean) != 3 or len(self.std) != 3:
            raise ModelError("metadata needs a positive input size and 3 means and 3 stds")
        if any(v == 0 for v in self.std):
            raise ModelError("metadata has a zero std")
        if self.pooling not in ("mean", "sum"):
            raise ModelError(f"unknown pooling {self.pooling!r} (mean or sum)")
        temperature = self.extra.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
            raise ModelError(f"metadata's temperature {temperature!r} is not a positive number")
        rule = self.out_of_set
        if rule is not None and rule.means.shape != (
            len(self.class_names),
            self.head_weights.shape[0],
        ):
            raise ModelError(
                f"metadata's out-of-set class means have shape {rule.means.shape}; "
                f"expected ({len(self.class_names)}, {self.head_weights.shape[0]})"
            )


DEVICES = ("auto", "cpu", "cuda")


def providers_for(device: str) -> list[str]:
    """onnxruntime execution providers for ``--device``.

    ``auto``: CUDA where this onnxruntime build offers it and the machine has an
    NVIDIA driver, else the CPU; ``cuda``: CUDA whatever the probe says (its
    failure is then reported, see ``OnnxModel``); ``cpu``: the CPU.
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}: auto, cpu or cuda")
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" or (device == "auto" and cuda and _cuda_usable()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def default_providers() -> list[str]:
    """CUDA first where this onnxruntime build and the machine offer it, then CPU."""
    return providers_for("auto")


def _cuda_usable() -> bool:
    # onnxruntime-gpu lists CUDA even without a GPU; probing the driver avoids
    # a noisy failed session start on CPU-only machines.
    return Path("/proc/driver/nvidia/version").exists()


# Session options chosen by measurement (benchmarks/bench_session.py, and peak RSS of whole
# scans of N and 4N files): see README "Speed and memory". The memory pattern pre-plans
# buffers for the largest batch and holds them; the arena keeps freed buffers for reuse,
# which keeps a long scan's memory flat (without it glibc's heap fragments and grows).
ENABLE_MEM_PATTERN = False
ENABLE_CPU_MEM_ARENA = True


class OnnxModel:
    """A loaded modlabel model: ``run`` gives (logits, activations) for a batch.

    ``device``: ``auto``, ``cpu`` or ``cuda``. CUDA counts only when the session
    really runs on it (``session.get_providers()``); otherwise one log line says
    so and the model runs on the CPU. ``self.device`` is what it runs on.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: list[str] | None = None,
        threads: int = 0,
        device: str = "auto",
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{self.path}: cannot read model: {exc.strerror or exc}") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # onnxruntime's threads busy-wait between runs by default; in a scan the
        # decoding threads need those cores while the next batch is prepared.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_mem_pattern = ENABLE_MEM_PATTERN
        options.enable_cpu_mem_arena = ENABLE_CPU_MEM_ARENA
        wanted = providers or providers_for(device)
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{self.path}: not a loadable ONNX model: {exc}") from None
        loaded = self.session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in loaded else "cpu"
        if "CUDAExecutionProvider" in wanted and self.device != "cuda":
            log.warning(
                "CUDA was asked for but did not load (no GPU or no CUDA libraries); "
                "running on the CPU"
            )
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ModelError(
                f"{self.path}: ONNX file has no '{METADATA_KEY}' metadata; "
                "export it with `modlabel export`"
            )
        try:
            self.info = ModelInfo.from_json(meta[METADATA_KEY])
        except ModelError as exc:
            raise ModelError(f"{self.path}: {exc}") from None
        outputs = {o.name: o for o in self.session.get_outputs()}
        if not {LOGITS, ACTIVATIONS} <= set(outputs):
            raise ModelError(
                f"{self.path}: outputs {sorted(outputs)} lack '{LOGITS}' and '{ACTIVATIONS}'"
            )
        self._check_graph(outputs[LOGITS].shape, outputs[ACTIVATIONS].shape)
        self.input_name = self.session.get_inputs()[0].name

    def _check_graph(self, logits_shape: list, activations_shape: list) -> None:
        """The graph's static output sizes must agree with the metadata's head."""
        k, c = self.info.head_weights.shape
        if len(logits_shape) != 2 or len(activations_shape) != 4:
            raise ModelError(f"{self.path}: logits must be (N, C) and activations (N, h, w, K)")
        if isinstance(logits_shape[-1], int) and logits_shape[-1] != c:
            raise ModelError(
                f"{self.path}: the graph has {logits_shape[-1]} logits but the metadata "
                f"names {c} classes"
            )
        if isinstance(activations_shape[-1], int) and activations_shape[-1] != k:
            raise ModelError(
                f"{self.path}: the activations have {activations_shape[-1]} channels but the "
                f"head's weights expect {k}"
            )

    @cached_property
    def identity(self) -> str:
        """A short stable name for this model: backbone and the file's hash prefix."""
        return f"{self.info.backbone}-{self.sha256[:12]}"

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 pixels at the input size -> the model's float32 input."""
        from .decode import normalize

        return normalize(pixels, self.info.mean, self.info.std)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """batch: (N, H, W, 3) float32, preprocessed. Returns (logits (N, C), activations).

        A stop asked for while it runs (``stopping``) ends the run at once (onnxruntime's
        ``RunOptions.terminate``) and raises ``Interrupted``: a VGG16 batch takes seconds."""
        import onnxruntime as ort

        from . import stopping
        from .errors import Interrupted

        inputs = np.ascontiguousarray(batch, np.float32)
        options = ort.RunOptions()
        with stopping.on_stop(lambda: setattr(options, "terminate", True)):
            try:
                return self._run(inputs, options)
            except Exception:
                if stopping.requested():
                    raise Interrupted(stopping.reason()) from None
                raise

    def _run(self, inputs: np.ndarray, options: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.device == "cuda":
            # I/O binding: the batch is copied to the GPU once and the outputs back once,
            # instead of onnxruntime's per-run staging.
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, inputs)
            binding.bind_output(LOGITS)
            binding.bind_output(ACTIVATIONS)
            self.session.run_with_iobinding(binding, options)
            logits, activations = binding.copy_outputs_to_cpu()
            return logits, activations
        feed = {self.input_name: inputs}
        logits, activations = self.session.run([LOGITS, ACTIVATIONS], feed, options)
        return logits, activations


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) scores, numerically stable."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
