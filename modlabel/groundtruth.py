"""Ground truth: the file of boxes beside a synthetic archive's images, and its records.

``<archive>/ground_truth.jsonl`` holds one JSON object per image, keys in this
order: ``path`` (relative to the archive, posix), ``class``, ``width`` and
``height`` (pixels of the saved image), ``boxes`` (the class's structures) and
``distractors`` (text, scale bars, arrows, borders), both lists of
``{"label": str, "box": [x0, y0, x1, y1]}`` in those pixels, x1 and y1 exclusive.

``modlabel.synth`` writes it; ``modlabel.evaluation`` scores relevance maps against it.
"""

from __future__ import annotations

import json
from pathlib import Path

GROUND_TRUTH_NAME = "ground_truth.jsonl"


def image_record(
    *,
    path: str,
    class_name: str,
    width: int,
    height: int,
    boxes: list[dict],
    distractors: list[dict],
) -> dict:
    """One ``ground_truth.jsonl`` line as a dict, keys in the file's order."""
    return {
        "path": path,
        "class": class_name,
        "width": width,
        "height": height,
        "boxes": boxes,
        "distractors": distractors,
    }


def read_ground_truth(path: Path) -> list[dict]:
    """Parse a ``ground_truth.jsonl`` into its records, in file order."""
    with Path(path).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]
