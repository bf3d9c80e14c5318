"""Evaluate a classifier student and fit its cascade, on what ships.

Everything runs on export's model.onnx (quantized) and tokenizer.json, loaded through
runtime.classifier.OnnxClassifier and routed by runtime.classifier.Policy. The temperature is
fitted on validation logits; the out-of-scope detector on the training embeddings of the
in-scope intents, its threshold on in-scope validation scores (at most
`escalation.max_false_out_of_scope` flagged); the confidence threshold on in-scope validation
confidences after calibration, with the detector in place. Every figure reported is then
measured on test with the policy the bundle will apply.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from ...data.records import read_jsonl, write_jsonl
from ...metrics import calibration, cascade, ood
from ...metrics import classify as metrics
from ...runtime.classifier import OnnxClassifier, Policy, softmax
from ...runtime.format import (
    CLASSIFY_POLICY_FORMAT,
    POLICY_FILE,
    input_text,
    out_of_scope_fields,
    routing_fields,
    text_field_of,
    write_policy,
)
from ...spec.models import OUT_OF_SCOPE

LATENCY_RUNS = 200
LATENCY_WARMUP = 10
# The detector when there are no out-of-scope examples to choose by: the one that did best on
# banking77-oos's in-domain out-of-scope validation queries (benchmarks/RESULTS.md).
DEFAULT_DETECTOR = "mahalanobis"
# Fewer out-of-scope validation queries than this say too little to choose a detector by (one
# query's recall is 0 or 1); the default is kept, and without the embedding output none ships:
# energy or max-prob chosen blind would only duplicate the confidence threshold.
MIN_OUT_OF_SCOPE_TO_CHOOSE = 20


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
    train = (Split.score(list(read_jsonl(curate / "train.jsonl")), classifier, labels, text_field,
                         embeddings_only=True)
             if classifier.has_embedding and (curate / "train.jsonl").is_file() else None)
    choice = choose_detector(train, val, temperature, spec.escalation.max_false_out_of_scope)
    ctx.log(f"evaluate: temperature {temperature:.3f}; {choice.explain()}")
    unthresholded = Policy(policy_dict(spec, labels, text_field, temperature, 0.0, choice.section()))
    val_decisions = val.decide(unthresholded)
    target = spec.escalation.target_accuracy
    # In-scope queries only: how many out-of-scope rows validation holds must not move it.
    inside = val.in_scope
    fit = cascade.fit_threshold([d.confidence for d, i in zip(val_decisions, inside) if i],
                                [c for c, i in zip(val.correct(val_decisions), inside) if i],
                                [d.rule for d, i in zip(val_decisions, inside) if i], target)
    ctx.log(f"evaluate: {fit.explain(target)}")
    thresholded = Policy(policy_dict(spec, labels, text_field, temperature, fit.threshold,
                                     choice.section()))
    validation = val.outcomes(val.decide(thresholded))
    policy_data = policy_dict(spec, labels, text_field, temperature, fit.threshold,
                              choice.section(validation))
    test_decisions = test.decide(Policy(policy_data))

    teacher_cost = cascade.teacher_cost_per_request(ctx.inputs["generate"].path / "stats.json")
    latency = measure_latency(classifier, test.texts or val.texts)
    report = {
        "n": {"val": len(val), "test": len(test)},
        "labels": labels,
        "val": {"agreement": metrics.agreement(val.student_labels(labels), val.targets)},
        "test": {**metrics.classification_report(test.student_labels(labels), test.targets,
                                                 test.gold, test.cohorts, labels),
                 "confusion": confusion(test.student_labels(labels), test.targets, labels)},
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
        "out_of_scope": out_of_scope_report(choice, validation, test, test_decisions,
                                            Policy(policy_data), spec.escalation, teacher_cost),
    }
    write_policy(ctx.out / POLICY_FILE, policy_data)
    (ctx.out / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    write_jsonl(ctx.out / "predictions.jsonl", test.predictions(test_decisions))
    return summarize(report)


class Split:
    """One split's records, the texts the runtime reads, and the shipped model's logits and
    pooled embeddings (None when the graph has no embedding output)."""

    def __init__(self, records: list[dict], texts: list[str], logits: np.ndarray,
                 embeddings: np.ndarray | None, labels: list[str]):
        self.records, self.texts, self.logits, self.embeddings = records, texts, logits, embeddings
        self.targets = [r["target"] for r in records]
        self.gold = [r.get("gold") for r in records]
        self.cohorts = [r.get("cohort") or "unknown" for r in records]
        index = {label: i for i, label in enumerate(labels)}
        # A teacher label the student has no class for cannot be fitted on, only counted wrong.
        self.target_ids = np.array([index.get(t, -1) for t in self.targets], dtype=np.int64)
        self.known = self.target_ids >= 0
        self.in_scope = np.array([t != OUT_OF_SCOPE for t in self.targets], dtype=bool)

    @classmethod
    def score(cls, records: list[dict], classifier, labels: list[str], text_field: str | None,
              embeddings_only: bool = False) -> "Split":
        """The split through the shipped model; `embeddings_only` keeps the in-scope rows of
        known labels (what the detector is fitted on)."""
        if embeddings_only:
            records = [r for r in records if r["target"] in labels and r["target"] != OUT_OF_SCOPE]
        texts = [input_text(r["input"], text_field) for r in records]
        if texts:
            logits, embeddings = classifier.outputs(texts)
        else:
            logits, embeddings = np.zeros((0, len(labels))), None
        return cls(records, texts, logits, embeddings, labels)

    def __len__(self) -> int:
        return len(self.records)

    def probs(self, temperature: float) -> np.ndarray:
        return softmax(self.logits, temperature)

    def student_labels(self, labels: list[str]) -> list[str]:
        """The student's own label for each row (argmax), whatever route the policy takes."""
        return [labels[i] for i in self.logits.argmax(-1)] if len(self) else []

    def decide(self, policy) -> list:
        scores = policy.scores(self.logits, self.embeddings)
        return [policy.decide(text, p, score)
                for text, p, score in zip(self.texts, self.probs(policy.temperature), scores)]

    def outcomes(self, decisions) -> dict:
        """ood.outcomes of the in-scope and the out-of-scope rows (None when there are none)."""
        correct = self.correct(decisions)
        routes = [d.route for d in decisions]
        return {side: ood.outcomes([r for r, i in zip(routes, self.in_scope) if i == want],
                                   [c for c, i in zip(correct, self.in_scope) if i == want])
                for side, want in (("in_scope", True), ("out_of_scope", False))}

    def correct(self, decisions) -> list[bool]:
        return [d.label == t for d, t in zip(decisions, self.targets)]

    def gold_correct(self, decisions) -> list[tuple[bool, bool] | None]:
        """(student right, teacher right) against gold, where the record has gold."""
        return [None if g is None else (d.label == g, t == g)
                for d, t, g in zip(decisions, self.targets, self.gold)]

    def predictions(self, decisions) -> list[dict]:
        return [{"id": r["id"], "target": r["target"], "gold": r.get("gold"),
                 "cohort": r.get("cohort"), "predicted": d.label,
                 "confidence": round(d.confidence, 6), "route": d.route, "reason": d.reason,
                 "out_of_scope_score": None if d.score is None else round(d.score, 6)}
                for r, d in zip(self.records, decisions)]


