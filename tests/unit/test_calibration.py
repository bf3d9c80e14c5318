import numpy as np
import pytest

from distill_compiler.metrics.calibration import (
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)


def sample_calibrated(n, k, rng, scale=3.0):
    """Logits whose softmax is the true label distribution: labels drawn from softmax(logits)."""
    logits = rng.normal(0, scale, size=(n, k))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    logits, labels = sample_calibrated(20000, 5, rng)
    # A model whose logits are scaled by 1/T is miscalibrated by exactly T.
    t = fit_temperature(logits / true_t, labels)
    assert t == pytest.approx(1 / true_t, rel=0.05)


def test_fitted_temperature_lowers_nll():
    rng = np.random.default_rng(1)
    logits, labels = sample_calibrated(5000, 4, rng)
    overconfident = logits * 3
    t = fit_temperature(overconfident, labels)
    assert nll(overconfident, labels, t) < nll(overconfident, labels, 1.0)


def test_ece_of_calibrated_data_is_near_zero_and_of_overconfident_is_not():
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0, 1, 50000)
    correct = rng.uniform(0, 1, 50000) < confidence
    assert expected_calibration_error(confidence, correct) < 0.01
    assert expected_calibration_error(np.full(1000, 0.9), np.arange(1000) < 600) == pytest.approx(0.3)


def test_reliability_bins_are_equal_width_with_exact_contents():
    bins = reliability_bins(np.array([0.05, 0.1, 0.95, 1.0]), np.array([1, 0, 1, 1]), n_bins=10)
    assert len(bins) == 10 and bins[0]["lo"] == 0.0 and bins[-1]["hi"] == 1.0
    # (0, 0.1] holds 0.05 and exactly 0.1; (0.9, 1.0] holds 0.95 and 1.0.
    assert bins[0] == {"lo": 0.0, "hi": 0.1, "count": 2, "confidence": pytest.approx(0.075),
                       "accuracy": 0.5}
    assert bins[9]["count"] == 2 and bins[9]["accuracy"] == 1.0
    assert all(b["count"] == 0 and b["accuracy"] is None for b in bins[1:9])
