"""The truth joined to the model's stored rows (by absolute path), and their stored scores."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import codec, maps, store
from ..paths import display_path, from_db
from .truth import EXAMPLES, Truth, file_key

# --------------------------------------------------------------------------
# Matching the truth to the stored rows.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """How the truth met the model's stored rows (files found missing left out)."""

    stored_rows: int
    with_truth: int  # stored rows with a truth record
    labeled: int  # of those, labeled: the images of Table 2
    errors: int  # of those, stored with an error (not labeled)
    without_truth: int  # stored rows the truth says nothing about
    truth_records: int | None  # None for folder names
    truth_without_row: int | None
    examples_without_row: list[str]  # the first few, as paths to show
    other_folders: dict[str, int]  # folder names that are no class (from_folders)


@dataclass(frozen=True)
class StoredRow:
    row_id: int
    stored_path: str
    file: str  # to open
    key: str
    true_class: str


def match_rows(
    engine: Engine, model_row: store.ModelRow, truth: Truth
) -> tuple[list[StoredRow], Matching]:
    c = store.images.c
    query = (
        sa.select(c.id, c.path, c.label, c.error)
        .where(c.model_id == model_row.id, c.missing_since.is_(None))
        .order_by(c.path)
        .execution_options(yield_per=2000)
    )
    classes = set(model_row.class_names)
    labeled: list[StoredRow] = []
    seen: set[str] = set()
    stored = errors = with_truth = 0
    other_folders: Counter[str] = Counter()
    with engine.connect() as conn:
        for row_id, stored_path, label, error in conn.execute(query):
            stored += 1
            file = from_db(stored_path)
            key = file_key(file)
            true_class = truth.class_of(key)
            if true_class is None:
                continue
            if truth.kind == "folders" and true_class not in classes:
                other_folders[true_class] += 1
                continue
            with_truth += 1
            seen.add(key)
            if label is None or error is not None:
                errors += 1
                continue
            labeled.append(StoredRow(int(row_id), stored_path, file, key, true_class))
    if truth.kind == "folders":
        truth_records = without_row = None
        examples: list[str] = []
    else:
        truth_records = len(truth.records)
        unmatched = [k for k in truth.records if k not in seen]
        without_row = len(unmatched)
        examples = [display_path(k) for k in unmatched[:EXAMPLES]]
    matching = Matching(
        stored_rows=stored,
        with_truth=with_truth,
        labeled=len(labeled),
        errors=errors,
        without_truth=stored - with_truth,
        truth_records=truth_records,
        truth_without_row=without_row,
        examples_without_row=examples,
        other_folders=dict(other_folders.most_common()),
    )
    return labeled, matching


def stored_scores(
    engine: Engine, rows: Sequence[StoredRow], class_names: Sequence[str]
) -> tuple[np.ndarray, dict[str, maps.ClassAverage]]:
    """The rows' stored probabilities (N, C), in ``class_names`` order, and per class
    the running average (Eq. 8) of the stored CRMs of its correctly classified rows.

    Read in chunks of ids, so that only the averages' sums stay in memory.
    """
    c = store.images.c
    probs = np.zeros((len(rows), len(class_names)), dtype=np.float64)
    averages: dict[str, maps.ClassAverage] = {}
    with engine.connect() as conn:
        for start in range(0, len(rows), 500):
            at = {r.row_id: start + i for i, r in enumerate(rows[start : start + 500])}
            query = sa.select(c.id, c.probabilities, c.crm, c.label).where(c.id.in_(list(at)))
            for row_id, probabilities, blob, label in conn.execute(query):
                i = at[int(row_id)]
                stored = probabilities or {}
                probs[i] = [float(stored.get(name, 0.0)) for name in class_names]
                true_class = rows[i].true_class
                if label == true_class and blob is not None:
                    averages.setdefault(true_class, maps.ClassAverage()).add(
                        codec.decode_map(bytes(blob))
                    )
    return probs, averages