def policy_dict(spec, labels: list[str], text_field: str | None, temperature: float,
                threshold: float, out_of_scope: dict | None = None) -> dict:
    """policy.json of a classify bundle: everything runtime.classifier.Policy applies to a request."""
    detector = {} if out_of_scope is None else {"out_of_scope": out_of_scope}
    return {
        "format": CLASSIFY_POLICY_FORMAT,
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
        **detector,
    }


# --------------------------------------------------------------------------- out of scope

class DetectorChoice:
    """Every candidate detector measured on validation, and the one the bundle ships."""

    def __init__(self, candidates: dict, kind: str | None, why: str, max_false: float):
        self.candidates, self.kind, self.why, self.max_false = candidates, kind, why, max_false

    def section(self, validation: dict | None = None) -> dict | None:
        """policy.json's `out_of_scope`, with the validated figures once they are measured."""
        if self.kind is None:
            return None
        c = self.candidates[self.kind]
        figures = {}
        if validation is not None:
            inside, outside = validation["in_scope"], validation["out_of_scope"]
            figures = {"false_rate": inside["out_of_scope"] if inside else None,
                       "recall": outside["out_of_scope"] if outside else None,
                       "in_scope": inside, "out_of_scope": outside}
        return out_of_scope_fields(self.kind, c["threshold"], c["params"], figures)

    def explain(self) -> str:
        if self.kind is None:
            return f"no out-of-scope detector ({self.why})"
        c = self.candidates[self.kind]
        recall = "" if c["recall"] is None else f", out-of-scope recall {c['recall']:.1%}"
        return (f"out-of-scope detector {self.kind} ({self.why}): threshold {c['threshold']:.4g} "
                f"flags {c['false_rate']:.1%} of in-scope validation{recall}")


