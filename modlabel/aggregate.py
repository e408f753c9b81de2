"""Aggregate: the class-level average CRM (paper Eq. 8) of every class, from the store.

Maps are streamed out of the database one at a time into a running average,
so the memory used does not grow with the archive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.engine import Engine

from . import codec, maps, store


@dataclass(frozen=True)
class ClassMap:
    """One class's average CRM at the feature-map resolution, and its ROI box."""

    class_name: str
    image_count: int
    average: np.ndarray  # (h, w) float32, normalized so its max is 1
    roi_box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) in map cells, x1/y1 exclusive


def class_average(
    engine: Engine,
    model_id: int,
    class_name: str,
    *,
    min_confidence: float = 0.0,
    roi_fraction: float = maps.CLASS_ROI_FRACTION,
) -> ClassMap | None:
    """The average CRM over the images labeled ``class_name``; None when there are none."""
    accumulator = maps.ClassAverage()
    for blob in store.iter_class_maps(engine, model_id, class_name, min_confidence=min_confidence):
        accumulator.add(codec.decode_map(blob))
    if accumulator.count == 0:
        return None
    average = accumulator.mean()
    peak = float(average.max())
    if peak > 0:
        average = average / peak
    box = maps.roi_box(average, fraction=roi_fraction) if peak > 0 else None
    return ClassMap(
        class_name,
        accumulator.count,
        average.astype(np.float32),
        tuple(int(v) for v in box) if box is not None else None,
    )


def update_class_maps(
    engine: Engine, model_id: int, class_names: Sequence[str], *, min_confidence: float = 0.0
) -> list[ClassMap]:
    """Recompute and store every class's average CRM; returns those with images."""
    results = []
    for name in class_names:
        class_map = class_average(engine, model_id, name, min_confidence=min_confidence)
        if class_map is None:
            store.delete_class_map(engine, model_id, name)  # no images left in the class
            continue
        store.save_class_map(
            engine,
            model_id,
            name,
            class_map.image_count,
            codec.encode_map(class_map.average),
            class_map.roi_box,
        )
        results.append(class_map)
    return results
