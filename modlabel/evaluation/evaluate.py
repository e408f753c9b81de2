"""``evaluate_truth``: a scanned archive against ground truth, every measure at once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import maps, perturb, store
from ..errors import ModelError, ModlabelError
from ..model import OnnxModel
from ..paths import display_path, from_db
from ..store import class_map_from_sum
from .distributions import ScoreDistributions
from .faithfulness import faithfulness_test
from .figures import draw_figures
from .localization import GroundTruth, ScoredBatch, localize_images
from .matching import Matching, StoredRow, match_rows, stored_scores
from .results import EVALUATION_DIR, FAITHFULNESS_STEPS, FORMATS, TruthReport, write_files
from .truth import Truth, file_key

# --------------------------------------------------------------------------
# The evaluation.
# --------------------------------------------------------------------------


def _sklearn() -> tuple[Any, Callable[..., Any]]:
    """``modlabel.metrics`` and ``roc_curve``: scikit-learn, not in the runtime install."""
    try:
        from sklearn.metrics import roc_curve

        from .. import metrics
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("sklearn", "scipy", "joblib", "threadpoolctl"):
            raise
        raise ModlabelError(
            "the evaluation against ground truth needs scikit-learn: pip install 'modlabel[eval]'"
        ) from None
    return metrics, roc_curve


def _load_model(model_row: store.ModelRow, model: OnnxModel | None) -> OnnxModel:
    if model is None:
        try:
            model = OnnxModel(model_row.path)
        except ModelError as exc:
            raise ModelError(
                f"the evaluation re-runs the model the images were scanned with, "
                f"{model_row.path}, and cannot load it: {exc}"
            ) from None
    if model.identity != model_row.identity:
        raise ModelError(
            f"{model.path} is not the model the images were scanned with: it is "
            f"{model.identity}, they were labeled by {model_row.identity}"
        )
    return model


def evaluate_truth(
    engine: Engine,
    model_row: store.ModelRow,
    truth: Truth,
    *,
    out_dir: Path,
    faithfulness: int = 0,
    formats: Iterable[str] = FORMATS,
    methods: Sequence[str] | None = None,
    perturbation: perturb.Options | None = None,
    batch_size: int = 32,
    steps: int = FAITHFULNESS_STEPS,
    seed: int = 0,
    model: OnnxModel | None = None,
) -> TruthReport:
    """Evaluate the model's stored labels and maps against ``truth``.

    Writes the tables and figures (PNG) into ``out_dir/evaluation/`` and
    returns them (see the module docstring for every measure and file).
    formats: the tables' formats, among ``FORMATS`` (csv, json); other names
    (the report's own formats, which ``build_report`` passes on) are ignored,
    and where none of csv and json is named, both are written.

    The maps other than the stored CRM need the model: ``model`` if given,
    else ``OnnxModel(model_row.path)``; it must be the model the rows were
    labeled with. faithfulness: how many correctly
    classified images (a sample drawn with ``seed``) get deletion and insertion
    curves of ``steps`` steps; 0 for none. Raises ModlabelError when the truth
    names classes the model lacks, no stored row has truth, scikit-learn is
    missing or the model cannot be loaded. ``perturbation``: how Score-CAM and RISE run,
    when ``methods`` names them (``perturb.Options()`` for None).
    """
    methods = maps.parse_methods(methods)  # None: the registry's defaults
    metrics, roc_curve = _sklearn()
    formats = [f for f in FORMATS if f in set(formats)] or list(FORMATS)
    if faithfulness < 0 or steps < 1 or batch_size < 1:
        raise ValueError("faithfulness must be >= 0, steps and batch_size >= 1")
    class_names = list(model_row.class_names)
    index_of = {name: i for i, name in enumerate(class_names)}
    foreign = sorted({r.class_name for r in truth.records.values()} - set(class_names))
    if foreign:
        raise ModlabelError(
            f"{truth.source}: classes {foreign} are not the model's classes {class_names}"
        )

    rows, matching = match_rows(engine, model_row, truth)
    if not rows:
        raise ModlabelError(_no_match_message(engine, model_row, truth, matching))
    model = _load_model(model_row, model)

    # Table 2 from the stored probabilities; Eq. 8 from the stored CRMs of correct rows.
    probs, averages = stored_scores(engine, rows, class_names)
    y_true = np.array([index_of[r.true_class] for r in rows], dtype=np.int64)
    table2 = metrics.classification_metrics(y_true, probs, class_names)
    class_maps = {
        name: class_map_from_sum(
            name, averages[name].mean() * averages[name].count, averages[name].count
        )
        for name in class_names
        if name in averages
    }

    # The other maps: one pass of the model over the images with truth.
    scores = ScoreDistributions(methods)
    correct: list[tuple[str, int]] = []

    def collect(batch: ScoredBatch) -> None:
        scores.add(batch)
        correct.extend(
            (file, index_of[record.class_name])
            for record, file in zip(batch.records, batch.files, strict=True)
        )

    localization = localize_images(
        ((_ground_truth(r, truth), r.file) for r in rows),
        model,
        source=truth.source,
        methods=methods,
        batch_size=batch_size,
        on_batch=collect,
        perturbation=perturbation,
    )
    faith = (
        faithfulness_test(
            model,
            correct,
            faithfulness,
            methods,
            steps,
            seed,
            batch_size,
            perturbation=perturbation,
        )
        if faithfulness > 0
        else None
    )

    report = TruthReport(
        model_identity=model_row.identity,
        truth_source=truth.source,
        truth_kind=truth.kind,
        has_boxes=truth.has_boxes,
        out_dir=Path(out_dir) / EVALUATION_DIR,
        class_names=class_names,
        matching=matching,
        table2=table2,
        class_maps=class_maps,
        localization=localization,
        map_scores=scores.rows([n for n in class_names if n in scores.classes]),
        faithfulness=faith,
        methods=tuple(methods),
        table2_keys=tuple(metrics.SUMMARY_KEYS),
    )
    draw_figures(report, y_true, probs, roc_curve)
    write_files(report, formats)
    return report


def _ground_truth(row: StoredRow, truth: Truth) -> GroundTruth:
    record = truth.records.get(row.key)
    if record is not None and record.boxes is not None:
        return record.boxes
    return GroundTruth(display_path(row.stored_path), row.true_class, None, None, (), ())


def _no_match_message(
    engine: Engine, model_row: store.ModelRow, truth: Truth, matching: Matching
) -> str:
    if matching.with_truth:
        return (
            f"{truth.source}: the {matching.with_truth} stored images with truth all have "
            "errors; nothing to evaluate"
        )
    if truth.kind == "folders":
        folders = ", ".join(list(matching.other_folders)[:5]) or "none"
        return (
            f"no stored image of model {model_row.identity} lies in a folder named after "
            f"one of its classes {model_row.class_names} (folders: {folders})"
        )
    c = store.images.c
    with engine.connect() as conn:
        stored = conn.execute(sa.select(c.path).where(c.model_id == model_row.id).limit(1)).scalar()
    some_truth = next(iter(truth.records), "")
    return (
        f"{truth.source}: none of its {len(truth.records)} paths is a stored image of model "
        f"{model_row.identity} (truth paths look like {display_path(some_truth)}, stored ones "
        f"like {display_path(file_key(from_db(stored))) if stored else 'nothing: none stored'})"
    )
