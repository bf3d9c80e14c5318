"""Temperature scaling and how well confidences match accuracy (numpy only).

A distilled student is usually over- or under-confident in ways one scalar fixes: divide the
logits by a temperature T fitted on validation to minimise the negative log-likelihood of the
teacher's labels (Guo et al., 2017). The cascade threshold is then set on calibrated
confidences, so "0.9" means about 90 % agreement.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
# Search range for T; far wider than any useful temperature, so hitting an end means the
# logits carry no signal worth scaling.
T_MIN, T_MAX = 0.05, 20.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer `targets` under softmax(logits / T)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(targets)), targets].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, tol: float = 1e-4) -> float:
    """The T minimising validation NLL: golden-section search on log T.

    NLL is convex in 1/T, hence unimodal in log T, so a bracketing search finds the optimum
    without gradients or scipy.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        return 1.0
    f = lambda log_t: nll(logits, targets, math.exp(log_t))  # noqa: E731
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return math.exp((lo + hi) / 2)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins over (0, 1]: each bin's range, mean confidence, accuracy and count."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for i in range(n_bins):
        member = index == i
        count = int(member.sum())
        bins.append({
            "lo": float(edges[i]), "hi": float(edges[i + 1]), "count": count,
            "confidence": float(confidence[member].mean()) if count else None,
            "accuracy": float(correct[member].mean()) if count else None,
        })
    return bins


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               n_bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    total = len(confidence)
    if total == 0:
        return 0.0
    return float(sum(b["count"] / total * abs(b["confidence"] - b["accuracy"])
                     for b in reliability_bins(confidence, correct, n_bins) if b["count"]))
