"""Bench: how fast modlabel runs on the user's own machine, models and images.

``modlabel bench --model M.onnx [IMAGES]`` measures, on a sample of the
user's images (or a synthetic archive), each part in a fresh process of its
own so that onnxruntime's threads, the decoding threads and TensorFlow's never
compete, one after the other:

* the bare model: onnxruntime on batches already decoded and normalized in memory;
* the whole scan: ``scan_archive`` from the files to rows in a fresh SQLite
  database, its images/s, its ratio to the bare model and its peak RSS;
* decoding: files to normalized model inputs, images/s, in the scan's isolated decode
  workers (``decode_pool``), and, beside it, on threads of one process as scans decoded
  before the workers (what the isolation costs or gains);
* the maps: CRM and its compression, as a share of the model's inference time;
* the database: rows/s written (upserts with the class sums kept) to ``--db``;
* with ``--compare keras RUN``: the Keras + ``tf.GradientTape`` Grad-CAM that a
  user would write instead, on the same images (TensorFlow installed).

Several ``--model`` files (an fp32 and its int8 export) are measured side by
side. Speed is never a test: this prints figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModlabelError

SAMPLE_DEFAULT = 64


@dataclass
class ModelBench:
    """The figures of one model."""

    model: str
    device: str = "cpu"
    bare: float = 0.0  # images/s
    scan: float = 0.0  # images/s
    scan_peak_rss_mib: float = 0.0
    decode: float = 0.0  # images/s, isolated decode workers (as the scan decodes)
    decode_threads: float = 0.0  # images/s, threads of one process (unisolated)
    worker_peak_rss_mib: float = 0.0  # the largest decode worker of the scan
    maps_share: float = 0.0  # CRM + codec time / inference time
    keras: float | None = None  # images/s of the Keras GradientTape Grad-CAM

    @property
    def scan_ratio(self) -> float:
        return self.scan / self.bare if self.bare else 0.0


@dataclass
class BenchResult:
    images: int
    batch_size: int
    models: list[ModelBench] = field(default_factory=list)
    db_rows_per_second: float = 0.0
    db_label: str = ""
    rounds: int = 1

    def format(self) -> str:
        rounds = f", best of {self.rounds} rounds" if self.rounds > 1 else ""
        lines = [
            f"{self.images} images, batch {self.batch_size}; each figure in its own process{rounds}"
        ]
        for m in self.models:
            lines += [
                f"\n{m.model} ({m.device})",
                f"  bare model (inputs in memory)  {m.bare:9.2f} images/s",
                f"  whole scan (files -> rows)     {m.scan:9.2f} images/s  "
                f"({m.scan_ratio:.2f} of the bare model)",
                f"  decode, isolated workers       {m.decode:9.2f} images/s",
                f"  decode, threads (unisolated)   {m.decode_threads:9.2f} images/s  "
                f"(workers are {m.decode / m.decode_threads if m.decode_threads else 0:.2f}x)",
                f"  CRM + codec                    {100 * m.maps_share:9.2f} % of inference time",
                f"  peak RSS of the scan           {m.scan_peak_rss_mib:9.0f} MiB  "
                f"(a decode worker: {m.worker_peak_rss_mib:.0f} MiB)",
            ]
            if m.keras is not None:
                lines.append(
                    f"  Keras GradientTape Grad-CAM    {m.keras:9.2f} images/s  "
                    f"(scan is {m.scan / m.keras:.2f}x)"
                )
        if len(self.models) > 1:
            first = self.models[0]
            for other in self.models[1:]:
                lines.append(
                    f"\n{Path(other.model).name} / {Path(first.model).name}: bare model "
                    f"{other.bare / first.bare:.2f}x, scan {other.scan / first.scan:.2f}x"
                )
        lines.append(f"\ndatabase writes ({self.db_label}): {self.db_rows_per_second:,.0f} rows/s")
        return "\n".join(lines) + "\n"


def run_bench(
    models: Sequence[str | Path],
    *,
    images: str | Path | None = None,
    sample: int = SAMPLE_DEFAULT,
    batch_size: int = 8,
    device: str = "auto",
    db_url: str | None = None,
    keras_run: str | Path | None = None,
    rounds: int = 1,
) -> BenchResult:
    """Measure every part for each model; see the module docstring.

    ``rounds`` > 1 measures everything again, the contenders in turn, and keeps
    each one's best rate: on a shared machine the best of a few rounds is the
    figure least disturbed by other work.
    """
    with tempfile.TemporaryDirectory(prefix="modlabel-bench-") as tmp_name:
        tmp = Path(tmp_name)
        folder = _sample_folder(images, sample, tmp)
        count = len(_image_files(folder))
        result = BenchResult(count, batch_size, rounds=max(1, rounds))
        result.models = [ModelBench(str(model)) for model in models]
        for _ in range(max(1, rounds)):
            for bench in result.models:
                _measure_round(bench, folder, tmp, batch_size, device, keras_run)
        url = db_url or f"sqlite:///{tmp / 'rows.db'}"
        from .store import safe_url

        result.db_label = safe_url(url)
        result.db_rows_per_second = _worker("db", url=url)["rate"]
    return result


def _measure_round(
    bench: ModelBench,
    folder: Path,
    tmp: Path,
    batch_size: int,
    device: str,
    keras_run: str | Path | None,
) -> None:
    """One round of every measurement of one model; rates keep their best, peaks their max."""
    bare = _worker("bare", model=bench.model, folder=str(folder), batch=batch_size,
                   device=device)  # fmt: skip
    if bare["rate"] > bench.bare:
        bench.bare, bench.maps_share = bare["rate"], bare["maps_share"]
    bench.device = bare["device"]
    decode = _worker("decode", model=bench.model, folder=str(folder))["rate"]
    bench.decode = max(bench.decode, decode)
    threads = _worker("decode_threads", model=bench.model, folder=str(folder))["rate"]
    bench.decode_threads = max(bench.decode_threads, threads)
    scan = _worker("scan", model=bench.model, folder=str(folder), batch=batch_size,
                   device=device, db=str(tmp / f"scan-{uuid.uuid4().hex}.db"))  # fmt: skip
    bench.scan = max(bench.scan, scan["rate"])
    bench.scan_peak_rss_mib = max(bench.scan_peak_rss_mib, scan["peak_mib"])
    bench.worker_peak_rss_mib = max(bench.worker_peak_rss_mib, scan["worker_peak_mib"])
    if keras_run is not None:
        rate = _worker("keras", run=str(keras_run), folder=str(folder), batch=batch_size)["rate"]
        bench.keras = max(bench.keras or 0.0, rate)


def _sample_folder(images: str | Path | None, sample: int, tmp: Path) -> Path:
    """A folder of at most ``sample`` images: links to the user's, or a synthetic archive."""
    folder = tmp / "sample"
    folder.mkdir()
    if images is None:
        from .synth import render_archive

        render_archive(tmp / "synthetic", per_class=max(1, sample // 7), size=512, seed=0)
        source = tmp / "synthetic"
    else:
        source = Path(images)
        if not source.is_dir():
            raise ModlabelError(f"{source}: not a folder of images")
    picked = _image_files(source)[:sample]
    if not picked:
        raise ModlabelError(f"{source}: no images found")
    for i, path in enumerate(picked):
        os.symlink(path.resolve(), folder / f"{i:06d}{path.suffix.lower()}")
    return folder


def _image_files(folder: Path) -> list[Path]:
    from .decode import is_image_path

    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p.name))


