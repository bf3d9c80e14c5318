import pytest

from distill_compiler.metrics.cascade import (
    ESCALATE_ALL,
    cascade_report,
    coverage_curve,
    fit_threshold,
)


def test_threshold_is_the_lowest_confidence_reaching_the_target():
    conf = [0.95, 0.90, 0.80, 0.70, 0.60, 0.50]
    correct = [1, 1, 1, 0, 1, 0]
    rules = ["confident"] * 6
    # Accepting down to 0.60 gives 4/5 = 0.80; down to 0.50 gives 4/6.
    fit = fit_threshold(conf, correct, rules, target_accuracy=0.8)
    assert fit.threshold == 0.60 and fit.reached
    assert fit.accuracy == pytest.approx(0.8) and fit.coverage == pytest.approx(5 / 6)
    # 0.9 is first reached only by the top three.
    assert fit_threshold(conf, correct, rules, 0.9).threshold == 0.80


def test_forced_routes_are_excluded_and_refusals_count_as_answered():
    conf = [0.99, 0.9, 0.8, 0.7]
    correct = [0, 1, 1, 0]
    # The wrong 0.99 is a trigger (already escalated); the wrong 0.7 refusal is always answered.
    rules = ["trigger", "confident", "confident", "refusal"]
    fit = fit_threshold(conf, correct, rules, target_accuracy=0.66)
    assert fit.threshold == 0.8 and fit.accuracy == pytest.approx(2 / 3)
    assert fit.coverage == pytest.approx(1.0)  # of the 3 non-forced examples
    assert not fit_threshold(conf, correct, rules, 0.7).reached


def test_ties_share_a_threshold():
    fit = fit_threshold([0.9, 0.8, 0.8], [1, 1, 0], ["confident"] * 3, 0.9)
    assert fit.threshold == 0.9 and fit.coverage == pytest.approx(1 / 3)


def test_unreachable_target_escalates_everything():
    fit = fit_threshold([0.9, 0.8], [0, 0], ["confident"] * 2, 0.5)
    assert not fit.reached and fit.threshold == ESCALATE_ALL > 1.0
    assert "no threshold reaches" in fit.explain(0.5)


def test_coverage_curve_points():
    curve = coverage_curve([0.9, 0.5, 0.2], [1, 1, 0], ["confident", "confident", "always"], steps=2)
    assert curve == [{"threshold": 0.0, "coverage": 1.0, "accuracy": 1.0},
                     {"threshold": 0.5, "coverage": 1.0, "accuracy": 1.0},
                     {"threshold": 1.0, "coverage": 0.0, "accuracy": None}]


def test_cascade_report_on_test_traffic():
    routes = ["student", "student", "teacher", "refusal", "teacher"]
    rules = ["confident", "confident", "low_confidence", "refusal", "trigger"]
    predicted = ["a", "b", "a", "r", "b"]
    target = ["a", "a", "b", "r", "b"]
    gold = ["a", "a", "a", None, None]
    agrees = [p == t for p, t in zip(predicted, target)]
    against_gold = [None if g is None else (p == g, t == g) for p, t, g in zip(predicted, target, gold)]
    report = cascade_report(routes, rules, agrees, teacher_cost_per_request=0.002, gold=against_gold)
    assert report["escalation_rate"] == pytest.approx(0.4)
    assert report["escalations_by_rule"] == {"low_confidence": 1, "trigger": 1}
    assert report["accepted_accuracy"] == pytest.approx(2 / 3)
    assert report["end_to_end_accuracy"] == pytest.approx(4 / 5)
    # Gold rows: student right, student wrong, teacher answers "b" against gold "a".
    assert report["accepted_accuracy_gold"] == pytest.approx(1 / 2)
    assert report["end_to_end_accuracy_gold"] == pytest.approx(1 / 3)
    assert report["cost"]["cascade_usd_per_1k"] == pytest.approx(0.8)
    assert report["cost"]["all_teacher_usd_per_1k"] == pytest.approx(2.0)
    unknown = cascade_report(routes, rules, agrees, None)["cost"]
    assert unknown["teacher_cost_known"] is False and unknown["all_teacher_usd_per_1k"] == 0.0
    assert unknown["teacher_calls_per_1k"] == pytest.approx(400)
