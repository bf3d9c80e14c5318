"""The out-of-scope detector's math on synthetic embeddings, its policy.json round trip, the
cascade projected onto an out-of-scope share, and the live-share estimate /metrics exports."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from distill_compiler.metrics import cascade, ood
from distill_compiler.runtime.format import out_of_scope_fields, read_out_of_scope
from distill_compiler.runtime.ood import Detector, knn, pack, unpack
from distill_compiler.serve.metrics import Metrics, OutOfScopeEstimate


def clusters(n_per_class: int = 60, dim: int = 12, seed: int = 0):
    """Three unit-norm intent clusters in `dim` dimensions; the rows are training embeddings."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:3]
    x = np.concatenate([c + 0.15 * rng.standard_normal((n_per_class, dim)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.repeat(np.arange(3), n_per_class), rng


def detector_for(kind: str, x, ids, threshold: float = np.inf) -> Detector:
    return ood.detector(kind, ood.fit_params(kind, x, ids), temperature=1.0, threshold=threshold)


@pytest.mark.parametrize("kind", ["mahalanobis", "knn"])
def test_embedding_detectors_score_far_points_above_every_training_cluster(kind):
    x, ids, rng = clusters()
    near, _, _ = clusters(seed=1)  # fresh draws from the same clusters
    far = np.eye(12)[6:] + 0.15 * rng.standard_normal((6, 12))  # axes no intent lives on
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    d = detector_for(kind, x, ids)
    logits = np.zeros((len(near), 3))
    near_scores = d.score(logits, near)
    far_scores = d.score(logits[:6], far)
    assert far_scores.min() > np.quantile(near_scores, 0.99)
    assert ood.auroc(near_scores, far_scores) == 1.0


def test_shared_covariance_is_invertible_with_fewer_rows_than_dimensions():
    # 3 intents x 5 rows in 40 dimensions: the sample covariance is singular; the shrunk one
    # is not, and Mahalanobis still tells a far point from the training rows.
    x, ids, _ = clusters(n_per_class=5, dim=40)
    cov = ood.ledoit_wolf(x - x.mean(axis=0))
    assert np.linalg.matrix_rank(cov) == 40
    d = detector_for("mahalanobis", x, ids)
    far = np.zeros((1, 40))
    far[0, 30] = 1.0
    assert d.score(np.zeros((1, 3)), far)[0] > d.score(np.zeros((len(x), 3)), x).max()


def test_threshold_flags_at_most_the_allowed_share_of_in_scope_scores():
    scores = np.arange(200, dtype=float)
    t = ood.threshold_at(scores, 0.02)
    assert (scores > t).sum() == 4 and t == 195.0
    assert (scores > ood.threshold_at(scores, 0.0)).sum() == 0
    assert ood.threshold_at(np.zeros(0), 0.02) == np.inf


def test_auroc_counts_ties_half():
    assert ood.auroc([0, 1], [2, 3]) == 1.0
    assert ood.auroc([2, 3], [0, 1]) == 0.0
    assert ood.auroc([1, 1], [1, 1]) == 0.5
    assert ood.auroc([], [1]) is None


def test_energy_and_max_prob_rise_as_logits_flatten():
    logits = np.array([[8.0, 0, 0], [1.0, 0.5, 0]])
    for kind in ("energy", "max_prob"):
        s = ood.detector(kind, {}, temperature=2.0).score(logits, None)
        assert s[1] > s[0], kind


def test_knn_takes_the_kth_most_similar_prototype():
    prototypes = np.eye(3)
    z = np.array([[1.0, 0.0, 0.0]])
    assert knn(z, prototypes, 1)[0] == pytest.approx(0.0)
    assert knn(z, prototypes, 2)[0] == pytest.approx(1.0)


def test_policy_section_round_trips_through_json():
    x, ids, _ = clusters()
    params = ood.fit_params("mahalanobis", x, ids)
    section = out_of_scope_fields("mahalanobis", 12.5, params, {"false_rate": 0.02})
    back = read_out_of_scope({"out_of_scope": json.loads(json.dumps(section))})
    assert (back.kind, back.threshold, back.validation) == ("mahalanobis", 12.5, {"false_rate": 0.02})
    assert np.array_equal(unpack(back.params["means"]), unpack(params["means"]))
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(unpack(pack(a)), a) and unpack(pack(a)).shape == (2, 3)
    assert read_out_of_scope({}) is None
    with pytest.raises(KeyError, match="lacks projection"):
        read_out_of_scope({"out_of_scope": {"kind": "mahalanobis", "threshold": 1, "params": {}}})


def test_the_confidence_threshold_is_fitted_without_the_detectors_flags():
    # Two in-scope validation rows flagged out of scope are answered whatever the threshold;
    # their share is bounded by max_false_out_of_scope, so the fit leaves them out: the same
    # threshold (0.5, 4 of 5 right) as without them, and coverage over the rows it decides.
    confidence = [0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2]
    correct = [True, True, True, True, False, False, False]
    rules = ["confident"] * 5 + ["out_of_scope", "out_of_scope"]
    alone = cascade.fit_threshold(confidence[:5], correct[:5], rules[:5], 0.7)
    fit = cascade.fit_threshold(confidence, correct, rules, 0.7)
    assert fit == alone
    assert fit.threshold == 0.5 and fit.accuracy == pytest.approx(4 / 5) and fit.coverage == 1.0
    # Refusals still count: a wrong refusal is answered whatever the threshold.
    refused = cascade.fit_threshold(confidence[:6], correct[:6], rules[:5] + ["refusal"], 0.7)
    assert refused.threshold == 0.6 and refused.accuracy == pytest.approx(4 / 5)


IN = {"student_right": 0.90, "student_wrong": 0.03, "out_of_scope": 0.02, "teacher": 0.05}
OUT = {"student_right": 0.0, "student_wrong": 0.10, "out_of_scope": 0.80, "teacher": 0.10}


def test_cascade_at_a_share_mixes_the_two_populations():
    at0, at20 = ood.at_share(IN, OUT, 0.0), ood.at_share(IN, OUT, 0.2, teacher_cost_per_request=0.001)
    assert at0["accepted_accuracy"] == pytest.approx(0.90 / 0.95)
    right = 0.8 * 0.90 + 0.2 * 0.80
    answered = 0.8 * 0.95 + 0.2 * 0.90
    assert at20["accepted_accuracy"] == pytest.approx(right / answered)
    assert at20["escalation_rate"] == pytest.approx(0.8 * 0.05 + 0.2 * 0.10)
    assert at20["cascade_usd_per_1k"] == pytest.approx(1000 * 0.001 * at20["escalation_rate"])
    worst = ood.at_share(IN, ood.worst_case_out_of_scope(), 0.2)["accepted_accuracy"]
    assert worst == pytest.approx(0.8 * 0.90 / (0.8 * 0.95 + 0.2))


def test_the_live_share_estimate_inverts_the_out_of_scope_rate():
    for share in (0.0, 0.1, 0.35):
        rate = (1 - share) * 0.02 + share * 0.80
        assert ood.estimated_share(rate, 0.02, 0.80) == pytest.approx(share)
    assert ood.estimated_share(0.01, 0.02, 0.80) == 0.0  # below the false rate: clipped
    assert ood.estimated_share(0.5, 0.3, 0.3) is None


def test_metrics_export_the_estimated_share_and_the_accuracy_it_implies():
    validation = {"false_rate": 0.02, "recall": 0.80, "in_scope": IN, "out_of_scope": OUT}
    metrics = Metrics()
    metrics.out_of_scope = OutOfScopeEstimate.of({"out_of_scope": {"validation": validation}})
    # 100 answers of which 18 out_of_scope: r = 0.18, so share = (0.18 - 0.02) / 0.78.
    metrics.routes = Counter({"student": 70, "teacher": 12, "out_of_scope": 18})
    lines = dict(line.rsplit(" ", 1) for line in metrics.render().splitlines()
                 if not line.startswith("#"))
    share = 0.16 / 0.78
    assert float(lines["distill_out_of_scope_rate"]) == pytest.approx(0.18)
    assert float(lines['distill_out_of_scope_share_estimate{recall="validated"}']) == pytest.approx(
        share, rel=1e-5)
    assert float(lines['distill_accepted_accuracy_estimate{recall="validated"}']) == pytest.approx(
        ood.at_share(IN, OUT, share)["accepted_accuracy"], rel=1e-5)


def test_without_a_validated_recall_the_share_is_a_lower_bound():
    estimate = OutOfScopeEstimate({"false_rate": 0.02, "recall": None, "in_scope": IN,
                                   "out_of_scope": None})
    _, share, _ = estimate.estimate(Counter({"student": 80, "out_of_scope": 20}))
    assert share == pytest.approx((0.2 - 0.02) / 0.98)
    assert 'recall="assumed_1"' in "\n".join(estimate.render(Counter({"student": 1})))
    assert OutOfScopeEstimate.of({"out_of_scope": {"validation": {}}}) is None
    assert OutOfScopeEstimate.of({}) is None
