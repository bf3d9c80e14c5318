"""BANKING77-OOS: does the student know what it was not trained on?

    python benchmarks/banking77_oos.py [--workdir DIR] [--set student.epochs=2 ...]

Compiles a spec whose teacher log is banking77-oos's train.csv (50 in-scope intents, no
out-of-scope rows), then scores every out-of-distribution detector the bundle can carry on the
dataset's own files: thresholds fitted on valid.csv (in-scope) at the false out-of-scope rate
the spec allows, the detector chosen on id_oos_valid.csv, and every figure reported on test:
in-scope accuracy (test.csv), in-domain out-of-scope recall (id_oos_test.csv), out-of-domain
recall (ood_oos_valid.csv: the dataset has no OOD test file, and it is never used to fit or
choose anything here), false out-of-scope rate on in-scope test, AUROC, and the cascade's
accepted accuracy and escalation at target 0.95 when 20 % of test traffic is out of scope.
The max-softmax baseline (calibrated confidence, no detector) sits beside each figure.

Data: ../shared/datasets/banking77-oos (BANKING77, CC BY 4.0, PolyAI; OOD queries from CLINC150,
CC BY 3.0), re-split by Zhang et al. 2021; read in place, never copied.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from banking77 import label_name
from harness import (
    DATASETS,
    WORK,
    command,
    compile_spec,
    replayed_classify_spec,
    write_results,
)
from harness import write_spec as harness_write_spec  # harness also sets HF_HUB_OFFLINE

DATA = DATASETS / "banking77-oos"
TARGET_ACCURACY = 0.95
MAX_FALSE_OUT_OF_SCOPE = 0.02
OOS_SHARE = 0.20
SEED = 0


def read(name: str) -> tuple[list[str], list[str]]:
    with open(DATA / name, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [label_name(r["label"]) for r in rows]


def write_spec(workdir: Path) -> Path:
    spec = replayed_classify_spec(
        "banking77-oos", sorted(set(read("train.csv")[1])), DATA / "train.csv",
        {"target_accuracy": TARGET_ACCURACY, "max_false_out_of_scope": MAX_FALSE_OUT_OF_SCOPE,
         "expected_out_of_scope": OOS_SHARE})
    return harness_write_spec(workdir, spec,
                              "benchmarks/banking77_oos.py: banking77-oos's train.csv replayed as the teacher log")


@dataclass
class Part:
    """Dataset rows through the shipped model: texts, gold labels, logits, embeddings."""

    texts: list[str]
    gold: list[str]
    logits: np.ndarray
    embeddings: np.ndarray
    seconds: float = 0.0

    @classmethod
    def read(cls, name: str, classifier) -> Part:
        texts, gold = read(name)
        started = time.perf_counter()
        logits, embeddings = classifier.outputs(texts)
        return cls(texts, gold, logits, embeddings, time.perf_counter() - started)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> Part:
        return Part([self.texts[i] for i in idx], [self.gold[i] for i in idx],
                    self.logits[idx], self.embeddings[idx])

    @staticmethod
    def join(*parts: Part) -> Part:
        return Part([t for p in parts for t in p.texts], [g for p in parts for g in p.gold],
                    np.concatenate([p.logits for p in parts]),
                    np.concatenate([p.embeddings for p in parts]))


def decide(policy, part: Part) -> list:
    from distill_compiler.runtime.classifier import softmax

    scores = policy.scores(part.logits, part.embeddings)
    return [policy.decide(t, p, s) for t, p, s in
            zip(part.texts, softmax(part.logits, policy.temperature), scores)]


def fitted_policy(base: dict, section: dict | None, valid: Part, target: float):
    """The bundle's policy with this detector (or none) and the confidence threshold refitted
    on valid.csv's in-scope queries with it in place, as evaluate fits it."""
    from distill_compiler.metrics import cascade
    from distill_compiler.runtime.classifier import Policy

    data = {k: v for k, v in base.items() if k != "out_of_scope"}
    if section is not None:
        data["out_of_scope"] = section
    decisions = decide(Policy({**data, "threshold": 0.0}), valid)
    fit = cascade.fit_threshold([d.confidence for d in decisions],
                                [d.label == g for d, g in zip(decisions, valid.gold)],
                                [d.rule for d in decisions], target)
    return Policy({**data, "threshold": fit.threshold})


def figures(policy, test: Part, id_oos: Part, ood: Part, traffic: Part) -> dict:
    """Every reported figure for one policy, on test files (and ood_oos_valid)."""
    from distill_compiler.metrics.ood import auroc

    def flagged(part):
        return np.array([d.route == "out_of_scope" for d in decide(policy, part)])

    def score(part):
        return (np.array(policy.scores(part.logits, part.embeddings), dtype=float)
                if policy.detector is not None else None)

    in_flags = flagged(test)
    predicted = np.array([policy.labels[i] for i in test.logits.argmax(-1)])
    right = predicted == np.array(test.gold)
    s_in, s_id, s_ood = score(test), score(id_oos), score(ood)
    routed = decide(policy, traffic)
    answered = [d for d in routed if d.route != "teacher"]
    hits = sum(d.label == g for d, g in zip(routed, traffic.gold) if d.route != "teacher")
    return {
        "in_scope_accuracy": round(float(right.mean()), 4),
        "in_scope_accuracy_not_flagged": round(float((right & ~in_flags).mean()), 4),
        "false_out_of_scope_rate": round(float(in_flags.mean()), 4),
        "id_oos_recall": round(float(flagged(id_oos).mean()), 4),
        "ood_recall": round(float(flagged(ood).mean()), 4),
        "auroc_id_oos": None if s_in is None else round(auroc(s_in, s_id), 4),
        "auroc_ood": None if s_in is None else round(auroc(s_in, s_ood), 4),
        "cascade_20pct_oos": {
            "threshold": round(policy.threshold, 4),
            "accepted_accuracy": round(hits / len(answered), 4) if answered else None,
            "escalation_rate": round(1 - len(answered) / len(routed), 4),
            "out_of_scope_answers": round(sum(d.route == "out_of_scope" for d in routed)
                                          / len(routed), 4)},
    }


