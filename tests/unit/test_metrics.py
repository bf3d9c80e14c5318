import pytest

from distill_compiler.metrics.classify import (
    classification_report,
    confused_pairs,
    per_cohort,
    per_label,
)

TARGET = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "a", "a"]
GOLD = ["a", None, "b", "b", None, "c"]
COHORT = ["log", "log", "hard_negative", "log", "hard_negative", "refusal_probe"]


def test_per_label_precision_recall_f1_support():
    table = per_label(PRED, TARGET, ["a", "b", "c", "d"])
    # a: predicted 4 times, 2 right; 3 true.
    assert table["a"] == {"precision": 0.5, "recall": pytest.approx(2 / 3),
                          "f1": pytest.approx(4 / 7), "support": 3}
    assert table["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    # c is never predicted: precision undefined, recall and F1 zero.
    assert table["c"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}
    assert table["d"] == {"precision": None, "recall": None, "f1": None, "support": 0}


def test_confused_pairs_most_frequent_first():
    pairs = confused_pairs(["b", "b", "a", "c"], ["a", "a", "b", "c"])
    assert pairs == [{"target": "a", "predicted": "b", "count": 2},
                     {"target": "b", "predicted": "a", "count": 1}]


def test_per_cohort_agreement_and_gold_accuracy():
    cohorts = per_cohort(PRED, TARGET, GOLD, COHORT)
    assert cohorts == {
        "hard_negative": {"n": 2, "agreement": 0.0, "accuracy": 1.0},
        "log": {"n": 3, "agreement": 1.0, "accuracy": 1.0},
        "refusal_probe": {"n": 1, "agreement": 0.0, "accuracy": 0.0},
    }


def test_classification_report():
    report = classification_report(PRED, TARGET, GOLD, COHORT, ["a", "b", "c"])
    assert report["n"] == 6 and report["gold_n"] == 4
    assert report["agreement"] == pytest.approx(3 / 6)
    assert report["accuracy"] == pytest.approx(3 / 4)
    assert report["macro_f1"] == pytest.approx((4 / 7 + 0.5 + 0.0) / 3)
    assert report["confused_pairs"][0] == {"target": "a", "predicted": "b", "count": 1}
    assert classification_report(PRED, TARGET, [None] * 6, COHORT, ["a"])["accuracy"] is None
