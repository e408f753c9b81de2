"""The review loop on an archive of a shifted style: accuracy after fine-tuning on what each
review queue chose, against reviewing a random sample.

The model is trained on the default synthetic archive (the demo's recipe: ``modlabel
synth``, ``train --backbone tiny``, ``export``), or given (``--run`` and ``--model``, e.g.
``make demo``'s demo/run and demo/model.onnx). The archive it meets is of another style:
``modlabel synth`` with another seed, another image size and extra pixel noise
(``--noise``). Its pool is scanned once; then, for each review queue, a copy of that
database gets ``--share`` of the pool reviewed, the reviewer being the ground truth (the
class folder each image was rendered into), and the loop runs as a user would run it:

    modlabel review --strategy S -n K --format csv     the queue
    modlabel review --from-csv reviews.csv --strategy S    the simulated reviewer's labels
    modlabel dataset --out DATA                        reviewed + confidently labeled images
    modlabel train DATA --resume-from RUN              fine-tuning (train.finetune)
    modlabel export                                    a new model
    modlabel scan HELDOUT                              the held-out images, labeled anew

each step in its own process. The held-out images are rendered apart (the same style, a
seed of their own) and never reviewed. The table gives each strategy and share: the
accuracy on the held-out images after fine-tuning with its 95% interval, and the gain over
the start model, paired on the same images. With one repeat these are Wilson's interval and
McNemar's exact test (Newcombe's interval), which hold for the one fine-tuned model and
know nothing of how another training run would differ; ``--repeats R`` runs each
experiment R times (seed r for the fine-tuning's split and shuffling, and for the random,
diverse and typical queues) and gives the mean over the runs with a two-stage bootstrap
interval (runs, then images: ``stats.hierarchical_bootstrap``), which covers that
variation too.
``pseudo-labels only`` fine-tunes on the confidently labeled images without a review: what
fine-tuning gains without a person. ``disagreement`` needs DICOM headers; a synthetic
archive has none, so it is skipped.

The aim: uncertainty (or diverse, or typical) review of 5% gains more than random review
of 10%.

Usage (a check at small size, then the full run):
    python benchmarks/bench_review.py --train-per-class 20 --pool-per-class 20 \\
        --heldout-per-class 10 --input-size 64 --epochs 3 --finetune-epochs 2
    python benchmarks/bench_review.py --repeats 3    # the demo's recipe, 7 x 100 pool images
    python benchmarks/bench_review.py --run demo/run --model demo/model.onnx --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modlabel.paths import from_db
from modlabel.stats import (
    Interval,
    PairedTest,
    hierarchical_bootstrap,
    hierarchical_paired_bootstrap,
    mcnemar,
    wilson_interval,
)

STRATEGIES = ("uncertainty", "out-of-set", "disagreement", "diverse", "typical", "random")
PSEUDO = "pseudo-labels only"
AIMED = ("uncertainty", "diverse", "typical")  # the queues the aim is checked for


@dataclass(frozen=True)
class Experiment:
    strategy: str  # a queue strategy, or PSEUDO (no review)
    share: float  # of the pool reviewed


@dataclass
class Outcome:
    experiment: Experiment
    reviewed: int
    hits: list[np.ndarray]  # (N,) bool per repeat, the held-out images in one order
    seconds: float
    note: str = ""  # why there are no hits (skipped)


def accuracy_of(hits: list[np.ndarray]) -> Interval:
    """The held-out accuracy: Wilson's interval for one run, else the mean over the runs
    with the two-stage bootstrap interval (runs, then images)."""
    if len(hits) == 1:
        return wilson_interval(int(hits[0].sum()), len(hits[0]))
    return hierarchical_bootstrap([h.astype(np.float64) for h in hits])


def paired(hits_a: list[np.ndarray], hits_b: list[np.ndarray]) -> PairedTest:
    """A - B on the same held-out images (repeat r of A with repeat r of B): McNemar's
    exact test for one run each, else the two-stage paired bootstrap."""
    if len(hits_a) == 1 and len(hits_b) == 1:
        return mcnemar(hits_a[0], hits_b[0])
    if len(hits_b) == 1:
        hits_b = hits_b * len(hits_a)
    return hierarchical_paired_bootstrap(
        [h.astype(np.float64) for h in hits_a], [h.astype(np.float64) for h in hits_b]
    )


def modlabel(*args: object, capture: bool = False) -> str:
    """Run one ``modlabel`` command in its own process; its stdout when ``capture``."""
    command = [sys.executable, "-m", "modlabel", *(str(a) for a in args)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command[2:])}\n{done.stderr[-3000:]}")
    return done.stdout if capture else ""


def labels_of(db: Path) -> dict[str, str | None]:
    """{stored path: the label} of the database's labeled rows (one model per database)."""
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT path, label FROM images WHERE error IS NULL"))


