"""Out of set: is an image one of the model's classes at all?

Scores are (N,) float64, higher meaning "less like the training classes": the
Mahalanobis distance of the GAP embedding (the mean of the activations over h,
w) to the nearest class mean under a class-shared covariance (Lee et al. 2018),
and for comparison (``benchmarks/bench_ood.py``) the energy
E(x) = -T * logsumexp(logits / T) (Liu et al. 2020, Eq. 1), the maximum softmax
probability and the cosine distance to the class means. The Mahalanobis
distance was chosen by that benchmark: it alone flagged blank, constant and
1-pixel images (the energy flagged no white or gray image).

``OutOfSetRule``: the score's parameters and the threshold a model's metadata
carries (``ModelInfo.extra["out_of_set"]``); an image whose score is above the
threshold is flagged. ``export`` fits it; ``modlabel.infer`` applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibration import calibrated_softmax, logsumexp
from .codec import decode_array, encode_array

DEFAULT_OOD_RATE = 0.05
MAHALANOBIS = "mahalanobis"
SCORES = (MAHALANOBIS,)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """E(x) = -T * logsumexp(logits / T) (Liu et al. 2020, Eq. 1) of (N, C) logits."""
    return -temperature * logsumexp(np.asarray(logits, dtype=np.float64) / temperature)


def max_softmax_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """1 - max softmax(logits / T) (the baseline of Hendrycks & Gimpel 2017)."""
    return 1.0 - calibrated_softmax(logits, temperature).max(axis=1)


def gap_embedding(activations: np.ndarray) -> np.ndarray:
    """(N, h, w, K) activations -> (N, K) float64: their mean over h and w (the GAP)."""
    return np.asarray(activations, dtype=np.float64).mean(axis=(1, 2))


def class_means(embeddings: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """(C, K) mean embedding of each class (zeros for a class with no sample)."""
    y = np.asarray(labels, dtype=np.int64)
    means = np.zeros((classes, embeddings.shape[1]))
    for c in range(classes):
        if (y == c).any():
            means[c] = embeddings[y == c].mean(axis=0)
    return means


def shared_precision(
    embeddings: np.ndarray, labels: np.ndarray, means: np.ndarray, shrinkage: float = 1e-2
) -> np.ndarray:
    """(K, K) inverse of the class-shared covariance (Lee et al. 2018), ridge-regularized."""
    centred = embeddings - means[np.asarray(labels, dtype=np.int64)]
    cov = centred.T @ centred / max(len(centred), 1)
    cov += shrinkage * (np.trace(cov) / cov.shape[0] + 1e-12) * np.eye(cov.shape[0])
    return np.linalg.inv(cov)


def mahalanobis_score(
    embeddings: np.ndarray, means: np.ndarray, precision: np.ndarray
) -> np.ndarray:
    """min_c (f - mu_c)^T P (f - mu_c) over classes, for (N, K) embeddings."""
    d = embeddings[:, None, :] - means[None, :, :]
    return np.einsum("nck,kl,ncl->nc", d, precision, d).min(axis=1)


def cosine_score(embeddings: np.ndarray, means: np.ndarray) -> np.ndarray:
    """1 - max_c cos(f, mu_c), for (N, K) embeddings."""
    f = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    m = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return 1.0 - (f @ m.T).max(axis=1)


def rate_threshold(scores: np.ndarray, rate: float) -> float:
    """The least threshold that flags (score > threshold) at most ``rate`` of ``scores``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the out-of-set rate must be in [0, 1); got {rate}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no scores to set a threshold on")
    allowed = int(math.floor(rate * s.size + 1e-9))
    return float(s[s.size - 1 - allowed])


@dataclass(frozen=True)
class OutOfSetRule:
    """A model's out-of-set test: the Mahalanobis distance of an image's GAP embedding
    to the nearest class mean, flagged above ``threshold``.

    means: (C, K) float32, the class means of the training split's embeddings;
    whitening: (K, K) float32 lower triangular L with L L^T the inverse of the
    class-shared covariance, so the distance is min_c ||(f - mu_c) L||^2.
    rate: the share of the validation split the threshold flags at most;
    images: the validation images it was set on; fit_images: the training
    images the means and covariance come from.
    """

    threshold: float
    means: np.ndarray
    whitening: np.ndarray
    rate: float = DEFAULT_OOD_RATE
    images: int = 0
    fit_images: int = 0
    score: str = MAHALANOBIS

    @classmethod
    def fit(
        cls, embeddings: np.ndarray, labels: np.ndarray, classes: int, **kwargs: Any
    ) -> OutOfSetRule:
        """Means and whitening from (N, K) training embeddings; threshold 0 (set it after)."""
        means = class_means(embeddings, labels, classes)
        whitening = np.linalg.cholesky(shared_precision(embeddings, labels, means))
        return cls(
            threshold=0.0,
            means=means.astype(np.float32),
            whitening=whitening.astype(np.float32),
            fit_images=int(len(labels)),
            **kwargs,
        )

    def scores(self, activations: np.ndarray) -> np.ndarray:
        """(N, h, w, K) activations -> (N,) out-of-set scores (float64)."""
        return self.scores_of(gap_embedding(activations))

    def scores_of(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, K) GAP embeddings -> (N,) out-of-set scores (float64)."""
        w = self.whitening.astype(np.float64)
        z = np.asarray(embeddings, dtype=np.float64) @ w
        centres = self.means.astype(np.float64) @ w
        return (((z[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)).min(axis=1)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        k = self.whitening.shape[0]
        return {
            "score": self.score,
            "definition": "min over classes c of (f - mu_c)^T S^-1 (f - mu_c), f the mean of "
            "the activations over h and w, mu_c the class means and S the class-shared "
            "covariance of the training split; flagged when above threshold",
            "threshold": self.threshold,
            "rate": self.rate,
            "threshold_fitted_on": "val",
            "images": self.images,
            "fit_images": self.fit_images,
            "means": encode_array(np.asarray(self.means, dtype=np.float32)),
            # the lower triangle only: half the bytes of the full matrix
            "whitening_tril": encode_array(
                np.asarray(self.whitening, dtype=np.float32)[np.tril_indices(k)]
            ),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> OutOfSetRule:
        """Raises ``ValueError`` (or ``KeyError``, ``TypeError``) for a malformed entry."""
        score = str(doc.get("score", ""))
        if score not in SCORES:
            raise ValueError(f"unknown out-of-set score {score!r} (known: {', '.join(SCORES)})")
        means = decode_array(doc["means"]).astype(np.float32)
        tril = decode_array(doc["whitening_tril"]).astype(np.float32)
        if means.ndim != 2:
            raise ValueError("out-of-set means must be (C, K)")
        k = means.shape[1]
        if tril.shape != (k * (k + 1) // 2,):
            raise ValueError(f"out-of-set whitening has {tril.size} values; K = {k} needs more")
        whitening = np.zeros((k, k), dtype=np.float32)
        whitening[np.tril_indices(k)] = tril
        rule = cls(
            threshold=float(doc["threshold"]),
            means=means,
            whitening=whitening,
            rate=float(doc.get("rate", DEFAULT_OOD_RATE)),
            images=int(doc.get("images", 0)),
            fit_images=int(doc.get("fit_images", 0)),
            score=score,
        )
        if not math.isfinite(rule.threshold):
            raise ValueError("out-of-set threshold must be finite")
        return rule
