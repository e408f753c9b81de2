"""How long does one training step take, per backbone?

One step is one Adam update on a mini-batch (the paper's 10 images, 300x300
by default) of the model ``modlabel train`` builds: the backbone cut at its
layer, the CRM head, the same compile (sparse cross-entropy on the logits,
accuracy and cross-entropy metrics, L2 on the head). Weights are random
(``--weights none``), which does not change the cost. Data loading and
augmentation are left out: this is the model's compute only.

Each backbone gets ``--warmup`` untimed steps (tracing, first allocations),
then ``--steps`` timed ones; the median and the fastest are printed, and the
epoch time for the paper's 35,000 training images (3,500 steps of 10).

    .venv/bin/python benchmarks/bench_train_step.py
    .venv/bin/python benchmarks/bench_train_step.py --backbones tiny vgg16 --steps 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

PAPER_STEPS_PER_EPOCH = 3500


def time_backbone(
    backbone: str, input_size: tuple[int, int], batch: int, steps: int, warmup: int
) -> list[float]:
    """Seconds of each of ``steps`` timed train steps."""
    import keras

    from modlabel.train.backbones import build_model
    from modlabel.train.fit import compile_model

    keras.utils.set_random_seed(0)
    model = compile_model(
        build_model(backbone, 7, input_size, weights="none", l2=1e-4),
        learning_rate=1e-4,
        beta_1=0.9,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *input_size, 3)).astype(np.float32)
    y = rng.integers(0, 7, size=batch).astype(np.int32)
    for _ in range(warmup):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbones", nargs="+", default=["tiny", "vgg16", "inceptionv3", "xception"]
    )
    parser.add_argument("--input-size", type=int, default=300, help="square input side (px)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--nondeterministic",
        action="store_true",
        help="skip TensorFlow's op determinism (train_run turns it on)",
    )
    args = parser.parse_args()

    import tensorflow as tf

    if not args.nondeterministic:
        tf.config.experimental.enable_op_determinism()

    devices = ", ".join(d.device_type for d in tf.config.list_physical_devices()) or "?"
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"visible, TensorFlow {tf.__version__} on {devices}"
    )
    print(
        f"input {args.input_size}x{args.input_size}, batch {args.batch}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, "
        f"op determinism {'off' if args.nondeterministic else 'on (as in training)'}"
    )
    print(f"{'backbone':<12}{'median s/step':>15}{'fastest':>10}{'paper epoch (h)':>17}")
    size = (args.input_size, args.input_size)
    for name in args.backbones:
        times = time_backbone(name, size, args.batch, args.steps, args.warmup)
        median = statistics.median(times)
        epoch_hours = median * PAPER_STEPS_PER_EPOCH / 3600
        print(f"{name:<12}{median:>15.3f}{min(times):>10.3f}{epoch_hours:>17.2f}", flush=True)


if __name__ == "__main__":
    main()
