"""Does CRM localize better than CAM? Three models trained with seeds 0, 1, 2, pooled.

One synthetic training archive (``modlabel synth``), three tiny-backbone models trained on
it with seeds 0, 1 and 2 (``modlabel train --backbone tiny``, each in its own process) and
exported (``modlabel export``), one fresh synthetic archive with ground truth (another
seed), then ``modlabel localize --models`` on the three. Prints how long each step took,
the pooled method x measure table with its 95% two-stage bootstrap intervals (models, then
images within each) and which method pairs differ significantly at 5% (Holm-adjusted), in
the words of ``modlabel localize`` (docs/reports.md, "Intervals and significance").

The full run (about the Makefile's demo, smaller: 60 training images a class, 8 epochs)::

    .venv/bin/python benchmarks/bench_localize.py --work /tmp/bench_localize

A quick check that it works (minutes)::

    .venv/bin/python benchmarks/bench_localize.py --work /tmp/bench_localize_small \
        --per-class 12 --epochs 1 --incoming-per-class 6 --input-size 64 --size 96
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODLABEL = [sys.executable, "-m", "modlabel"]
TRAIN_ARCHIVE_SEED = 100  # the training archive's own seed, apart from the models' seeds
INCOMING_SEED = 1000  # the fresh archive's: no image of it was trained on


def run(step: str, args: list[str], log: Path) -> float:
    """Run one modlabel command in its own process; seconds it took. Its output goes to
    ``log``; a failure prints the log's end and stops the benchmark."""
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ modlabel {' '.join(args)}\n")
        out.flush()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run([*MODLABEL, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8").splitlines()[-30:]
        sys.exit(f"{step} failed (exit {done.returncode}); the end of {log}:\n" + "\n".join(tail))
    print(f"{step:<34} {seconds:8.1f} s", flush=True)
    return seconds


def print_pooled(pooled_json: Path, methods: list[str]) -> None:
    """The pooled table and the significant method pairs, from localize's JSON."""
    from modlabel import maps
    from modlabel.evaluation.significance import Comparison, FigureInterval
    from modlabel.evaluation.tables import MEASURES, comparison_sentences, format_interval

    pooled = json.loads(pooled_json.read_text(encoding="utf-8"))["pooled"]
    intervals = [FigureInterval(**i) for i in pooled["intervals"]]
    comparisons = [Comparison(**c) for c in pooled["comparisons"]]
    tested = list(dict.fromkeys(c.metric for c in comparisons))
    width = 22
    print()
    print(f"Pooled over {len(pooled['models'])} models: mean over models, 95% intervals over "
          "models and images")  # fmt: skip
    print(" " * 18 + "".join(maps.title(m).rjust(width) for m in methods))
    for metric in tested:
        name, digits = MEASURES[metric]
        cells = [
            format_interval(
                next(i for i in intervals if i.method == m and i.metric == metric), digits
            )
            for m in methods
        ]
        print(name.ljust(18) + "".join(c.rjust(width) for c in cells))
    print()
    significant = [c for c in comparisons if c.significant]
    print(f"Significant at 5% (Holm-adjusted over the pairs of each measure): {len(significant)} "
          f"of {len(comparisons)} method-pair differences")  # fmt: skip
    for sentence in comparison_sentences(comparisons):
        print("  " + sentence)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_localize"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=60, help="training images a class")
    parser.add_argument("--incoming-per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=160, help="synthetic images' side")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--methods", default="cam,gradcam,crm,crm_output,cam_squared")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench_localize.log"
    log.write_text("", encoding="utf-8")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; work folder {work}")
    print(f"{len(args.seeds)} models (seeds {args.seeds}), {args.per_class} training images a "
          f"class, {args.epochs} epochs, input {args.input_size} px; fresh archive "
          f"{args.incoming_per_class} a class; log {log}")  # fmt: skip
    total = 0.0
    total += run(
        "synth training archive",
        ["synth", str(work / "train"), "--per-class", str(args.per_class),
         "--size", str(args.size), "--seed", str(TRAIN_ARCHIVE_SEED)],
        log,
    )  # fmt: skip
    models = []
    for seed in args.seeds:
        run_dir = work / f"run_seed{seed}"
        total += run(
            f"train seed {seed}",
            ["train", str(work / "train"), "--out", str(run_dir), "--backbone", "tiny",
             "--input-size", str(args.input_size), "--epochs", str(args.epochs),
             "--seed", str(seed)],
            log,
        )  # fmt: skip
        model = work / f"seed{seed}.onnx"
        total += run(f"export seed {seed}", ["export", str(run_dir), "--out", str(model)], log)
        models.append(str(model))
    total += run(
        "synth fresh archive with truth",
        ["synth", str(work / "incoming"), "--per-class", str(args.incoming_per_class),
         "--size", str(args.size), "--seed", str(INCOMING_SEED)],
        log,
    )  # fmt: skip
    pooled_json = work / "pooled.json"
    total += run(
        "localize --models (pooled)",
        ["localize", str(work / "incoming"), "--models", *models, "--methods", args.methods,
         "--resamples", str(args.resamples), "--out", str(pooled_json)],
        log,
    )  # fmt: skip
    print(f"{'total':<34} {total:8.1f} s")
    print_pooled(pooled_json, [m.strip() for m in args.methods.split(",")])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