def truth_of(path: str) -> str:
    """The ground truth of a synthetic image: the class folder it was rendered into."""
    return Path(from_db(path)).parent.name


def held_out_hits(db: Path, paths: list[str]) -> np.ndarray:
    """(N,) bool: the model's label is the truth, per held-out image in ``paths`` order
    (an image the scan could not label counts as wrong)."""
    labels = labels_of(db)
    return np.array([labels.get(p) == truth_of(p) for p in paths], dtype=bool)


def has_dicom(db: Path) -> bool:
    with sqlite3.connect(db) as conn:
        found = conn.execute("SELECT 1 FROM images WHERE dicom_modality IS NOT NULL LIMIT 1")
        return found.fetchone() is not None


def simulate_review(db: Path, strategy: str, count: int, work: Path, seed: int) -> int:
    """The ground truth as the reviewer: the queue's ``count`` images, each labeled with
    its class folder, recorded through ``review --from-csv``. Returns how many."""
    queue = modlabel(
        "review", "--db", db, "--strategy", strategy, "-n", count, "--seed", seed,
        "--format", "csv", capture=True,
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(queue)))
    if not rows:
        return 0
    answers = work / "reviews.csv"
    with answers.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "note", "reviewer"])
        for row in rows:
            writer.writerow([f"#{row['id']}", truth_of(row["path"]), "", "ground truth"])
    modlabel("review", "--db", db, "--from-csv", answers, "--strategy", strategy)
    return len(rows)


