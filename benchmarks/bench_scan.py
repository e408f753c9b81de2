"""Scan throughput: the whole pipeline's images/s over the bare model's images/s.

Both are measured in the same run, on the same model and the same images, so
the ratio is meaningful on a shared, noisy machine:

* bare model: onnxruntime on batches already decoded, resized and normalized
  in memory (the ceiling for this model on this machine);
* scan: ``scan_archive`` from JPEG files on disk to rows in a fresh SQLite
  database (walk, stat, lookup, read, hash, decode, resize, infer, CRM, codec,
  write, class averages).

It also reports the peak resident memory of scanning the archive once and
four times its size, to show that memory does not grow with the archive.

Usage: python benchmarks/bench_scan.py --model demo/model.onnx [--images 700] [--batch-size 32]
(without --model it trains and exports a small tiny-backbone model first).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def bare_model_rate(model_path: Path, archive: Path, batch_size: int, repeats: int) -> float:
    from modlabel.decode import load_pixels
    from modlabel.model import OnnxModel

    model = OnnxModel(model_path)
    files = sorted(archive.rglob("*.jpg"))
    pixels = np.stack([load_pixels(p, model.info.input_size)[0] for p in files])
    inputs = model.preprocess(pixels)
    model.run(inputs[:batch_size])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(inputs), batch_size):
            model.run(inputs[i : i + batch_size])
    return repeats * len(inputs) / (time.perf_counter() - start)


def scan_rate(model_path: Path, archive: Path, batch_size: int, db: Path) -> tuple[float, int]:
    from modlabel.config import sqlite_url
    from modlabel.model import OnnxModel
    from modlabel.scan import scan_archive
    from modlabel.store import open_db

    model = OnnxModel(model_path)
    engine = open_db(sqlite_url(db))
    start = time.perf_counter()
    stats = scan_archive([archive], model, engine, batch_size=batch_size)
    return stats.labeled / (time.perf_counter() - start), stats.labeled


def peak_rss_of_scan(model_path: Path, archive: Path, batch_size: int, db: Path) -> float:
    """Peak RSS (MiB) of a fresh process that scans ``archive``."""
    code = (
        "import resource,sys; from pathlib import Path\n"
        "from modlabel.model import OnnxModel; from modlabel.scan import scan_archive\n"
        "from modlabel.store import open_db; from modlabel.config import sqlite_url\n"
        f"scan_archive([{str(archive)!r}], OnnxModel({str(model_path)!r}), "
        f"open_db(sqlite_url({str(db)!r})), batch_size={batch_size})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def small_model(tmp: Path, input_size: int) -> Path:
    from modlabel.export.onnx_export import export_run
    from modlabel.synth import render_archive
    from modlabel.train.fit import train_run

    render_archive(tmp / "train", per_class=20, size=128, seed=1)
    run = train_run(
        tmp / "train",
        tmp / "run",
        backbone="tiny",
        input_size=(input_size, input_size),
        epochs=2,
        verbose=False,
    )
    export_run(run, tmp / "model.onnx")
    return tmp / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=int, default=700, help="archive size (7 classes)")
    parser.add_argument("--size", type=int, default=256, help="typical synthetic image side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--input-size",
        type=int,
        default=128,
        help="input size of the model trained when --model is not given",
    )
    args = parser.parse_args()
    from modlabel.synth import render_archive

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or small_model(tmp, args.input_size)
        per_class = max(1, args.images // 7)
        render_archive(tmp / "archive", per_class=per_class, size=args.size, seed=11)
        render_archive(tmp / "archive4x", per_class=4 * per_class, size=args.size, seed=12)

        bare = bare_model_rate(model, tmp / "archive", args.batch_size, repeats=2)
        scanned, n = scan_rate(model, tmp / "archive", args.batch_size, tmp / "scan.db")
        bare_after = bare_model_rate(model, tmp / "archive", args.batch_size, repeats=2)
        bare_mean = (bare + bare_after) / 2
        rss1 = peak_rss_of_scan(model, tmp / "archive", args.batch_size, tmp / "rss1.db")
        rss2 = peak_rss_of_scan(model, tmp / "archive4x", args.batch_size, tmp / "rss2.db")

    print(f"images: {n} JPEGs around {args.size}px, batch {args.batch_size}, model {model}")
    print(
        f"bare model (onnxruntime, preprocessed in memory): {bare_mean:8.1f} images/s "
        f"(before {bare:.1f}, after {bare_after:.1f})"
    )
    print(f"whole scan (files -> SQLite rows with CRMs):       {scanned:8.1f} images/s")
    print(f"scan / bare model:                                 {scanned / bare_mean:8.2f}")
    print(
        f"peak RSS scanning {n} images: {rss1:.0f} MiB; {4 * n} images: {rss2:.0f} MiB "
        f"(ratio {rss2 / rss1:.2f})"
    )


if __name__ == "__main__":
    main()
