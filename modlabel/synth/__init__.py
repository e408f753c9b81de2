"""Synth: render a labeled archive of caricatured medical images.

No public modality data set can be downloaded here, so modlabel draws its own:
the seven modalities of the paper (Kim, Rajaraman, Antani 2019, section 2.1),
each with its discriminative structure (the optic disc of a fundus, the fan of
an ultrasound, the axes of a graph, ...) recorded as a ground-truth box, so a
relevance map (CAM, Grad-CAM, CRM) can be scored against where the class
evidence really is.

Every image is drawn by one small renderer per class and then passes through
the same class-blind steps: rotation (boxes follow it), photometric jitter
(gain, bias, gamma, blur, noise) and distractors (text, scale bars, arrows,
borders) drawn with the same probabilities in every class, so they carry no
class information but keep the task from being trivial.

Coordinates are pixels of the saved image: x to the right, y down, a box is
``[x0, y0, x1, y1]`` with ``x1`` and ``y1`` exclusive. Anatomical sides follow
the radiological convention: the patient's left is on the image's right.

Layout:

* ``modalities/``: one module per class, each defining ``MODALITY`` (its label,
  structures, renderer and tolerated tilt); the package collects them in label
  order, so adding a class is adding one module there.
* ``draw``: the shapes, noise, blur and box helpers the renderers share.
* ``distractors``: the class-blind annotations.
* ``archive``: ``render_image`` (a scene through the class-blind steps) and
  ``render_archive`` (the JPEGs and ``ground_truth.jsonl``).
* ``modlabel.groundtruth``: the ground-truth file's name and record format.

Only numpy and Pillow are used; TensorFlow stays in ``train/``.
"""

from __future__ import annotations

from ..groundtruth import GROUND_TRUTH_NAME, read_ground_truth
from .archive import (
    JPEG_QUALITY,
    MIN_SIZE,
    SIZE_JITTER,
    SynthImage,
    SynthSummary,
    ground_truth_record,
    image_seed,
    render_archive,
    render_image,
)
from .distractors import (
    CAPTIONS,
    DISTRACTOR_COLOR_WEIGHTS,
    DISTRACTOR_COLORS,
    DISTRACTOR_LABELS,
    P_ARROW,
    P_BORDER,
    P_SCALE_BAR,
    P_TEXT,
    SCALE_BAR_CAPTIONS,
)
from .draw import FloatImage

# Their names from before the split into a package; tests/test_synth.py uses them.
from .draw import points_box as _points_box  # noqa: F401
from .draw import rotate_points as _rotate_points  # noqa: F401
from .modalities import CLASS_NAMES, MODALITIES, STRUCTURE_LABELS
from .modalities.statistical_graph import PLOT_COLORS
from .modality import Modality, Renderer

__all__ = [
    "CAPTIONS",
    "CLASS_NAMES",
    "DISTRACTOR_COLORS",
    "DISTRACTOR_COLOR_WEIGHTS",
    "DISTRACTOR_LABELS",
    "GROUND_TRUTH_NAME",
    "JPEG_QUALITY",
    "MIN_SIZE",
    "MODALITIES",
    "PLOT_COLORS",
    "P_ARROW",
    "P_BORDER",
    "P_SCALE_BAR",
    "P_TEXT",
    "SCALE_BAR_CAPTIONS",
    "SIZE_JITTER",
    "STRUCTURE_LABELS",
    "FloatImage",
    "Modality",
    "Renderer",
    "SynthImage",
    "SynthSummary",
    "ground_truth_record",
    "image_seed",
    "read_ground_truth",
    "render_archive",
    "render_image",
]
