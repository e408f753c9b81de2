"""Figure 6: the distributions of the normalized map scores, per class and method."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .. import geometry
from .localization import ScoredBatch
from .results import SCORE_BINS, MapScores

# --------------------------------------------------------------------------
# Figure 6: distributions of the normalized map scores.
# --------------------------------------------------------------------------


class ScoreDistributions:
    """Running moments and histograms of max-normalized map values, per class and method."""

    def __init__(self, methods: Sequence[str]) -> None:
        self.methods = tuple(methods)
        self.classes: dict[str, int] = {}  # images per class
        self.hist: dict[tuple[str, str], np.ndarray] = {}
        self.moments: dict[tuple[str, str], np.ndarray] = {}  # count, sum, sum of squares

    def add(self, batch: ScoredBatch) -> None:
        names = np.array([r.class_name for r in batch.records])
        for name in set(names.tolist()):
            self.classes[name] = self.classes.get(name, 0) + int((names == name).sum())
        for method in self.methods:
            unit = geometry.normalize_unit(batch.maps_at_size[method])
            for name in set(names.tolist()):
                values = unit[names == name].reshape(-1).astype(np.float64)
                bins = np.minimum((values * SCORE_BINS).astype(np.intp), SCORE_BINS - 1)
                key = (name, method)
                hist = np.bincount(bins, minlength=SCORE_BINS)
                moments = np.array([values.size, values.sum(), (values * values).sum()])
                self.hist[key] = self.hist.get(key, 0) + hist
                self.moments[key] = self.moments.get(key, 0) + moments

    def rows(self, class_order: Sequence[str]) -> list[MapScores]:
        out = []
        for name in class_order:
            for method in self.methods:
                n, total, squares = self.moments[(name, method)]
                mean = total / n
                std = math.sqrt(max(squares / n - mean * mean, 0.0))
                density = self.hist[(name, method)] / n * SCORE_BINS
                out.append(
                    MapScores(
                        name,
                        method,
                        self.classes[name],
                        int(n),
                        float(mean),
                        float(std),
                        [float(v) for v in density],
                    )
                )
        return out
