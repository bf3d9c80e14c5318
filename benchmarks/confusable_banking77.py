"""Confusable intents found automatically, and rounds on the student's failures, on banking77:
what hard negatives for the found pairs and failure rounds add, against as many random examples.

    python benchmarks/confusable_banking77.py [--logged 2000] [--pairs 10] [--hard-negatives 40]
                                              [--rounds 2] [--round-size 200] [--workdir DIR]
                                              [--set student.epochs=3 ...]

banking77's train.csv is split, seeded, into a recorded log of `--logged` labelled rows (what the
compiler is given) and a reserve. The teacher is a stand-in on loopback (tests/teacher_server.py,
the test double at the API boundary) that labels every message with its dataset label and,
asked to write messages, returns real ones from the reserve: for a hard negative ("belongs to A
but could be mistaken for B") the reserve's A messages nearest to B's centroid; for a failure
cluster ("messages like these that want A") the A messages nearest to the quoted failures.
So every example the compiler adds is a real banking77 message with its real label, chosen by
what the compiler asked for. Four compiles, the same recipe, in one run:
1. `logged`: the log alone;
2. `random`: the log plus as many reserve rows at random as 3 adds (the control);
3. `pairs`: the log plus hard negatives for the `--pairs` intent pairs found nearest in
   embedding space (`data.confusable_pairs`);
4. `rounds`: the log plus `--rounds` failure rounds (`data.rounds`).
Reported on banking77's test.csv, which the compiler never sees: int8 accuracy (the model's
argmax), the pairs found, and for each found pair the test accuracy on its two intents and the
number of test messages of one it labels as the other, before (1) and after (3); the pairs the
logged-only student confuses most on test, and how many of them the embedding found.
Data: ../shared/datasets/banking77 (CC BY 4.0, PolyAI), read in place.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import sys
import threading
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from banking77 import DATA, TARGET_ACCURACY, label_name, read_test
from harness import (
    ROOT,
    WORK,
    command,
    compile_spec,
    replayed_classify_spec,
    write_results,
)
from harness import write_spec as harness_write_spec

sys.path.insert(0, str(ROOT / "tests"))
from teacher_server import FakeTeacher  # the stand-in teacher, at the API boundary only

HARD_NEGATIVE = re.compile(r'truly belong to "(\w+)".*?mistake for "(\w+)"', re.DOTALL)
FAILURE_CLUSTER = re.compile(r'These messages want "(\w+)".*?mistakes them for "(\w+)"', re.DOTALL)
BATCH_NUMBER = re.compile(r"This is batch (\d+)\.")
FAILURE_NEAR_MISS = re.compile(r"This is batch failure round (\d+), \d+\.")
FAILURE_ROUND = re.compile(r"This is round (\d+), batch \d+\.")
PAIR_BATCHES = 4  # slices the pairs' hard negatives may use: --hard-negatives up to 80


class ReserveTeacher(FakeTeacher):
    """Labels by the dataset; writes by retrieving real reserve messages (see the docstring)."""

    def __init__(self, gold: dict[str, str], reserve: list[tuple[str, str]], encoder,
                 cache_root: Path, port: int):
        super().__init__(port=port)
        self.gold = gold
        self.texts = [t for t, _ in reserve]
        self.labels = np.array([label for _, label in reserve])
        self.x = encoder.encode_cached(self.texts, cache_root)
        self.centroids = {label: self._unit(self.x[self.labels == label].mean(axis=0))
                          for label in set(self.labels)}
        self.encoder, self.lock = encoder, threading.Lock()
        self.written: Counter[str] = Counter()  # messages written per template

    @staticmethod
    def _unit(v: np.ndarray) -> np.ndarray:
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def label(self, text: str, labels: list[str]) -> str:
        return self.gold.get(text.strip(), "out_of_scope")

    def _sentences(self, messages: list[dict], schema: dict) -> list[str]:
        n = schema["properties"]["items"].get("maxItems", 10)
        prompt = "\n".join(str(m.get("content")) for m in messages)
        if found := FAILURE_CLUSTER.search(prompt):
            target, _ = found.groups()
            quoted = [line[2:] for line in prompt.splitlines() if line.startswith("- ")]
            with self.lock:  # one encoder, many server threads
                near = self._unit(self.encoder.encode(quoted).mean(axis=0))
            kind = "failure_cluster"
        elif found := HARD_NEGATIVE.search(prompt):
            target, other = found.groups()
            near, kind = self.centroids[other], "hard_negative"
        else:
            raise ValueError("the stand-in writes hard negatives and failure clusters only")
        mine = np.flatnonzero(self.labels == target)
        ranked = mine[np.argsort(-(self.x[mine] @ near), kind="stable")]
        start = n * self._offset(prompt)
        picked = [self.texts[i] for i in ranked[start:start + n]]
        with self.lock:
            self.written[kind] += len(picked)
        # The writer always returns n items, as the request's schema demands; when the reserve
        # runs out for an intent, the last ones repeat and curate drops them as duplicates.
        return (picked * n)[:n] if picked else [self.texts[ranked[0]]] * n

    @staticmethod
    def _offset(prompt: str) -> int:
        """Which slice of the ranking a request gets, so that requests differ: a hard
        negative's batch; a failure cluster's round (its ranking is its own); a failure
        round's near-miss (ranked like a pair's hard negatives) past the pairs' batches."""
        if found := BATCH_NUMBER.search(prompt):
            return int(found.group(1))
        if found := FAILURE_NEAR_MISS.search(prompt):
            return PAIR_BATCHES + int(found.group(1))
        if found := FAILURE_ROUND.search(prompt):
            return int(found.group(1))
        return 0