def traffic_mix(test: Part, id_oos: Part, ood: Part, share: float) -> Part:
    """All in-scope test queries, plus out-of-scope ones drawn (seeded) from id_oos_test and
    ood_oos_valid together so that they are `share` of the traffic."""
    pool = Part.join(id_oos, ood)
    n = round(share * len(test) / (1 - share))
    idx = np.random.default_rng(SEED).choice(len(pool), size=n, replace=False)
    return Part.join(test, pool.take(np.sort(idx)))


def candidates(bundle, train: Part, valid: Part, id_oos_valid: Part) -> dict:
    """Each detector fitted on train.csv's embeddings, its threshold on valid.csv (in-scope) at
    the allowed false rate, and its recall on id_oos_valid.csv, which chooses among them."""
    from distill_compiler.metrics import ood
    from distill_compiler.runtime.format import out_of_scope_fields

    labels = bundle.labels
    ids = np.array([labels.index(g) for g in train.gold])
    out = {}
    for kind in ood.candidate_kinds(True, len(ids)):
        started = time.perf_counter()
        params = ood.fit_params(kind, train.embeddings, ids)
        fit_seconds = time.perf_counter() - started
        d = ood.detector(kind, params, bundle.policy.temperature)
        threshold = ood.threshold_at(d.score(valid.logits, valid.embeddings), MAX_FALSE_OUT_OF_SCOPE)
        section = out_of_scope_fields(kind, threshold, params, {})
        recall = float((d.score(id_oos_valid.logits, id_oos_valid.embeddings) > threshold).mean())
        out[kind] = {"section": section, "valid_id_oos_recall": round(recall, 4),
                     "fit_seconds": round(fit_seconds, 2),
                     "policy_bytes": len(json.dumps(section)),
                     "score_ms_per_request": score_cost(d, valid)}
    return out


def score_cost(detector, part: Part, runs: int = 300) -> float:
    started = time.perf_counter()
    for i in range(runs):
        j = i % len(part)
        detector.score(part.logits[j:j + 1], part.embeddings[j:j + 1])
    return round((time.perf_counter() - started) * 1000 / runs, 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=WORK / "banking77_oos")
    parser.add_argument("--until", default=None, help="last compiler stage to run")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="spec override, as for `distill compile --set`")
    args = parser.parse_args(argv)
    compiled = compile_spec(write_spec(args.workdir), args.sets, args.until)
    if args.until:
        return

    from distill_compiler import runtime

    bundle = runtime.load_bundle(compiled.project.bundle_dir)
    report = json.loads((compiled.project.bundle_dir / "report.json").read_text())["metrics"]
    write_results(args.workdir, {"command": command("banking77_oos.py", argv),
                                 "compile_seconds": compiled.seconds, "stages": compiled.stages(),
                                 **measure(bundle, report.get("out_of_scope") or {})})


def measure(bundle, shipped: dict) -> dict:
    """Every detector and the no-detector cascade on the dataset's files, through `bundle`'s
    model; `shipped` is the bundle's own out-of-scope report (metrics.json)."""
    parts = {name: Part.read(name, bundle.classifier) for name in (
        "train.csv", "valid.csv", "test.csv", "id_oos_valid.csv", "id_oos_test.csv",
        "ood_oos_valid.csv")}
    train, valid, test = parts["train.csv"], parts["valid.csv"], parts["test.csv"]
    id_valid, id_test, ood = parts["id_oos_valid.csv"], parts["id_oos_test.csv"], parts["ood_oos_valid.csv"]
    traffic = traffic_mix(test, id_test, ood, OOS_SHARE)
    found = candidates(bundle, train, valid, id_valid)
    base = bundle.policy.data
    by_detector = {}
    for kind, c in found.items():
        policy = fitted_policy(base, c["section"], valid, TARGET_ACCURACY)
        by_detector[kind] = {**figures(policy, test, id_test, ood, traffic),
                             **{k: v for k, v in c.items() if k != "section"}}
    no_detector = figures(fitted_policy(base, None, valid, TARGET_ACCURACY), test, id_test, ood,
                          traffic)
    return {
        "rows": {name: len(p) for name, p in parts.items()},
        "encode_seconds": {name: round(p.seconds, 1) for name, p in parts.items()},
        "target_accuracy": TARGET_ACCURACY, "max_false_out_of_scope": MAX_FALSE_OUT_OF_SCOPE,
        "traffic": {"in_scope": len(test), "out_of_scope": len(traffic) - len(test),
                    "share": OOS_SHARE},
        "chosen_on_id_oos_valid": max(found, key=lambda k: found[k]["valid_id_oos_recall"]),
        "by_detector": by_detector,
        "no_detector_max_softmax_cascade": no_detector,
        "bundle_as_compiled": {
            "detector": shipped.get("detector"), "threshold": shipped.get("threshold"),
            "figures": figures(bundle.policy, test, id_test, ood, traffic),
            "policy_bytes": shipped.get("policy_bytes"),
            "score_ms_per_request": shipped.get("score_ms_per_request"),
            "expected": shipped.get("expected")},
    }


if __name__ == "__main__":
    main()