def prepare_start(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The start model: the given run and ONNX file, or one trained with the demo's recipe."""
    if args.run is not None:
        return Path(args.run), Path(args.model)
    archive, run, onnx = work / "train_archive", work / "start_run", work / "start.onnx"
    say(f"training the start model on 7 x {args.train_per_class} images (the demo's recipe)")
    modlabel("synth", archive, "--per-class", args.train_per_class, "--size", 160, "--seed", 0)
    modlabel(
        "train", archive, "--out", run, "--backbone", "tiny", "--input-size", args.input_size,
        "--epochs", args.epochs, "--seed", 0,
    )  # fmt: skip
    modlabel("export", run, "--out", onnx)
    return run, onnx


def run_experiment(
    experiment: Experiment,
    *,
    pool_db: Path,
    pool_size: int,
    run: Path,
    heldout: Path,
    heldout_paths: list[str],
    args: argparse.Namespace,
    work: Path,
) -> Outcome:
    """The loop for one strategy and share, ``args.repeats`` times (seed r in repeat r)."""
    started = time.monotonic()
    if experiment.strategy == "disagreement" and not has_dicom(pool_db):
        return Outcome(experiment, 0, [], 0.0, "skipped: no DICOM headers")
    name = f"{experiment.strategy.replace(' ', '_')}_{round(experiment.share * 1000):03d}"
    reviewed, hits = 0, []
    for seed in range(args.repeats):
        here = work / f"{name}_seed{seed}"
        here.mkdir()
        db = here / "labels.db"
        shutil.copy(pool_db, db)
        if experiment.strategy != PSEUDO:
            count = max(1, round(experiment.share * pool_size))
            reviewed = simulate_review(db, experiment.strategy, count, here, seed)
        data = here / "dataset"
        dataset = ["dataset", "--db", db, "--out", data]
        modlabel(*dataset, *(["--reviewed-only"] if args.reviewed_only else []))
        tuned, onnx = here / "run", here / "model.onnx"
        modlabel(
            "train", data, "--out", tuned, "--resume-from", run,
            "--epochs", args.finetune_epochs, "--seed", seed,
        )  # fmt: skip
        modlabel("export", tuned, "--out", onnx)
        scanned = here / "heldout.db"
        modlabel("scan", heldout, "--model", onnx, "--db", scanned)
        hits.append(held_out_hits(scanned, heldout_paths))
    return Outcome(experiment, reviewed, hits, time.monotonic() - started)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(outcomes: list[Outcome], start_hits: np.ndarray, repeats: int) -> str:
    interval = "Wilson; McNemar" if repeats == 1 else f"two-stage bootstrap over {repeats} runs"
    lines = [
        f"held-out images: {len(start_hits)}; start model accuracy "
        f"{accuracy_of([start_hits]).text(3)}; intervals 95% ({interval})",
        "",
        f"{'strategy':<20} {'share':>6} {'reviewed':>8}  {'accuracy [95% CI]':<24} "
        f"{'gain over start [95% CI]':<28} {'p':>9} {'seconds':>8}",
    ]
    for o in outcomes:
        e = o.experiment
        if not o.hits:
            lines.append(f"{e.strategy:<20} {e.share:>6.0%} {'':>8}  {o.note}")
            continue
        g = paired(o.hits, [start_hits])
        gain = f"{g.difference:+.3f} [{g.low:+.3f}, {g.high:+.3f}]"
        lines.append(
            f"{e.strategy:<20} {e.share:>6.0%} {o.reviewed:>8}  {accuracy_of(o.hits).text(3):<24} "
            f"{gain:<28} {g.p_value:>9.3g} {o.seconds:>8.0f}"
        )
    return "\n".join(lines)


def aim(outcomes: list[Outcome], share: float, random_share: float) -> str:
    """The aim, checked: the best of the ``AIMED`` queues at ``share`` against random at
    ``random_share``, paired on the held-out images."""
    by = {(o.experiment.strategy, o.experiment.share): o for o in outcomes if o.hits}
    random_more = by.get(("random", random_share))
    candidates = [by[(s, share)] for s in AIMED if (s, share) in by]
    if random_more is None or not candidates:
        return (
            f"aim not checked (needs one of {', '.join(AIMED)} at {share:.0%} and random at "
            f"{random_share:.0%})"
        )
    best = max(candidates, key=lambda o: float(np.mean([h.mean() for h in o.hits])))
    test = paired(best.hits, random_more.hits)
    verdict = "met" if test.low > 0 else ("not shown" if test.difference > 0 else "not met")
    return (
        f"aim {verdict}: {best.experiment.strategy} at {share:.0%} minus random at "
        f"{random_share:.0%}: {test.difference:+.3f} [{test.low:+.3f}, {test.high:+.3f}] "
        f"({test.test}, p {test.p_value:.3g}, {len(best.hits[0])} held-out images)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder to work in (default: a temporary one)")
    parser.add_argument("--run", help="the start model's run folder (with --model)")
    parser.add_argument("--model", help="the start model's ONNX file (with --run)")
    parser.add_argument("--train-per-class", type=int, default=120, help="the demo's 120")
    parser.add_argument("--input-size", type=int, default=128, help="the demo's 128")
    parser.add_argument("--epochs", type=int, default=15, help="the demo's 15")
    parser.add_argument("--pool-per-class", type=int, default=100)
    parser.add_argument("--heldout-per-class", type=int, default=60)
    parser.add_argument("--shift-size", type=int, default=224, help="image side (the demo: 160)")
    # 0.15: the demo's model labels 73% of such images right (0.08: 98%, nothing to learn).
    parser.add_argument("--shift-noise", type=float, default=0.15)
    parser.add_argument("--shift-seed", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--share", type=float, default=0.05, help="of the pool, per strategy")
    parser.add_argument("--random-share", type=float, default=0.10, help="random's second share")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--reviewed-only", action="store_true", help="dataset --reviewed-only")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each experiment (seeds 0..R-1)"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    if (args.run is None) != (args.model is None):
        parser.error("--run and --model go together")
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
    experiments = [] if args.reviewed_only else [Experiment(PSEUDO, 0.0)]
    experiments += [Experiment(s, args.share) for s in strategies]
    if "random" in strategies and args.random_share != args.share:
        experiments.append(Experiment("random", args.random_share))

    with tempfile.TemporaryDirectory(prefix="bench_review_") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        run, start_onnx = prepare_start(args, work)
        pool, heldout = work / "pool", work / "heldout"
        style = ["--size", args.shift_size, "--noise", args.shift_noise]
        modlabel("synth", pool, "--per-class", args.pool_per_class, "--seed", args.shift_seed,
                 *style)  # fmt: skip
        modlabel("synth", heldout, "--per-class", args.heldout_per_class,
                 "--seed", args.shift_seed + 1, *style)  # fmt: skip
        pool_db, start_db = work / "pool.db", work / "heldout_start.db"
        modlabel("scan", pool, "--model", start_onnx, "--db", pool_db)
        modlabel("scan", heldout, "--model", start_onnx, "--db", start_db)
        heldout_paths = sorted(labels_of(start_db))
        pool_size = len(labels_of(pool_db))
        start_hits = held_out_hits(start_db, heldout_paths)
        say(f"start model on the shifted held-out images: {accuracy_of([start_hits]).text(3)}")
        outcomes = []
        for experiment in experiments:
            say(f"{experiment.strategy} at {experiment.share:.0%} ...")
            outcome = run_experiment(
                experiment, pool_db=pool_db, pool_size=pool_size, run=run, heldout=heldout,
                heldout_paths=heldout_paths, args=args, work=work,
            )  # fmt: skip
            outcomes.append(outcome)
            if outcome.hits:
                accuracy = accuracy_of(outcome.hits).text(3)
                say(f"  accuracy {accuracy} ({outcome.seconds:.0f} s)")
        print(
            f"review loop: pool {pool_size} images (7 x {args.pool_per_class}, size "
            f"{args.shift_size}, noise {args.shift_noise}, seed {args.shift_seed}); fine-tuned "
            f"{args.finetune_epochs} epochs from {run}, {args.repeats} run(s) each"
        )
        print(table(outcomes, start_hits, args.repeats))
        print(aim(outcomes, args.share, args.random_share))
        print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
