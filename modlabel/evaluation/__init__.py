"""Evaluation: a scanned archive against ground truth, the way the paper evaluates.

``modlabel report --truth FILE`` (or ``--truth-from-folders``) adds it to the
report; from Python::

    truth = load_truth("archive/ground_truth.jsonl")
    result = evaluate_truth(engine, store.pick_model(engine), truth, out_dir=Path("report"))

The truth is a ``ground_truth.jsonl`` as ``modlabel synth`` writes (paths
relative to the file's folder, classes and boxes), a CSV with the columns
``path,label`` (paths absolute or relative to the CSV's folder), or the name of
each image's parent folder (``from_folders``). It is joined to the model's
stored rows (files found missing left out) by absolute path: a stored path
that is relative is taken relative to the current folder.

What is computed, on the stored rows that have truth:

* Table 2 from the stored probabilities: accuracy, macro AUC (one-vs-rest),
  macro precision, recall and F1, MCC (``modlabel.metrics``, numpy), a
  confusion matrix and one ROC curve per class (one-vs-rest).
* Eq. 8 as the paper defines it: per class, the average of the stored CRMs of
  the correctly classified images, each divided by its own max
  (``maps.ClassAverage``), with its 70% ROI box (Figure 9).
* The localization of ``modlabel.localize`` (one implementation: the images go
  through ``localize.localize_images``) for CAM, Grad-CAM, CRM and the CAM²
  control, re-running the model the rows were scanned with: Table 3's ROI
  pixels and ratio at 300x300, and, where the truth has boxes, the pointing
  game, the energy-based pointing game, the IoU of the 20% ROI with the boxes,
  the ROI's precision and recall and its share on distractors. Over the
  correctly classified images (of the re-run, the same model), as the paper.
* Figure 6: per class and method, the distribution of the normalized map
  scores: every pixel of each correctly classified image's map at 300x300,
  divided by the map's max (negatives clipped), pooled over the class's images.
  The paper draws the normal curves of their mean and standard deviation; the
  figure draws those and the histograms they summarize.
* Faithfulness (``faithfulness`` = N > 0): deletion and insertion curves (RISE,
  Petsiuk et al. 2018) on a seeded sample of N correctly classified images.
  Each map is upsampled (bilinear) to the model's input and its pixels ranked
  most relevant first (ties in a seeded random order). Deletion replaces the
  ranked pixels, 1/``steps`` of the image per step, by the mean pixel (the
  normalization's zero); insertion starts from a blurred copy (Gaussian,
  sigma = 5/224 of the input's shorter side, RISE's blur at its scale) and puts
  the ranked pixels back. Each step is re-run through onnxruntime and the
  probability of the predicted class recorded; the area under each curve
  (trapezoids over the fraction of pixels, in [0, 1]) is the score: lower for
  deletion and higher for insertion is more faithful. A random order is the
  baseline.

Files, in ``out_dir/evaluation/`` (tables as CSV and JSON, JSON a list of row
objects; figures as PNG): ``evaluation.json`` (everything), ``matching``,
``table2``, ``per_class``, ``confusion_matrix`` (+ ``.png``), ``roc.png``,
``class_maps`` (+ ``.png``), ``localization``, ``localization_classes``,
``map_scores`` (+ ``.png``), and with N > 0 ``faithfulness`` (+ ``.png``) and
``faithfulness_curves``.
"""

from .evaluate import evaluate_truth
from .faithfulness import blur_sigma, curve_area, pixel_order, relevance_curves
from .localization import (
    OVERALL,
    TABLE3_SIZE,
    ClassSummary,
    GroundTruth,
    LocalizationReport,
    MethodRow,
    PooledLocalization,
    ScoredBatch,
    box_mask,
    evaluate_localization,
    localization_scores,
    localize_images,
    pool_localization,
    read_records,
    scale_gt_box,
)
from .results import RANDOM, TruthReport, render_truth_html
from .significance import Comparison, FigureInterval, StatisticsSettings
from .tables import comparison_sentences, format_pooled, format_report
from .truth import Truth, TruthRecord, file_key, load_truth

__all__ = [
    "OVERALL",
    "RANDOM",
    "TABLE3_SIZE",
    "ClassSummary",
    "Comparison",
    "FigureInterval",
    "GroundTruth",
    "LocalizationReport",
    "MethodRow",
    "PooledLocalization",
    "ScoredBatch",
    "StatisticsSettings",
    "Truth",
    "TruthRecord",
    "TruthReport",
    "blur_sigma",
    "box_mask",
    "comparison_sentences",
    "curve_area",
    "evaluate_localization",
    "evaluate_truth",
    "file_key",
    "format_pooled",
    "format_report",
    "load_truth",
    "localization_scores",
    "localize_images",
    "pool_localization",
    "pixel_order",
    "read_records",
    "relevance_curves",
    "render_truth_html",
    "scale_gt_box",
]
