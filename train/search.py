"""Randomized hyperparameter search in the paper's ranges (section 2.2, ref. 25).

Each of N trials draws, from a generator seeded with the run's seed:

* learning rate: log-uniform in [1e-5, 1e-1];
* momentum (Adam's beta_1): uniform in [0.8, 0.99];
* L2 on the added layers: log-uniform in [1e-10, 1e-1];

trains a fresh model (same seed, same initial weights) for ``search_epochs``
epochs with the full recipe, and scores it by its lowest validation
cross-entropy. Trials are written to RUN/search.csv as they finish, so an
interrupted search resumes at the first missing trial. The best trial's
hyperparameters are returned for the final training.
"""

from __future__ import annotations

import csv
import gc
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from modlabel import spreadsheet

from .data import Split
from .recipe import MONITOR, build_for_run, compile_model, datasets
from .rundir import SEARCH_CSV

RANGES = {
    "learning_rate": (1e-5, 1e-1, "log-uniform"),
    "beta_1": (0.8, 0.99, "uniform"),
    "l2": (1e-10, 1e-1, "log-uniform"),
}
COLUMNS = [
    "trial",
    "learning_rate",
    "beta_1",
    "l2",
    "epochs",
    "best_val_cross_entropy",
    "best_val_accuracy",
    "best_epoch",
    "seconds",
]


def sample_trials(n: int, seed: int) -> list[dict[str, float]]:
    """N hyperparameter draws from RANGES, the same for the same seed."""
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n):
        trial = {}
        for name, (low, high, kind) in RANGES.items():
            if kind == "log-uniform":
                trial[name] = float(10 ** rng.uniform(np.log10(low), np.log10(high)))
            else:
                trial[name] = float(rng.uniform(low, high))
        trials.append(trial)
    return trials


def run_search(split: Split, config: dict[str, Any], out: Path, *, say=print) -> dict[str, float]:
    """Run (or finish) the run's search; returns the best trial's
    {learning_rate, beta_1, l2}."""
    hp = config["hyperparameters"]
    n, epochs = int(hp["search"]), int(hp["search_epochs"])
    trials = sample_trials(n, config["seed"])
    path = out / SEARCH_CSV
    done = _read_rows(path)
    if len(done) < n:
        say(
            f"hyperparameter search: {n} trials of {epochs} epoch(s)"
            + (f", {len(done)} already done" if done else "")
        )
    train_ds, val_ds = datasets(split, config)
    for index in range(len(done), n):
        trial = trials[index]
        say(
            f"trial {index + 1}/{n}: learning rate {trial['learning_rate']:.3g}, "
            f"beta_1 {trial['beta_1']:.3f}, L2 {trial['l2']:.3g}"
        )
        keras.utils.set_random_seed(config["seed"])
        model = compile_model(
            build_for_run(config, l2=trial["l2"]),
            learning_rate=trial["learning_rate"],
            beta_1=trial["beta_1"],
        )
        started = time.monotonic()
        history = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            shuffle=False,
            callbacks=[keras.callbacks.TerminateOnNaN()],
            verbose=2 if getattr(say, "verbose", False) else 0,
        )
        scores = [s if math.isfinite(s) else math.inf for s in history.history.get(MONITOR, [])]
        best = int(np.argmin(scores)) if scores else 0
        row = {
            "trial": index + 1,
            **trial,
            "epochs": len(scores),
            "best_val_cross_entropy": scores[best] if scores else math.inf,
            "best_val_accuracy": history.history["val_accuracy"][best] if scores else 0.0,
            "best_epoch": best + 1,
            "seconds": round(time.monotonic() - started, 1),
        }
        _append_row(path, row)
        done.append(row)
        say(
            f"trial {index + 1}/{n}: best val cross-entropy {row['best_val_cross_entropy']:.4f}"
            f", val accuracy {row['best_val_accuracy']:.4f}"
        )
        del model
        gc.collect()
    number = int(min(done, key=lambda r: float(r["best_val_cross_entropy"]))["trial"])
    # The exact draw, not the rounded text of search.csv: a resumed search
    # retrains exactly what an uninterrupted one would.
    best = trials[number - 1]
    say(
        f"best trial {number}: learning rate {best['learning_rate']:.3g}, "
        f"beta_1 {best['beta_1']:.3f}, L2 {best['l2']:.3g}"
    )
    return {**best, "search_best_trial": number}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = spreadsheet.SafeDictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
