"""Evaluate a classifier student and fit its cascade, on what ships.

Everything runs on export's model.onnx (quantized) and tokenizer.json, loaded through
runtime.classifier.OnnxClassifier and routed by runtime.classifier.Policy. The temperature is
fitted on validation logits, the threshold on validation confidences after calibration, and
every figure reported is then measured on test with the policy the bundle will apply.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from ...data.records import read_jsonl, write_jsonl
from ...metrics import calibration, cascade
from ...metrics import classify as metrics
from ...runtime.classifier import OnnxClassifier, Policy, softmax
from ...runtime.format import (
    POLICY_FILE,
    POLICY_FORMAT,
    input_text,
    routing_fields,
    text_field_of,
    write_policy,
)
from ...spec.models import OUT_OF_SCOPE

LATENCY_RUNS = 200
LATENCY_WARMUP = 10



def evaluate(ctx) -> dict:
    spec = ctx.spec

    export, curate = ctx.inputs["export"].path, ctx.inputs["curate"].path
    labels = json.loads((export / "labels.json").read_text())
    text_field = text_field_of(spec.input.schema_)
    classifier = OnnxClassifier(export / "model.onnx", export / "tokenizer.json",
                                spec.export.max_length)
    val = Split.score(list(read_jsonl(curate / "val.jsonl")), classifier, labels, text_field)
    test = Split.score(list(read_jsonl(curate / "test.jsonl")), classifier, labels, text_field)
    ctx.log(f"evaluate: {len(val)} validation and {len(test)} test examples, {len(labels)} labels")

    temperature = calibration.fit_temperature(val.logits[val.known], val.target_ids[val.known])
    unthresholded = Policy(policy_dict(spec, labels, text_field, temperature, threshold=0.0))
    val_decisions = val.decide(unthresholded)
    target = spec.escalation.target_accuracy
    fit = cascade.fit_threshold([d.confidence for d in val_decisions], val.correct(val_decisions),
                                [d.rule for d in val_decisions], target)
    ctx.log(f"evaluate: temperature {temperature:.3f}; {fit.explain(target)}")
    policy_data = policy_dict(spec, labels, text_field, temperature, fit.threshold)
    test_decisions = test.decide(Policy(policy_data))

    teacher_cost = cascade.teacher_cost_per_request(ctx.inputs["generate"].path / "stats.json")
    latency = measure_latency(classifier, test.texts or val.texts)
    report = {
        "n": {"val": len(val), "test": len(test)},
        "labels": labels,
        "val": {"agreement": metrics.agreement([d.label for d in val_decisions], val.targets)},
        "test": {**metrics.classification_report([d.label for d in test_decisions], test.targets,
                                                 test.gold, test.cohorts, labels),
                 "confusion": confusion([d.label for d in test_decisions], test.targets, labels)},
        "calibration": calibration_report(val, test, temperature),
        "cascade": {
            "target_accuracy": target, "threshold": fit.threshold, "reached": fit.reached,
            "explanation": fit.explain(target), "val_accepted_accuracy": fit.accuracy,
            "val_coverage": fit.coverage,
            "val_curve": cascade.coverage_curve([d.confidence for d in val_decisions],
                                                val.correct(val_decisions),
                                                [d.rule for d in val_decisions]),
            "test": cascade.cascade_report(
                [d.route for d in test_decisions], [d.rule for d in test_decisions],
                test.correct(test_decisions), teacher_cost, test.gold_correct(test_decisions)),
        },
        "latency": latency,
    }
    write_policy(ctx.out / POLICY_FILE, policy_data)
    (ctx.out / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    write_jsonl(ctx.out / "predictions.jsonl", test.predictions(test_decisions))
    return summarize(report)


class Split:
    """One split's records, the texts the runtime reads, and the shipped model's logits."""

    def __init__(self, records: list[dict], texts: list[str], logits: np.ndarray, labels: list[str]):
        self.records, self.texts, self.logits = records, texts, logits
        self.targets = [r["target"] for r in records]
        self.gold = [r.get("gold") for r in records]
        self.cohorts = [r.get("cohort") or "unknown" for r in records]
        index = {label: i for i, label in enumerate(labels)}
        # A teacher label the student has no class for cannot be fitted on, only counted wrong.
        self.target_ids = np.array([index.get(t, -1) for t in self.targets], dtype=np.int64)
        self.known = self.target_ids >= 0

    @classmethod
    def score(cls, records: list[dict], classifier, labels: list[str],
              text_field: str | None) -> "Split":
        texts = [input_text(r["input"], text_field) for r in records]
        logits = classifier.logits(texts) if texts else np.zeros((0, len(labels)))
        return cls(records, texts, logits, labels)

    def __len__(self) -> int:
        return len(self.records)

    def probs(self, temperature: float) -> np.ndarray:
        return softmax(self.logits, temperature)

    def decide(self, policy) -> list:
        return [policy.decide(text, p)
                for text, p in zip(self.texts, self.probs(policy.temperature))]

    def correct(self, decisions) -> list[bool]:
        return [d.label == t for d, t in zip(decisions, self.targets)]

    def gold_correct(self, decisions) -> list[tuple[bool, bool] | None]:
        """(student right, teacher right) against gold, where the record has gold."""
        return [None if g is None else (d.label == g, t == g)
                for d, t, g in zip(decisions, self.targets, self.gold)]

    def predictions(self, decisions) -> list[dict]:
        return [{"id": r["id"], "target": r["target"], "gold": r.get("gold"),
                 "cohort": r.get("cohort"), "predicted": d.label,
                 "confidence": round(d.confidence, 6), "route": d.route, "reason": d.reason}
                for r, d in zip(self.records, decisions)]


def policy_dict(spec, labels: list[str], text_field: str | None, temperature: float,
                threshold: float) -> dict:
    """policy.json of a classify bundle: everything runtime.classifier.Policy applies to a request."""
    return {
        "format": POLICY_FORMAT,
        "task": spec.task,
        "labels": labels,
        "input_schema": spec.input.schema_,
        "text_field": text_field,
        "max_length": spec.export.max_length,
        "temperature": temperature,
        "threshold": threshold,
        "always_escalate": list(spec.escalation.always),
        **routing_fields(spec.escalation, spec.refusals, spec.teacher),
        "out_of_scope_label": OUT_OF_SCOPE,
    }


def calibration_report(val: Split, test: Split, temperature: float) -> dict:
    """ECE and reliability bins on test before (T = 1) and after temperature scaling."""
    out = {"temperature": temperature, "bins": calibration.ECE_BINS,
           "val_nll_before": None, "val_nll_after": None}
    if val.known.any():
        logits, ids = val.logits[val.known], val.target_ids[val.known]
        out["val_nll_before"] = calibration.nll(logits, ids, 1.0)
        out["val_nll_after"] = calibration.nll(logits, ids, temperature)
    correct = test.target_ids == (test.logits.argmax(-1) if len(test) else np.zeros(0))
    for name, t in (("before", 1.0), ("after", temperature)):
        confidence = test.probs(t).max(-1) if len(test) else np.zeros(0)
        out[f"ece_{name}"] = calibration.expected_calibration_error(confidence, correct)
        out[f"reliability_{name}"] = calibration.reliability_bins(confidence, correct)
    return out


def confusion(predicted: list[str], target: list[str], labels: list[str]) -> dict:
    """Counts of (teacher label, student label) on test; rows follow `labels`, then any teacher
    label the student has no class for, so every test example is counted once."""
    rows = labels + sorted(set(target) - set(labels))
    row_of = {label: i for i, label in enumerate(rows)}
    col_of = {label: j for j, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in rows]
    for p, t in zip(predicted, target):
        counts[row_of[t]][col_of[p]] += 1
    return {"rows": rows, "columns": list(labels), "counts": counts}


def measure_latency(classifier, texts: list[str], runs: int = LATENCY_RUNS) -> dict:
    """Batch-1 wall time of tokenize + model over test texts, as a service would call it."""
    if not texts:
        return {"batch": 1, "runs": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None,
                "samples_ms": []}
    for i in range(LATENCY_WARMUP):
        classifier.logits([texts[i % len(texts)]])
    times = []
    for i in range(runs):
        start = time.perf_counter()
        classifier.logits([texts[i % len(texts)]])
        times.append((time.perf_counter() - start) * 1000)
    p50, p99 = np.percentile(times, [50, 99])
    return {"batch": 1, "runs": runs, "p50_ms": float(p50), "p99_ms": float(p99),
            "mean_ms": statistics.fmean(times), "samples_ms": [round(t, 3) for t in times]}


def summarize(report: dict) -> dict:
    test, cal, cas = report["test"], report["calibration"], report["cascade"]
    values = {
        "agreement": test["agreement"], "accuracy": test["accuracy"],
        "escalation_rate": cas["test"]["escalation_rate"],
        "accepted_accuracy": cas["test"]["accepted_accuracy"],
        "ece_before": cal["ece_before"], "ece_after": cal["ece_after"],
        "threshold": cas["threshold"],
        "latency_p50_ms": report["latency"]["p50_ms"], "latency_p99_ms": report["latency"]["p99_ms"],
    }
    return {k: None if v is None else round(v, 4) for k, v in values.items()}
