"""Infer: an exported modlabel ONNX model and onnxruntime.

``OnnxModel`` loads a file whose contract ``modlabel.metadata`` states, checks
its graph against its metadata, and runs batches on the CPU or CUDA. What a
batch's outputs mean (calibrated probabilities, the runner-up, the out-of-set
flag, the maps) is ``modlabel.infer``'s, the one path every command takes.
"""

from __future__ import annotations

import hashlib
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError
from .metadata import ACTIVATIONS, LOGITS, METADATA_KEY, ModelInfo

log = logging.getLogger(__name__)

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


# Where a 4-D tensor of each layout (``metadata.LAYOUTS``) keeps its channels.
CHANNEL_AXIS = {"nhwc": 3, "nchw": 1}


def to_layout(batch: np.ndarray, layout: str) -> np.ndarray:
    """(N, H, W, K) -> the same in ``layout``: itself for "nhwc", (N, K, H, W) for "nchw"."""
    return batch if layout == "nhwc" else batch.transpose(0, 3, 1, 2)


def channels_last(tensor: np.ndarray, layout: str) -> np.ndarray:
    """A 4-D tensor in ``layout`` -> (N, H, W, K), contiguous (``to_layout``'s inverse)."""
    return tensor if layout == "nhwc" else np.ascontiguousarray(tensor.transpose(0, 2, 3, 1))


# Session options chosen by measurement (benchmarks/bench_session.py, and peak RSS of whole
# scans of N and 4N files): see README "Speed and memory". The memory pattern pre-plans
# buffers for the largest batch and holds them; the arena keeps freed buffers for reuse,
# which keeps a long scan's memory flat (without it glibc's heap fragments and grows).
ENABLE_MEM_PATTERN = False
ENABLE_CPU_MEM_ARENA = True


def new_session(
    data: bytes,
    *,
    failure: str,
    providers: list[str] | None = None,
    threads: int = 0,
) -> Any:
    """An onnxruntime session of the model ``data``, with the options every modlabel
    session has (this module's, chosen by measurement; quiet logs; no busy-waiting threads
    between runs); ``ModelError`` of ``failure`` and onnxruntime's reason when it cannot
    load it. The runtime's one builder of sessions: the model a scan runs, the parts of a
    graph cut for a layer's CRM (``layer_crm``) and the original of an adopted file
    (``adopt``); ``modlabel.export`` checks its exports with sessions of its own."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # onnxruntime's threads busy-wait between runs by default; in a scan the
    # decoding threads need those cores while the next batch is prepared.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_mem_pattern = ENABLE_MEM_PATTERN
    options.enable_cpu_mem_arena = ENABLE_CPU_MEM_ARENA
    try:
        return ort.InferenceSession(
            data, sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelError(f"{failure}: {exc}") from None


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
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{self.path}: cannot read model: {exc.strerror or exc}") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        wanted = providers or providers_for(device)
        self.session = new_session(
            data,
            failure=f"{self.path}: not a loadable ONNX model",
            providers=wanted,
            threads=threads,
        )
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
        channels = activations_shape[CHANNEL_AXIS[self.info.activations_layout]]
        if not self.info.layer_wise_only and isinstance(channels, int) and channels != k:
            raise ModelError(
                f"{self.path}: the activations have {channels} channels but the "
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

    def feed(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) float32, preprocessed -> the graph's input, contiguous float32 in the
        model's layout ((N, 3, H, W) for an "nchw" model, a PyTorch export say)."""
        return np.ascontiguousarray(to_layout(np.asarray(batch), self.info.layout), np.float32)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """batch: (N, H, W, 3) float32, preprocessed. Returns (logits (N, C), activations
        (N, h, w, K)), channels last whatever the model's layouts (``feed``, ``channels_last``).

        A stop asked for while it runs (``stopping``) ends the run at once (onnxruntime's
        ``RunOptions.terminate``) and raises ``Interrupted``: a VGG16 batch takes seconds."""
        import onnxruntime as ort

        from . import stopping
        from .errors import Interrupted

        inputs = self.feed(batch)
        options = ort.RunOptions()
        with stopping.on_stop(lambda: setattr(options, "terminate", True)):
            try:
                logits, activations = self._run(inputs, options)
                return logits, channels_last(activations, self.info.activations_layout)
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