def choose_detector(train, val: Split, temperature: float, max_false: float) -> DetectorChoice:
    """Fit each candidate on the training embeddings, set its threshold on in-scope validation,
    and pick by out-of-scope recall when validation holds out-of-scope rows (else the default)."""
    inside = val.in_scope
    if not inside.any():
        return DetectorChoice({}, None, "no in-scope validation queries to fit a threshold on",
                              max_false)
    has_embedding = train is not None and val.embeddings is not None
    class_ids = train.target_ids if train is not None else np.zeros(0, dtype=np.int64)
    candidates = {}
    for kind in ood.candidate_kinds(has_embedding, len(class_ids)):
        params = ood.fit_params(kind, train.embeddings if has_embedding else None, class_ids)
        scores = ood.detector(kind, params, temperature).score(val.logits, val.embeddings)
        threshold = ood.threshold_at(scores[inside], max_false)
        outside = scores[~inside]
        candidates[kind] = {
            "params": params, "threshold": threshold,
            "false_rate": float((scores[inside] > threshold).mean()),
            "recall": float((outside > threshold).mean()) if len(outside) else None,
            "auroc": ood.auroc(scores[inside], outside)}
    n_out = int((~inside).sum())
    if n_out >= MIN_OUT_OF_SCOPE_TO_CHOOSE:
        kind = max(candidates, key=lambda k: (candidates[k]["recall"], candidates[k]["auroc"]))
        why = f"best recall on {n_out} out-of-scope validation queries"
    elif DEFAULT_DETECTOR in candidates:
        kind, why = DEFAULT_DETECTOR, (f"the default: {n_out} out-of-scope validation queries "
                                       f"(< {MIN_OUT_OF_SCOPE_TO_CHOOSE}) to choose by")
    else:
        kind, why = None, "the model has no embedding output and too few out-of-scope examples"
    return DetectorChoice(candidates, kind, why, max_false)


def out_of_scope_report(choice: DetectorChoice, validation: dict, test: Split, decisions: list,
                        policy: Policy, escalation, teacher_cost: float | None) -> dict:
    """The detector's figures on validation and test, its size and cost, and the cascade
    projected onto out-of-scope shares (measured out-of-scope outcomes, or the worst case)."""
    section = policy.data.get("out_of_scope")
    candidates = {k: {m: v for m, v in c.items() if m != "params"}
                  for k, c in choice.candidates.items()}
    inside = validation["in_scope"]
    outside = validation["out_of_scope"]
    basis = "measured" if outside else "worst_case"
    outside = outside or ood.worst_case_out_of_scope()
    report = {
        "detector": choice.kind, "why": choice.why, "max_false_out_of_scope": choice.max_false,
        "threshold": section["threshold"] if section else None, "candidates": candidates,
        "val": validation, "test": test_figures(test, decisions),
        "policy_bytes": len(json.dumps(section)) if section else 0,
        "score_ms_per_request": score_cost(policy, test) if section else None,
        "projection_basis": basis, "curve": [], "expected": None,
    }
    if inside is not None:
        report["curve"] = [ood.at_share(inside, outside, s, teacher_cost) for s in ood.CURVE_SHARES]
        if escalation.expected_out_of_scope is not None:
            report["expected"] = ood.at_share(inside, outside, escalation.expected_out_of_scope,
                                              teacher_cost)
    return report


def test_figures(test: Split, decisions: list) -> dict:
    flagged = np.array([d.route == "out_of_scope" for d in decisions], dtype=bool)
    scores = np.array([np.nan if d.score is None else d.score for d in decisions], dtype=float)
    inside = test.in_scope
    has_scores = len(scores) and not np.isnan(scores).any()
    cohorts = np.array(test.cohorts, dtype=object)
    # Near-domain probes, far ones and logged out-of-scope rows are different difficulties: one
    # recall over all of them says little about the near ones, which are the hard part.
    by_cohort = {str(c): float(flagged[~inside & (cohorts == c)].mean())
                 for c in sorted(set(cohorts[~inside]))}
    return {"n_in_scope": int(inside.sum()), "n_out_of_scope": int((~inside).sum()),
            "false_rate": float(flagged[inside].mean()) if inside.any() else None,
            "recall": float(flagged[~inside].mean()) if (~inside).any() else None,
            "recall_by_cohort": by_cohort,
            "auroc": ood.auroc(scores[inside], scores[~inside]) if has_scores else None}


def score_cost(policy: Policy, split: Split, runs: int = 200) -> float | None:
    """Mean milliseconds the detector adds to one request (numpy, after the model has run)."""
    if not len(split):
        return None
    started = time.perf_counter()
    for i in range(runs):
        j = i % len(split)
        emb = None if split.embeddings is None else split.embeddings[j:j + 1]
        policy.scores(split.logits[j:j + 1], emb)
    return (time.perf_counter() - started) * 1000 / runs


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