def read_train() -> list[tuple[str, str]]:
    with open(DATA / "train.csv", newline="", encoding="utf-8") as f:
        return [(r["text"].strip(), label_name(r["category"])) for r in csv.DictReader(f)]


def write_log(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows(rows)
    return path


def spec_for(workdir: Path, name: str, log: Path, api_base: str, data: dict) -> Path:
    categories = json.loads((DATA / "categories.json").read_text())
    spec = replayed_classify_spec(name, [label_name(c) for c in categories], log,
                                  {"target_accuracy": TARGET_ACCURACY})
    spec["teacher"] = {"model": "openai/banking77-stand-in", "api_base": api_base,
                       "soft_labels": "none", "max_concurrency": 16, "logs": [str(log)]}
    spec["data"].update(registers=["formal"], **data)
    spec["export"]["min_parity"] = 0.95  # int8 accuracy is measured on test directly
    return harness_write_spec(workdir, spec, "benchmarks/confusable_banking77.py")


def pair_figures(pairs: list[list[str]], predicted: list[str], gold: list[str]) -> list[dict]:
    out = []
    for a, b in pairs:
        rows = [i for i, g in enumerate(gold) if g in (a, b)]
        crossed = sum(1 for i in rows if {gold[i], predicted[i]} == {a, b})
        out.append({"pair": [a, b], "test_rows": len(rows),
                    "accuracy": round(float(np.mean([predicted[i] == gold[i] for i in rows])), 4),
                    "confused": crossed})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=WORK / "confusable_banking77")
    parser.add_argument("--logged", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--hard-negatives", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-size", type=int, default=200)
    parser.add_argument("--port", type=int, default=18078)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="spec override, as for `distill compile --set`")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    from distill_compiler import runtime
    from distill_compiler.data.embeddings import SentenceEncoder

    gold_train: dict[str, str] = {}
    for text, label in read_train():
        gold_train.setdefault(text, label)  # a message repeated with another label: the first
    rows = list(gold_train.items())
    random.Random(args.seed).shuffle(rows)
    logged, reserve = rows[:args.logged], rows[args.logged:]
    log = write_log(args.workdir / "logged.csv", logged)
    texts, gold = read_test()
    encoder = SentenceEncoder("minilm-l6", args.workdir)
    results: dict = {"command": command("confusable_banking77.py", argv), "logged": len(logged),
                     "reserve": len(reserve), "test_rows": len(texts), "runs": {}}
    with ReserveTeacher(gold_train, reserve, encoder, args.workdir, args.port) as teacher:
        plans = {
            "logged": {},
            "pairs": {"confusable_pairs": args.pairs, "hard_negatives": args.hard_negatives},
            "rounds": {"rounds": args.rounds, "round_size": args.round_size, "min_gain": 0.0},
        }
        predictions: dict[str, list[str]] = {}
        for name, data in plans.items():
            results["runs"][name] = run_one(args, name, log, teacher, data, texts, gold, runtime,
                                            predictions)
            write_results(args.workdir, results)
        # The control: as many reserve rows at random as the pairs run added.
        added = results["runs"]["pairs"]["added_examples"]
        control = write_log(args.workdir / "logged_random.csv", logged + reserve[:added])
        results["runs"]["random"] = run_one(args, "random", control, teacher, {}, texts, gold,
                                            runtime, predictions)
        found = [p["pair"] for p in results["runs"]["pairs"]["confusable_pairs"]
                 if p["source"] == "found"]
        results["found_pairs"] = {
            name: pair_figures(found, predictions[name], gold) for name in predictions}
        confused = Counter(tuple(sorted((g, p))) for g, p in zip(gold, predictions["logged"])
                           if g != p)
        top = [list(pair) for pair, _ in confused.most_common(len(found))]
        results["logged_top_confused_on_test"] = [
            {"pair": pair, "confused": confused[tuple(pair)]} for pair in top]
        results["found_among_top_confused"] = sum(1 for p in found if p in top)
        write_results(args.workdir, results)


def run_one(args, name: str, log: Path, teacher, data: dict, texts, gold, runtime,
            predictions: dict) -> dict:
    spec_path = spec_for(args.workdir, f"banking77-{name}", log, teacher.api_base, data)
    teacher.reset_counts()
    compiled = compile_spec(spec_path, args.sets)
    bundle = runtime.load_bundle(compiled.project.bundle_dir)
    predicted = [bundle.labels[i] for i in bundle.classifier.logits(texts).argmax(-1)]
    predictions[name] = predicted
    stats = json.loads((compiled.artifacts["generate"] / "stats.json").read_text())
    cohorts = stats["by_cohort"]
    run = {"int8_test_accuracy": round(float(np.mean([p == g for p, g in zip(predicted, gold)])), 4),
           "by_cohort": cohorts, "added_examples": sum(n for c, n in cohorts.items() if c != "log"),
           "paid": teacher.hits, "compile_seconds": compiled.seconds,
           "confusable_pairs": stats.get("confusable_pairs", []),
           "failure_rounds": stats.get("failure_rounds")}
    print(f"{name}: int8 test {run['int8_test_accuracy']:.2%}, {run['added_examples']} examples "
          f"added, {run['paid']} paid", flush=True)
    return run


if __name__ == "__main__":
    main()
