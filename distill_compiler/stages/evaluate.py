"""Measure the shipped model against the teacher and fit the cascade policy.

Dispatches by task to the student's own evaluation (students/classifier/evaluate.py or
students/causal/evaluate.py). Both run what ships through runtime/, so the thresholds they fit
are the ones the bundle applies, and both write policy.json (the one writer per student),
metrics.json and predictions.jsonl.
"""

from __future__ import annotations

VERSION = "5"  # 5: the out-of-scope detector
KIND = "evaluation"
# teacher: policy.json names where escalations go, so a new teacher is a new policy.
KEYED_ON = ("task", "description", "input", "output", "tools", "intents", "refusals", "escalation",
            "export", "teacher")
INPUTS = ("export", "curate", "generate")


def run(ctx) -> dict:
    if ctx.spec.task == "classify":
        from ..students.classifier.evaluate import (
            evaluate,  # onnxruntime loads only here
        )
    else:
        from ..students.causal.evaluate import evaluate
    return evaluate(ctx)