def _worker(kind: str, **args: Any) -> dict[str, Any]:
    """Run one measurement in a fresh process (``python -m modlabel.bench KIND JSON``)."""
    done = subprocess.run(
        [sys.executable, "-m", "modlabel.bench", kind, json.dumps(args)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ModlabelError(f"bench: the {kind} measurement failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the measurements, each run in its own process ------------------------------------


def _inputs(model: Any, folder: Path) -> Any:
    import numpy as np

    from .decode import load_pixels

    pixels = [load_pixels(p.read_bytes(), model.info.input_size)[0] for p in _image_files(folder)]
    return model.preprocess(np.stack(pixels))


def _measure_bare(model: str, folder: str, batch: int, device: str) -> dict[str, Any]:
    import time

    from . import codec, maps
    from .model import OnnxModel

    onnx_model = OnnxModel(model, device=device)
    inputs = _inputs(onnx_model, Path(folder))
    onnx_model.run(inputs[:batch])  # warm-up
    infer = maps_time = 0.0
    info = onnx_model.info
    for i in range(0, len(inputs), batch):
        start = time.perf_counter()
        _, activations = onnx_model.run(inputs[i : i + batch])
        middle = time.perf_counter()
        crm = maps.crm(activations, info.head_weights, bias=info.head_bias, pooling=info.pooling)
        codec.encode_maps(crm)
        infer += middle - start
        maps_time += time.perf_counter() - middle
    return {
        "rate": len(inputs) / infer,
        "device": onnx_model.device,
        "maps_share": maps_time / infer,
    }


def _measure_decode(model: str, folder: str) -> dict[str, Any]:
    """Files to normalized inputs in the scan's own decode workers, as a scan runs them."""
    import time

    from .decode_pool import DecodeRequest
    from .model import OnnxModel
    from .scan.pipeline import DecodeOptions, decoder_pool
    from .source import DEFAULT_MAX_FILE_BYTES

    onnx_model = OnnxModel(model, device="cpu")
    files = _image_files(Path(folder))
    with decoder_pool(onnx_model, DecodeOptions(), DEFAULT_MAX_FILE_BYTES) as pool:
        # Every worker started and warm, as through most of a long scan; then the figure.
        list(pool.map(files[: 4 * pool.workers], lambda p: DecodeRequest(str(p))))
        start = time.perf_counter()
        done = list(pool.map(files, lambda p: DecodeRequest(str(p))))
        rate = len(done) / (time.perf_counter() - start)
    return {"rate": rate}


def _measure_decode_threads(model: str, folder: str) -> dict[str, Any]:
    """The same on threads of one process, unisolated: what scans did before the workers."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from . import config
    from .decode import load_pixels
    from .model import OnnxModel

    onnx_model = OnnxModel(model, device="cpu")
    files = _image_files(Path(folder))
    size = onnx_model.info.input_size

    def decode(path: Path) -> Any:
        return onnx_model.preprocess(load_pixels(path.read_bytes(), size)[0])

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=config.DEFAULT_DECODERS) as pool:
        list(pool.map(decode, files))
    return {"rate": len(files) / (time.perf_counter() - start)}


def _measure_scan(model: str, folder: str, batch: int, device: str, db: str) -> dict[str, Any]:
    import resource
    import time

    from .config import sqlite_url
    from .decode_pool import start_server
    from .model import OnnxModel
    from .scan import scan_archive
    from .store import open_db

    start_server()  # as `modlabel scan` does: the decoders start while the model loads
    onnx_model = OnnxModel(model, device=device)
    engine = open_db(sqlite_url(db))
    start = time.perf_counter()
    stats = scan_archive([folder], onnx_model, engine, batch_size=batch)
    rate = stats.labeled / (time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from .decode_pool import _close_zygote

    _close_zygote()  # reaped: the workers' peaks count among this process's children
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rate": rate, "peak_mib": peak, "worker_peak_mib": workers}


def _measure_db(url: str, rows: int = 5000, batch: int | None = None) -> dict[str, Any]:
    """Upserts of labeled rows with real compressed maps, the class sums kept, then removed;
    in transactions of the scan's size (``config.DEFAULT_COMMIT_ROWS``)."""
    import time

    from .config import DEFAULT_COMMIT_ROWS

    batch = batch or DEFAULT_COMMIT_ROWS

    import numpy as np
    import sqlalchemy as sa

    from . import codec, store

    engine = store.open_db(url)
    identity = f"bench-{uuid.uuid4().hex[:12]}"
    names = [f"class_{i}" for i in range(7)]
    model_id = store.ensure_model(
        engine, identity=identity, sha256="0" * 64, backbone="bench", class_names=names,
        input_size=[300, 300], activation_shape=[18, 18, 512], path="bench",
    )  # fmt: skip
    store.rebuild_class_maps(engine, model_id, names, 0.5)
    crms = codec.encode_maps(np.random.default_rng(0).gamma(2, 1, (256, 18, 18)))
    now = store.utcnow()
    try:
        start = time.perf_counter()
        for first in range(0, rows, batch):
            store.write_image_rows(
                engine,
                model_id,
                [
                    {
                        "path": f"/bench/{identity}/{i:08d}.jpg",
                        "size_bytes": 1,
                        "mtime": 1.0,
                        "sha256": "0" * 64,
                        "width": 512,
                        "height": 512,
                        "label": names[i % 7],
                        "confidence": 0.9,
                        "probabilities": None,
                        "crm": crms[i % len(crms)],
                        "error": None,
                        "labeled_at": now,
                    }  # fmt: skip
                    for i in range(first, min(rows, first + batch))
                ],
            )
        rate = rows / (time.perf_counter() - start)
    finally:
        with engine.begin() as conn:
            for table in (store.images, store.class_maps):
                conn.execute(table.delete().where(table.c.model_id == model_id))
            conn.execute(store.models.delete().where(store.models.c.id == model_id))
            conn.execute(sa.text("SELECT 1"))
    return {"rate": rate}


def _measure_keras(run: str, folder: str, batch: int) -> dict[str, Any]:
    """What a user would write instead: Keras and ``tf.GradientTape`` Grad-CAM, compiled."""
    import time

    import numpy as np

    from .train import load_tensorflow

    tf = load_tensorflow()
    import keras

    from .decode import load_pixels, normalize

    run_doc = json.loads((Path(run) / "run.json").read_text())
    model = keras.models.load_model(Path(run) / "model.keras", compile=False)
    conv = model.get_layer(run_doc.get("activation_layer", "crm_conv")).output
    grad_model = keras.Model(model.inputs, [conv, model.output])
    size = tuple(run_doc["input_size"])
    pixels = np.stack([load_pixels(p.read_bytes(), size)[0] for p in _image_files(Path(folder))])
    inputs = normalize(pixels, run_doc["mean"], run_doc["std"])

    @tf.function
    def gradcam(x):
        with tf.GradientTape() as tape:
            activations, logits = grad_model(x, training=False)
            top = tf.argmax(logits, axis=1)
            score = tf.gather(logits, top, axis=1, batch_dims=1)
        grads = tape.gradient(score, activations)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1)), logits

    gradcam(inputs[:batch])  # trace and warm up
    start = time.perf_counter()
    for i in range(0, len(inputs), batch):
        cams, _ = gradcam(inputs[i : i + batch])
        cams.numpy()
    return {"rate": len(inputs) / (time.perf_counter() - start)}


_MEASUREMENTS = {
    "bare": _measure_bare,
    "decode": _measure_decode,
    "decode_threads": _measure_decode_threads,
    "scan": _measure_scan,
    "db": _measure_db,
    "keras": _measure_keras,
}


if __name__ == "__main__":  # a worker: python -m modlabel.bench KIND JSON-ARGS
    kind, arguments = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(_MEASUREMENTS[kind](**arguments)))
