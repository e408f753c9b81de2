"""Calibrate: temperature scaling and calibration error.

numpy only, so the scan can use it; ``export`` fits what the scan applies
(``calibrated_softmax``, through ``modlabel.infer``). The out-of-set test that
export fits beside the temperature is ``modlabel.ood``.

* Temperature scaling (Guo et al. 2017): one scalar T > 0 divides the logits
  before the softmax, chosen to minimize the negative log-likelihood of a
  held-out split. It changes no label (argmax is the same), only how sure the
  probabilities are. The CRM is computed from the head's scores, not from the
  softmax, and does not change.
* Expected calibration error (ECE; Naeini et al. 2015, Guo et al. 2017): the
  confidences (max probability) in 15 equal-width bins (lo, hi];
  ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
# Temperatures searched (golden section on log T); a fitted T at a bound says the logits
# are badly off, and is kept rather than extrapolated.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(x))) along ``axis``, numerically stable; float64."""
    x = np.asarray(x, dtype=np.float64)
    peak = x.max(axis=axis, keepdims=True)
    return (peak + np.log(np.exp(x - peak).sum(axis=axis, keepdims=True))).squeeze(axis)


def calibrated_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T), row-wise: (N, C) -> (N, C) float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0
) -> float:
    """Mean -log softmax(logits / T)[y] over (N, C) logits and (N,) int labels, in nats."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.int64)
    return float(np.mean(logsumexp(z) - z[np.arange(len(y)), y]))


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    tol: float = 1e-5,
) -> float:
    """The T in ``bounds`` minimizing ``negative_log_likelihood`` (golden section on log T).

    The NLL is convex in 1/T, so unimodal in log T and the section finds its minimum.
    logits: (N, C); labels: (N,) int class indices.

    When the minimum sits on the lower bound, the split is classified so cleanly that the
    likelihood keeps falling as T goes to 0: it holds no evidence of how confident the
    model should be, and sharpening would make every wrong or out-of-set image look
    certain. T = 1 (no calibration) is returned then.
    """
    if len(labels) == 0:
        raise ValueError("no samples to fit a temperature on")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def cost(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, math.exp(log_t))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = cost(a), cost(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = cost(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = cost(b)
    fitted = math.exp((lo + hi) / 2.0)
    if fitted <= bounds[0] * (1.0 + 1e-3):
        return 1.0
    return fitted


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE of (N, C) class probabilities against (N,) int labels, ``bins`` equal-width bins.

    Bin m holds the images whose confidence (max probability) is in
    ((m - 1) / bins, m / bins]; each bin weighs by its share of the images.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("no samples to compute a calibration error on")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for m in range(bins):
        in_bin = index == m
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)
