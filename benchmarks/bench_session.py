"""onnxruntime session options and batch size: images/s against peak memory.

For each setting, a fresh process loads the model with the given memory
pattern and CPU arena options, runs batches of preprocessed random inputs of
the given size, and reports images/s and its peak RSS. The runtime's defaults
(``modlabel.model.ENABLE_MEM_PATTERN``, ``ENABLE_CPU_MEM_ARENA`` and
``config.DEFAULT_BATCH_SIZE``) are chosen from this table.

Usage: python benchmarks/bench_session.py --model M.onnx [--batches 1,4,8,16,32] [--images 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
from modlabel.model import OnnxModel
import modlabel.model as m

path, pattern, arena = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
batch, images = int(sys.argv[4]), int(sys.argv[5])
m.ENABLE_MEM_PATTERN, m.ENABLE_CPU_MEM_ARENA = pattern, arena
model = OnnxModel(path, device="cpu")
h, w = model.info.input_size
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
inputs = np.random.default_rng(0).normal(size=(batch, h, w, 3)).astype(np.float32)
model.run(inputs)  # warm-up
start = time.perf_counter()
done = 0
while done < images:
    model.run(inputs)
    done += batch
rate = done / (time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rate": rate, "peak_mib": peak / 1024, "model_mib": base / 1024}))
"""


def measure(model: str, pattern: bool, arena: bool, batch: int, images: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, model, str(int(pattern)), str(int(arena)), str(batch),
         str(images)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--images", type=int, default=64, help="images per setting")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"model {args.model}; {args.images} images per setting, each in its own process")
    print(f"{'mem pattern':>11} {'cpu arena':>9} {'batch':>5} {'images/s':>9} {'peak RSS MiB':>12}")
    for pattern, arena in ((True, True), (False, True), (True, False), (False, False)):
        for batch in batches:
            r = measure(args.model, pattern, arena, batch, max(args.images, batch))
            print(
                f"{pattern!s:>11} {arena!s:>9} {batch:>5} {r['rate']:>9.2f} {r['peak_mib']:>12.0f}"
            )


if __name__ == "__main__":
    main()
