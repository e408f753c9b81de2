"""Modality: what one class of the synthetic archive is, for the registry to collect."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .draw import Scene

Renderer = Callable[[np.random.Generator, int, int], Scene]
"""Draws one class's scene from (rng, width, height); all randomness comes from rng."""


@dataclass(frozen=True)
class Modality:
    """One class of the archive.

    label: the class index: the position in ``CLASS_NAMES``, the archive's folder
        order and a trained model's output index, so an existing label never changes.
    name: the class name, also the archive's folder name.
    structures: the box labels every image of the class carries.
    render: draws the class's scene, before the class-blind steps.
    max_rotation_deg: the largest tilt the class tolerates, in degrees.
    """

    label: int
    name: str
    structures: frozenset[str]
    render: Renderer
    max_rotation_deg: float
