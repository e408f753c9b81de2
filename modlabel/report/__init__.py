"""Report: what a model made of an archive, as a page and as files to take elsewhere.

``build_report`` writes into one folder, each part on request (``formats``):

* ``html``: ``report.html``, one self-contained page (every picture an inline
  PNG or SVG, no script, nothing fetched; a Content-Security-Policy forbids
  it). Per class: the count, the class-level average CRM (Eq. 8) with its ROI
  box (Figure 9), a histogram of confidence, the most and the least confident
  images with their CRM overlaid (Figure 4). For the whole run: the scans, the
  files that failed grouped by reason, the missing files; where people reviewed
  images, the model's accuracy on them (``modlabel.accuracy``).
* ``rois``: ``class_rois.csv`` and ``class_rois.json``, one row per (model,
  class): the ROI box in input pixels and as fractions of the image, its
  share, every region above the threshold, the images and threshold behind it.
* ``maps``: ``class_maps/<class>.png`` (heatmap with boxes, input size),
  ``<class>.nobox.png`` and ``<class>.npy`` (the average at the feature-map
  resolution, float32).
* ``images``: ``images.csv``, one row per image of the model, streamed from the
  database: memory stays flat for millions of rows.

The class ROI is computed on the map as it is shown (``modlabel.rois``): the
average upsampled to the model's input size, then the area above 70% of its
maximum. With ground truth (``truth``), the averages are those of the
correctly classified images (``modlabel.evaluation``) instead of the stored
ones.

The package: ``build`` (what is read, and which parts are written), ``html`` (the
page) and ``files`` (the files to take elsewhere). The report only reads.
"""

from .build import ReportResult, build_report, parse_formats
from .files import (
    ALL_FORMATS,
    FORMATS,
    IMAGE_COLUMNS,
    IMAGE_CSV_COLUMNS,
    ROI_COLUMNS,
    class_file_stems,
)

__all__ = [
    "ALL_FORMATS",
    "FORMATS",
    "IMAGE_COLUMNS",
    "IMAGE_CSV_COLUMNS",
    "ROI_COLUMNS",
    "ReportResult",
    "build_report",
    "class_file_stems",
    "parse_formats",
]
