"""Scan throughput on Ray: the local scan's images/s next to ``--engine ray`` with 1 and 2 actors.

All three scan the same archive into fresh SQLite databases, in one run, each in a
fresh process of its own (so no process's threads or Ray workers linger into the
next). The Ray scans start a local Ray of their own (``ray.init(num_cpus=CPUS)``),
and the time counted includes starting the actor pool (one model load per actor),
but not starting Ray itself. On one machine Ray's actors compete for the same cores
as the local scan's decoder threads and onnxruntime: the figure to expect from a
cluster is roughly the per-actor rate times the nodes' actors, until the database
(written from the driver) becomes the limit.

Usage: python benchmarks/bench_ray.py --model demo/model.onnx [--images 700] [--batch-size 8]
(without --model it trains and exports a small tiny-backbone model first).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCAN = """
import sys, time
from modlabel.config import sqlite_url
from modlabel.model import OnnxModel
from modlabel.scan import scan_archive
from modlabel.store import open_db
archive, model_path, db, batch, actors, cpus = sys.argv[1:7]
run_pipeline = None
if int(actors):
    import ray
    from modlabel.scan.ray import ray_pipeline
    ray.init(num_cpus=int(cpus), include_dashboard=False, log_to_driver=False)
    run_pipeline = ray_pipeline(actors=int(actors))
model = OnnxModel(model_path)
engine = open_db(sqlite_url(db))
start = time.perf_counter()
stats = scan_archive([archive], model, engine, batch_size=int(batch), run_pipeline=run_pipeline)
print("RESULT", stats.labeled, stats.labeled / (time.perf_counter() - start))
"""


def scan_rate(
    model: Path, archive: Path, db: Path, batch_size: int, actors: int, cpus: int
) -> tuple[int, float]:
    """(images labeled, images/s) of one scan in a fresh process; ``actors`` 0: local."""
    done = subprocess.run(
        [sys.executable, "-c", SCAN, str(archive), str(model), str(db), str(batch_size),
         str(actors), str(cpus)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"scan with {actors} actors failed:\n{done.stderr[-3000:]}")
    _, n, rate = lines[-1].split()
    return int(n), float(rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=int, default=700, help="archive size (7 classes)")
    parser.add_argument("--size", type=int, default=256, help="typical synthetic image side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Ray's CPUs")
    args = parser.parse_args()
    from bench_scan import small_model

    from modlabel.synth import render_archive

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or small_model(tmp, args.input_size)
        render_archive(tmp / "archive", per_class=max(1, args.images // 7), size=args.size, seed=11)
        results = {}
        for name, actors in (("local scan", 0), ("ray, 1 actor", 1), ("ray, 2 actors", 2)):
            results[name] = scan_rate(
                model, tmp / "archive", tmp / f"{actors}.db", args.batch_size, actors, args.cpus
            )

    n = next(iter(results.values()))[0]
    print(f"images: {n} JPEGs around {args.size}px, batch {args.batch_size}, model {model}")
    print(f"{os.cpu_count()} cores here; Ray started with {args.cpus} CPUs")
    local = results["local scan"][1]
    for name, (labeled, rate) in results.items():
        assert labeled == n, (name, labeled)
        print(f"{name:<15} {rate:8.1f} images/s  ({rate / local:.2f} of the local scan)")


if __name__ == "__main__":
    main()
