"""The student/teacher cascade: fit the confidence threshold, then measure what it buys.

Before any threshold, the runtime's policy already sends some requests to the teacher (a
trigger matched, or the student predicted an always-escalate intent) and answers others with
a refusal whatever the confidence. The threshold decides only the rest ("gated" traffic).
Fitting picks the lowest threshold at which everything the student answers (gated traffic
above the threshold, plus refusals) agrees with the teacher at least `target_accuracy` of the
time. Candidate thresholds are the observed validation confidences, so the fitted threshold is
the confidence of the least confident validation example it still accepts. An `out_of_scope`
answer (the detector flagged the request) is, like a refusal, given whatever the confidence,
but the fit leaves it out: its cost on in-scope traffic is already bounded by
`escalation.max_false_out_of_scope`, and counting it against the target as well made small
specs escalate everything (on harbor-support no threshold reached 92 % agreement).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Above every possible confidence: the student answers nothing the threshold decides.
ESCALATE_ALL = math.nextafter(1.0, 2.0)
# Decision rules that escalate whatever the confidence: runtime's trigger and always-escalate,
# runtime.causal's output cut short by max_new_tokens.
FORCED_RULES = ("trigger", "always", "truncated")
# Rules the student answers whatever the confidence: a refusal's fixed response, `out_of_scope`.
ANSWERED_RULES = ("refusal", "out_of_scope")
# Answered rules the threshold is not fitted on (see the module docstring).
UNFITTED_RULES = ("out_of_scope",)
CURVE_STEPS = 50


@dataclass(frozen=True)
class ThresholdFit:
    threshold: float
    reached: bool  # False: no threshold reaches the target, everything gated escalates
    accuracy: float | None  # validation accuracy of the accepted traffic at the threshold
    coverage: float | None  # share of non-forced validation traffic the student answers

    def explain(self, target: float) -> str:
        if self.reached:
            return (f"threshold {self.threshold:.3f} answers {self.coverage:.1%} of non-forced "
                    f"validation traffic at {self.accuracy:.1%} agreement (target {target:.1%})")
        return (f"no threshold reaches {target:.1%} agreement on validation: every request the "
                "threshold decides goes to the teacher")


def accepted(confidence: np.ndarray, rules: np.ndarray, threshold: float) -> np.ndarray:
    """Which requests the student answers at `threshold`: refusals plus confident gated ones."""
    return np.isin(rules, ANSWERED_RULES) | (~np.isin(rules, FORCED_RULES + ANSWERED_RULES)
                                             & (confidence >= threshold))


def fit_threshold(confidence, correct, rules, target_accuracy: float) -> ThresholdFit:
    """The lowest threshold whose accepted validation traffic reaches `target_accuracy`.

    `rules` is each example's runtime rule before any threshold (trigger, always, refusal,
    out_of_scope or confident); `correct` says whether the student's label equals the teacher's.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    rules = np.asarray(rules, dtype=object)
    refusal = np.isin(rules, ANSWERED_RULES) & ~np.isin(rules, UNFITTED_RULES)
    gated = ~np.isin(rules, FORCED_RULES + ANSWERED_RULES)
    non_forced = int(refusal.sum() + gated.sum())
    if not gated.any():
        return ThresholdFit(ESCALATE_ALL, False, None, None)
    order = np.argsort(-confidence[gated], kind="stable")
    conf = confidence[gated][order]
    hits = np.cumsum(correct[gated][order]) + correct[refusal].sum()
    counts = np.arange(1, len(conf) + 1) + refusal.sum()
    accuracy = hits / counts
    # Ties share one threshold: only the last position of each run of equal confidences counts.
    run_ends = np.append(conf[1:] != conf[:-1], True)
    ok = np.flatnonzero(run_ends & (accuracy >= target_accuracy - 1e-12))
    if len(ok) == 0:
        return ThresholdFit(ESCALATE_ALL, False, None, None)
    i = ok[-1]  # the lowest confidence that still reaches the target
    return ThresholdFit(float(conf[i]), True, float(accuracy[i]), float(counts[i] / non_forced))


def coverage_curve(confidence, correct, rules, steps: int = CURVE_STEPS) -> list[dict]:
    """Coverage (share of non-forced traffic answered) and accepted accuracy per threshold."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    rules = np.asarray(rules, dtype=object)
    non_forced = int((~np.isin(rules, FORCED_RULES)).sum())
    points = []
    for threshold in np.linspace(0.0, 1.0, steps + 1):
        mask = accepted(confidence, rules, threshold)
        n = int(mask.sum())
        points.append({"threshold": round(float(threshold), 4),
                       "coverage": n / non_forced if non_forced else None,
                       "accuracy": float(correct[mask].mean()) if n else None})
    return points


def cascade_report(routes, rules, agrees, teacher_cost_per_request: float | None,
                   gold=None) -> dict:
    """What the fitted policy does to test traffic: escalation, accuracy and cost, for either
    student. `agrees[i]`: the student's answer equals the teacher's. `gold[i]`, where records
    carry gold: (student right, teacher right) against it, else None.

    An escalated request is answered by the teacher, so it counts as agreeing with the
    teacher, and as right against gold when the teacher was.
    """
    n = len(routes)
    gold = gold if gold is not None else [None] * n
    student = [r != "teacher" for r in routes]
    answered = [i for i in range(n) if student[i]]
    accepted_hits = sum(bool(agrees[i]) for i in answered)
    with_gold = [i for i in range(n) if gold[i] is not None]
    gold_hits = sum(gold[i][0] if student[i] else gold[i][1] for i in with_gold)
    accepted_gold = [i for i in with_gold if student[i]]
    escalated = n - len(answered)
    escalation_rate = escalated / n if n else None
    known = teacher_cost_per_request is not None
    per_request = teacher_cost_per_request or 0.0
    return {
        "n": n,
        "escalation_rate": escalation_rate,
        "routes": dict(sorted(Counter(routes).items())),
        "escalations_by_rule": dict(sorted(Counter(
            rule for rule, route in zip(rules, routes) if route == "teacher").items())),
        "accepted_accuracy": accepted_hits / len(answered) if answered else None,
        "accepted_accuracy_gold": (sum(gold[i][0] for i in accepted_gold) / len(accepted_gold)
                                   if accepted_gold else None),
        "end_to_end_accuracy": (accepted_hits + escalated) / n if n else None,
        "end_to_end_accuracy_gold": gold_hits / len(with_gold) if with_gold else None,
        "cost": {
            "teacher_cost_per_request_usd": per_request,
            "teacher_cost_known": known,
            "teacher_calls_per_1k": 1000 * escalation_rate if n else None,
            "cascade_usd_per_1k": 1000 * per_request * escalation_rate if n else None,
            "all_teacher_usd_per_1k": 1000 * per_request,
        },
    }


def teacher_cost_per_request(stats_path: Path) -> float | None:
    """Mean cost of one paid teacher request; None when generate paid for none (replayed logs)."""
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        return None
    requests, cost = stats.get("requests") or 0, stats.get("cost_usd") or 0.0
    return cost / requests if requests and cost else None
