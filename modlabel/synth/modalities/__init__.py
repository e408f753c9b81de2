"""The archive's classes, one module each, collected in label order.

Every module of this package defines ``MODALITY``, a ``Modality`` whose
``label`` is its class index. The order of ``CLASS_NAMES`` is therefore the
order of the labels, not of the file names: 0 abdominal_ct, 1 brain_mri,
2 ultrasound, 3 chest_xray, 4 fluorescence_microscopy, 5 retinal_funduscopy,
6 statistical_graph (the paper's seven modalities). Adding a class is adding
one module here with the next label (7); renumbering one would change every
archive and every trained model's outputs.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..modality import Modality


def _collect() -> tuple[Modality, ...]:
    """Import every module of this package and order their ``MODALITY`` by label."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        modality = getattr(module, "MODALITY", None)
        if not isinstance(modality, Modality):
            raise ImportError(f"{module.__name__} defines no MODALITY = Modality(...)")
        found.append(modality)
    found.sort(key=lambda m: m.label)
    labels = [m.label for m in found]
    if labels != list(range(len(found))):
        raise ImportError(f"modality labels must be 0, 1, 2, ... without gaps, got {labels}")
    names = [m.name for m in found]
    if len(set(names)) != len(names):
        raise ImportError(f"modality names must be unique, got {names}")
    return tuple(found)


MODALITIES: tuple[Modality, ...] = _collect()
"""Every class, in label order."""

MODALITIES_BY_NAME: dict[str, Modality] = {m.name: m for m in MODALITIES}

CLASS_NAMES: tuple[str, ...] = tuple(m.name for m in MODALITIES)
"""The paper's seven modality classes; also the archive's folder names, in label order."""

STRUCTURE_LABELS: dict[str, frozenset[str]] = {m.name: m.structures for m in MODALITIES}
"""Box labels every image of a class carries (a graph may add ``legend``)."""
